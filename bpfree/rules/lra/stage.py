"""One LRA stage: a contiguous run of the graph's nodes, steps (1)-(6) of the algorithm box in
`bpfree/rules/lra/__init__.py` for its layers. `step` is (1), `feedback` (2)-(3), `update` (4)-(6)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import BpfreeError
from ..base import LocalOutput, Message, Stage, StageStats
from .graph import Graph, LRALayer, Residual, conv_backward, layers_of, unpool, walk
from .probe import alignment


class LRAStats(StageStats):
    """Stage statistics plus the per-layer update/gradient cosine measured once per epoch."""

    def reset(self):
        super().reset()
        self.alignment: Optional[list[float]] = None

    def summary(self) -> dict:
        row = super().summary()
        if self.alignment is not None:
            row["align_cos"] = [round(cosine, 4) for cosine in self.alignment]
        return row


@dataclass
class _ForwardPass:
    """One forward pass of a stage (dicts keyed by global layer / node index)."""

    u: dict            # detached layer inputs u_l
    h: dict            # pre-activations h_l (recorded by autograd, never differentiated: see `_forward`)
    z: dict            # activities z_l (no graph)
    stats: dict        # BN batch statistics recorded by each layer's phi
    outs: dict         # residual node -> (h_out, z_out)
    out: torch.Tensor  # the stage's output (the logits for the last stage)


@dataclass
class _Errors:
    """What a stage's part of the target sweep produces."""

    e: dict            # error units e_l per layer (e_L = softmax - onehot at the output), detached
    d: dict            # feedback name -> the displacement d it produced
    block_e: dict      # residual node index -> its output error e_out (before any BN projection)
    e_out: torch.Tensor  # the output error e_L, which every stage needs for rec-LRA's skip links


class LRAStage(Stage):
    """Nodes start..stop-1 of the network, their layers and the feedback matrices they own.

    `step` runs the forward pass and keeps it; `feedback(signal)` takes the signal from the stage
    above (nothing, for the last stage: it has the logits), sets the targets and error units of its
    layers top-down and returns the signal for the stage below; `update` applies the local updates.
    The signal is (e_L,) plus, unless the node below is skip-linked, its displacement d.
    A feedback matrix belongs to the stage whose errors it carries: E_j (W_j's shape) to layer j's
    stage, E_{L->k} to node k's stage.
    """

    # float32 only: the error units are differences of nearby activations (z - y, a step of beta), and
    # the BN projection removes most of each error; half-precision mantissas (8 or 11 bits) lose them.
    precisions = ("fp32",)

    def __init__(self, graph: Graph, start: int, stop: int, feedback: dict, opts, num_classes: int):
        super().__init__(f"lra{graph.block[start]}")
        self.graph, self.start, self.stop = graph, start, stop
        self.opts, self.num_classes = opts, num_classes
        self.own = [j for k in range(start, stop) for j in layers_of(graph.nodes[k])]
        self.layers = nn.ModuleDict({str(j): graph.layers[j] for j in self.own})
        self.feedback_weights = nn.ParameterDict(feedback)
        self.is_last = stop == len(graph.nodes)
        self.stats = LRAStats()
        self.above: list[LRAStage] = []     # the stages above (set by the rule; for the alignment probe)
        self._pass: Optional[_ForwardPass] = None      # kept from step to update
        self._errors: Optional[_Errors] = None
        self._labels: Optional[torch.Tensor] = None

    def layer(self, j: int) -> LRALayer:
        return self.layers[str(j)]

    def _nodes(self):
        return [(k, self.graph.nodes[k]) for k in range(self.start, self.stop)]

    # --- the optimizer sees W, b and E; BN affine stays fixed (no LRA rule) -------------------
    def weight_params(self) -> list[nn.Parameter]:
        return [param for j in self.own for param in self.layer(j).weight.parameters()]

    def param_groups(self, cfg):
        weights = [param for param in self.weight_params() if param.requires_grad]
        feedback = [E for E in self.feedback_weights.values() if E.requires_grad]
        if self.opts.feedback_update == "fixed" or not feedback:
            return [{"params": weights}]
        if self.opts.feedback_lr_mult == 1.0:            # one group: one fused optimizer kernel per step
            return [{"params": weights + feedback}]
        return [{"params": weights}, {"params": feedback, "lr": cfg.lr * self.opts.feedback_lr_mult}]

    # --- inference -------------------------------------------------------------------------
    def _plain(self, j, z):
        layer = self.layer(j)
        return layer.phi(layer.weight(layer.input_map(z)))

    def forward(self, x):
        return (walk(self._nodes(), x, self._plain)[0],)

    def readout(self, message):
        return message[0] if self.is_last else None

    # --- (1) forward ---------------------------------------------------------------------------
    def _forward(self, x: torch.Tensor, noise: bool) -> _ForwardPass:
        opts = self.opts
        if noise and opts.input_noise > 0 and self.start == 0:          # noise on the network input only
            x = x + opts.input_noise * torch.randn_like(x)
        fwd = _ForwardPass({}, {}, {}, {}, {}, x)

        def layer_fn(j, z_in):
            layer = self.layer(j)
            u = layer.input_map(z_in).detach()                          # cut: no graph below u_l
            # h_l = W_l u_l + b_l. Autograd records it but nothing ever differentiates it (the update
            # is computed directly): what it saves, u_l, is what the update holds until `update`, so
            # the activation meter (tensors saved for backward) counts LRA as it counts every rule.
            h = layer.weight(u)
            recorded = []
            with torch.no_grad():
                z_out = layer.phi(h.detach(), record=recorded)          # z_l = phi_l(h_l)
            fwd.u[j], fwd.h[j], fwd.z[j], fwd.stats[j] = u, h, z_out, recorded
            return z_out
        fwd.out, fwd.outs = walk(self._nodes(), x, layer_fn)            # no graph beyond each layer's h_l
        return fwd

    # --- (2)-(3) the target sweep over this stage's nodes ----------------------------------
    def _down(self, j: int, e: torch.Tensor, u: torch.Tensor, displacements: dict) -> torch.Tensor:
        """Layer j's error e_j carried to its input u_j through E_j (W_j's shape): d = E_j^T e_j."""
        weight, E = self.layer(j).weight, self.feedback_weights[f"W{j}"].detach()
        if isinstance(weight, nn.Conv2d):
            # the transposed convolution of e_j with E_j onto u_j (W_j's stride/padding; u gives the shape)
            d = conv_backward(weight, u, E, e, "input")
        else:
            d = e @ E                                          # d = E_j e_j  (E stored as W^T)
        displacements[f"W{j}"] = d
        return d

    def _from_above(self, k: int, fwd: _ForwardPass, errors: _Errors) -> torch.Tensor:
        """The displacement node k gets from node k+1 (this stage's): its entry layers' errors through
        their feedback kernels, plus the block error through an identity shortcut, unpooled."""
        above = self.graph.nodes[k + 1]

        def down(j):
            return self._down(j, errors.e[j], fwd.u[j], errors.d)
        if not isinstance(above, Residual):
            return unpool(down(above), self.graph.out_shapes[k])
        total = down(above.body[0])
        if above.shortcut is None:
            total = total + errors.block_e[k + 1]     # an identity shortcut passes the block's error straight down
        else:
            total = total + down(above.shortcut)
        return unpool(total, self.graph.out_shapes[k])             # undo pool/flatten between the nodes

    def _sweep(self, fwd: _ForwardPass, signal: Message, labels: torch.Tensor) -> tuple[_Errors, Message]:
        opts, graph = self.opts, self.graph
        if self.is_last:                                                # (2) e_L = softmax(z_L) - onehot(y)
            e_out = (fwd.out.softmax(1) - F.one_hot(labels, self.num_classes).to(fwd.out.dtype)).detach()
        else:
            e_out = signal[0]
        errors = _Errors({}, {}, {}, e_out)
        B = e_out.shape[0]

        def project(j, e, through=False, scale=1.0):                    # what layer j's BN cancels, times scale
            if not opts.bn_project:
                return e if scale == 1.0 else e.mul_(scale)
            return self.layer(j).bn_project(e, fwd.h[j].detach(), fwd.stats[j], through, scale)

        unit = opts.beta if opts.scale_errors else 1.0                  # e_l per unit of target step

        def target_error(j, d_j):                                       # y_l = phi(h_l - beta d_l)
            with torch.no_grad():
                y = self.layer(j).phi(torch.add(fwd.h[j].detach(), d_j.detach(), alpha=-opts.beta),
                                      stats=fwd.stats[j] or None)
                return project(j, torch.sub(fwd.z[j], y, out=y), scale=1.0 / unit)  # e_l = (z_l - y_l) / unit
        for k in range(self.stop - 1, self.start - 1, -1):              # (3) top-down over the nodes
            node = graph.nodes[k]
            if k == len(graph.nodes) - 1:
                errors.e[node] = e_out                                  # the output layer
                continue
            if graph.skip[k]:                                           # rec-LRA: d_k = E_{L->k} e_L
                errors.d[f"S{k}"] = (e_out @ self.feedback_weights[f"S{k}"].detach()).reshape(B, *graph.out_shapes[k])
                d_k = errors.d[f"S{k}"]
            elif k + 1 < self.stop:                                     # LRA-E: from the node above,
                d_k = self._from_above(k, fwd, errors)
            else:                                                       # or from the stage above
                d_k = signal[1]
            if not isinstance(node, Residual):
                errors.e[node] = target_error(node, d_k)
                continue
            h_out, z_out = fwd.outs[k]                                  # the block's output target
            # e_out = z_out - relu(h_out - beta d)
            with torch.no_grad():
                errors.block_e[k] = (z_out - torch.add(h_out.detach(), d_k.detach(), alpha=-opts.beta).relu_()).div_(unit)
            # the last body layer and the shortcut write h_out directly
            errors.e[node.last] = project(node.last, errors.block_e[k], True)
            if node.shortcut is not None:
                errors.e[node.shortcut] = project(node.shortcut, errors.block_e[k], True)
            for i in range(len(node.body) - 2, -1, -1):                 # then, inside the block
                j, above = node.body[i], node.body[i + 1]
                errors.e[j] = target_error(j, self._down(above, errors.e[above], fwd.u[above], errors.d))
        if self.start == 0:
            return errors, ()
        if graph.skip[self.start - 1]:
            return errors, (e_out,)
        return errors, (e_out, self._from_above(self.start - 1, fwd, errors).detach())

    # --- (4) local updates -------------------------------------------------------------------
    def _updates(self, fwd: _ForwardPass, errors: _Errors) -> tuple[dict, dict]:
        """Per-layer updates {j: [dW_l, db_l]} and dE per feedback matrix (name -> dE or None), each
        computed directly from its own layer's (or link's) tensors: no autograd call, no chain."""
        B = errors.e_out.shape[0]
        with torch.no_grad():
            dws = {j: [t / B for t in self.layer(j).weight_update(fwd.u[j], errors.e[j])] for j in self.own}
            des = {name: self._feedback_update(name, fwd, errors, dws) for name in self.feedback_weights}
        return dws, des

    def _feedback_update(self, name: str, fwd: _ForwardPass, errors: _Errors, dws: dict):
        """dE of one feedback matrix: E_j (adjacent, name W{j}) by --feedback-update, the skip link
        E_{L->k} (name S{k}) by --skip-update; None when it stays fixed."""
        opts, B = self.opts, errors.e_out.shape[0]
        if opts.feedback_update == "fixed":
            return None
        if name[0] == "W":
            j = int(name[1:])
            if opts.feedback_update == "transpose":         # dE_j = gamma dW_j^T (E_j has W_j's layout)
                return opts.gamma * dws[j][0]
            # error-product: dE = -gamma d e_j^T / B, in E's layout: the weight gradient of a layer
            # with E's shape mapping d to an output of gradient e_j
            weight, e = self.layer(j).weight, errors.e[j]
            if isinstance(weight, nn.Conv2d):
                grad = conv_backward(weight, errors.d[name], weight.weight, e, "weight")
            else:
                grad = e.t() @ errors.d[name]
            return -opts.gamma * grad / B
        k = int(name[1:])                                    # a skip link: classes x node k's output
        if opts.skip_update == "product":                   # dE = -gamma e_L^T d_k / B (grows along E)
            return -opts.gamma * errors.e_out.t() @ errors.d[name].flatten(1) / B
        if opts.skip_update == "kp":    # dE = gamma e_L z_k^T / B: the update a forward link z_k -> logits gets
            z_k = fwd.outs[k][1] if k in fwd.outs else fwd.z[self.graph.nodes[k]]
            return opts.gamma * errors.e_out.t() @ z_k.flatten(1) / B
        return None

    def _project(self, deltas: list[torch.Tensor]) -> None:
        """(5) Ball projection, in place: Delta <- c Delta / ||Delta|| if ||Delta|| > c, per tensor
        (Delta * min(1, c / ||Delta||), batched over the tensors)."""
        c = self.opts.clip
        if c <= 0 or not deltas:
            return
        norms = torch.stack(torch._foreach_norm(deltas))
        torch._foreach_mul_(deltas, (c / norms).clamp_(max=1.0).tolist())

    @torch.no_grad()
    def _decay(self):
        """(6') --decay: every weight matrix W_l and feedback matrix E shrinks by (1 - lr_t decay), as
        AdamW's decoupled weight decay does (whatever --optimizer is). Under the transpose rule W_l and
        E_l get the same steps, so E - W shrinks by that factor per step (Kolen-Pollack's mechanism):
        without it E - W = E_0 - W_0 for ever and E tracks W's change, not W."""
        if self.opts.decay <= 0:
            return
        learned = {id(E) for E in self.feedback_weights.values() if E.grad is not None}
        weights = {id(self.layer(j).weight.weight) for j in self.own}
        for group in self.optimizer.param_groups:
            shrink = 1.0 - group["lr"] * self.opts.decay
            for param in group["params"]:
                if id(param) in weights or id(param) in learned:
                    param.mul_(shrink)

    # --- training: step (forward), feedback (targets), update ---------------------------------
    def step(self, message, labels):
        if self._pass is not None:        # the last batch's step never got its feedback and update
            raise BpfreeError(f"stage {self.name} learns top-down: its step is only the forward half of a batch, "
                              "whose feedback and update come from the stages above; train with rule.train_step(x, y)")
        x = message[0].detach()
        if self.opts.probe_size > 0 and self.stats.steps == 0 and self.training:
            # once per epoch, before its first update, when every process holds the same weights of
            # every stage (the probe uses the stages above). Identity saved-tensor hooks shadow any
            # outer ones: the probe's backprop pass is no part of LRA's activation memory.
            n = self.opts.probe_size
            with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
                self.stats.alignment = alignment([self] + self.above, x[:n], labels[:n])[0]
        self._pass = self._forward(x, noise=self.training)
        return (self._pass.out.detach(),)

    def held_tensors(self):
        return [vars(kept) for kept in (self._pass, self._errors) if kept is not None]

    def feedback(self, signal, labels):
        self._errors, down = self._sweep(self._pass, tuple(t.detach() for t in signal), labels)
        self._labels = labels
        return down

    def update(self):
        fwd, errors = self._pass, self._errors
        dws, des = self._updates(fwd, errors)
        self.optimizer.zero_grad(set_to_none=True)
        updates = [(param, delta) for j in self.own for param, delta in zip(self.layer(j).weight.parameters(), dws[j])]
        updates += [(E, des[name]) for name, E in self.feedback_weights.items() if des[name] is not None]
        self._project([delta for _, delta in updates])
        for param, delta in updates:                                    # (6) through the optimizer
            # in the parameter's own memory layout (the trainer makes conv weights channels-last): a
            # fused optimizer steps over memory, so a gradient laid out otherwise lands permuted
            param.grad = delta if delta.stride() == param.stride() else torch.empty_like(param).copy_(delta)
        self._decay()
        self.optimizer.step()
        self.scheduler.step()
        if self.is_last:      # the output's cross-entropy
            loss = F.cross_entropy(fwd.out, self._labels)
        else:                 # below it, how far activities are from their targets: sum_l ||e_l||^2 / 2B
            loss = sum(torch.linalg.vector_norm(errors.e[j]) ** 2 for j in self.own) / (2 * errors.e_out.shape[0])
        self.stats.add(LocalOutput(loss, (fwd.out,), fwd.out if self.is_last else None), self._labels)
        self._pass = self._errors = self._labels = None
