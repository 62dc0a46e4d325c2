"""Local representation alignment: LRA-E and recursive LRA (rec-LRA), gradient-free credit assignment.

Sources: Ororbia & Mali, "Biologically Motivated Algorithms for Propagating Local Target
Representations" (LRA-E, AAAI 2019, arXiv 1805.11703) and its official code (AnkurMali/LRA-E, read
for the update forms); Ororbia, Mali, Kifer, Giles, "Large-Scale Gradient-Free Deep Learning with
Recursive Local Representation Alignment" (arXiv 2002.03911, AAAI 2023). Our specs:
shared/papers/rec-lra-spec.md and notes-bwbpf-lra.md §2-3. The rec-LRA text itself could not be
retrieved; what comes only from a third-party port is marked *unverified* below.

The network is read as a stack of L weight layers (the BlockNet's Linear/Conv2d layers, head
included), each with an elementwise nonlinearity phi_l:

    u_l = pool_l(z_{l-1})             shape-only ops between layers (Flatten, MaxPool, global pool)
    h_l = W_l u_l + b_l               (conv: W_l * u_l)
    z_l = phi_l(h_l)                  phi_L = identity: z_L are the logits

One training step (`LRAStage.step`), with B the batch size:

    (1) forward                       z_0 = x (+ N(0, sigma^2) input noise), h_l, z_l for l = 1..L
    (2) output error                  e_L = softmax(z_L) - onehot(y)            (LRA-E code)
    (3) top-down target sweep, l = L-1 .. 1:
          d_l = E_{l+1} e_{l+1}       adjacent link (LRA-E)
          d_l = E_{L->l} e_L          rec-LRA error-skip link, every m-th layer below the output
          y_l = phi_l(h_l - beta d_l)                                       target
          e_l = z_l - y_l                                                   error units
    (4) local updates, independent per layer once e_l is known:
          dW_l = e_l u_l^T / B        no activation derivative, no chain across layers
          dE   = gamma dW_{l+1}^T     "transpose" (LRA-E code; E tracks W, Kolen-Pollack-like)
          dE   = -gamma d_l e_j^T / B "error-product" (rec-LRA Eq. 6 as the port reports it; unverified)
    (5) ball projection               Delta <- c Delta / ||Delta|| when ||Delta|| > c, per tensor
    (6) p.grad = Delta for every W, b, E; the stage's optimizer steps (Adam/SGD + schedule as usual).

Each layer's dW_l is computed with `torch.autograd.grad(h_l, (W_l, b_l), e_l / B)` on a graph that
starts at the *detached* u_l: that is exactly e_l u_l^T for a Linear layer and the conv weight-
gradient kernel (the correlation of e_l with u_l) for a Conv2d layer, and the graph holds only that
layer's parameters. No autograd call ever sees two layers (tested).

Convolutions (which equation each line implements is marked in `_feedback`):
* Adjacent feedback E_{l+1} has the *shape of W_{l+1}* and is applied as a transposed convolution
  with W_{l+1}'s stride/padding (`torch.nn.grad.conv2d_input`, i.e. the transposed conv that maps
  layer l+1's error map back to its input's shape); for Linear layers it is e_{l+1} E_{l+1}, the
  same matrix stored transposed. With this layout "dE = gamma dW^T" is simply gamma dW_{l+1}.
* The shape-only ops between layers (max-pool, global average pool, flatten) are undone on d by
  nearest-neighbour upsampling / broadcasting over space (the transpose of pooling up to a scale
  factor, which beta absorbs); max-pool's switch pattern is not used (it would be an activation
  derivative).
* Error-skip feedback E_{L->l} is dense: (classes) -> (C_l H_l W_l) (digits 8x8 and 28x28 inputs
  keep this small; a channel-wise E would be the cheaper choice for large maps).

BatchNorm has no LRA rule. We treat it as part of the nonlinearity phi_l with its affine fixed at
initialisation (weight 1, bias 0: its parameters are not given to the optimizer, so they never
change): phi_l(h) = act((h - mu_B) / sigma_B). The target y_l = phi_l(h_l - beta d_l) reuses the
forward pass's batch statistics mu_B, sigma_B (detached), so phi_l is the same fixed map for z_l and
y_l; running statistics update as usual and inference uses them.
A train-mode BN output does not change when a channel of h is shifted or scaled, so those parts of
e_l move W_l without moving the network; left in, they dominate dW_l (measured: update/gradient
cosines near 0 even with E set to W, digits cnn stuck at 43%). With `bn_project` (default) each
error first loses them: e_l <- e_l - mean(e_l) - xhat_l mean(e_l xhat_l), per channel over batch and
space (`LRALayer.bn_project`, BN's own input Jacobian without its 1/sigma: a computation inside the
layer, from its own statistics). Same digits cnn: 99.6% (backprop 99%), resnet18 width 8: 91%.

Why one stage holding all layers: the targets of layer l come from the error of layer l+1 (or the
output), which exists only after the whole forward pass, while the trainer steps stages bottom-up
once per batch. Until the protocol can carry a top-down signal, the rule keeps the forward pass,
the target sweep and the per-layer updates inside one `step`. The per-layer updates in (4)-(6) are
independent and could run in parallel; only the cheap sweep (3) is serial. A parallel engine would
instead give each layer its own stage and carry the top-down message: see the proposal in the
report (a `Stage.feedback(message_from_above, labels) -> message_to_below` half-step run top-down
after the forward `step`s, and a Rule-level `top_down = True` flag telling executors to run it).

Deviations: E ~ N(0, 0.1^2) (LRA-E code: N(0, 1)); with N(0, 1) mlp 64x2 reached 50% on digits after
3 epochs, with 0.1 it reaches 64% (3 epochs) and 92% (10; backprop 95%). Skip links E_{L->l} are kept
fixed under `--feedback-update transpose` (they have no forward weight to track). The output error is
softmax - onehot, the paper's alpha-mixed sign errors are not implemented. Measured on digits, cnn
16-32-64-64, 10 epochs, lr 2e-3: lra-e 47% (67% with fixed E), reclra 55%, backprop 99%: the conv
feedback does not yet align (per-layer cosines ~0), an open problem, see the report of issue 7.

Residual networks (`resnet18`), the recursive construction: the layers form a chain of *nodes*, a
plain layer or a residual block z_out = relu(h_out), h_out = BN(W_b phi_a(W_a z_in)) + skip(z_in)
(skip: identity, or a 1x1 conv + BN). Targets are computed for node outputs first, then inside the
blocks, so no derivative ever crosses a layer:

    d_out = displacement from the node above (or E_{L->k} e_L for a skip-linked node)
    e_out = z_out - relu(h_out - beta d_out)      the block's output error (target: y_out)
    e_b = e_s = e_out                             the last body conv and the shortcut conv write h_out
    e_a = z_a - phi_a(h_a - beta E_b^T e_b)       the first conv, from the second's error
    d_in = E_a^T e_a + (e_out | E_s^T e_out)      what the block sends down: its entry convs' errors
                                                  through their feedback kernels, plus the block error
                                                  itself through an identity shortcut

rec-LRA's error-skip links attach to node outputs (every m-th node below the output), which is our
reading of "targets for block outputs first" (the port maps endpoints to block boundaries too;
unverified). Measured on digits (8x8, resnet18 width 8, 8 epochs, lr 2e-3, val split 0.2): lra-e
18.2%, reclra 19.3% (26.8% with fixed feedback), backprop 98.9%; per-layer update/gradient cosines
stay near 0, the same conv-feedback alignment failure as the plain cnn above: not solved yet.

`build_stages` refuses models containing anything but Linear/Conv2d, BatchNorm, elementwise
activations, pooling, Flatten and bpfree's residual `BasicBlock`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BpfreeError
from ..models.zoo import BasicBlock
from .base import LocalOutput, Rule, Stage, StageStats, register_rule

FEEDBACK_UPDATES = ("transpose", "error-product", "fixed")
WEIGHTS = (nn.Linear, nn.Conv2d)
ELEMENTWISE = (nn.ReLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.GELU, nn.Identity, nn.Dropout)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
SHAPE_OPS = (nn.Flatten, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def _leaves(module: nn.Module, where: str) -> list[nn.Module]:
    """The layers of an (arbitrarily nested) nn.Sequential, in order; residual blocks stay whole."""
    if isinstance(module, nn.Sequential):
        return [leaf for child in module for leaf in _leaves(child, where)]
    if isinstance(module, WEIGHTS + ELEMENTWISE + NORMS + SHAPE_OPS + (BasicBlock,)):
        return [module]
    raise BpfreeError(f"LRA cannot train {where}: it contains a {type(module).__name__}; supported are "
                      f"stacks of Linear/Conv2d, BatchNorm, activations, pooling and bpfree's residual "
                      f"BasicBlock (models mlp, cnn, vgg11, resnet18)")


@dataclass
class Residual:
    """A residual block as a node: z_out = relu(h_out), h_out = chain(body)(z_in) + skip(z_in),
    skip = z_in (identity) or layer `shortcut` (1x1 conv + BN). Entries are layer indices."""

    body: list[int]
    shortcut: Optional[int]

    @property
    def entries(self) -> list[int]:
        """The layers that read the block's input."""
        return [self.body[0]] + ([self.shortcut] if self.shortcut is not None else [])

    @property
    def last(self) -> int:
        return self.body[-1]


class LRALayer(nn.Module):
    """u = pre(z_prev); h = W u + b; z = phi(h). `post` holds phi's modules (BN, activation)."""

    def __init__(self, pre: list[nn.Module], weight: nn.Module, post: list[nn.Module]):
        super().__init__()
        self.pre, self.weight, self.post = nn.ModuleList(pre), weight, nn.ModuleList(post)

    def inp(self, z_prev):
        for m in self.pre:
            z_prev = m(z_prev)
        return z_prev

    def phi(self, h, stats: Optional[list] = None, record: Optional[list] = None):
        """phi_l(h). With `record` (training forward): BN uses and appends its batch statistics.
        With `stats`: BN normalises with those recorded statistics (the target pass)."""
        k = 0
        for m in self.post:
            if isinstance(m, NORMS):
                if stats is not None:
                    mu, var = stats[k]
                    k += 1
                    h = F.batch_norm(h, mu, var, m.weight, m.bias, False, 0.0, m.eps)
                else:
                    if record is not None and m.training:
                        dims = [0] + list(range(2, h.dim()))
                        record.append((h.mean(dims).detach(), h.var(dims, unbiased=False).detach()))
                    h = m(h)
            else:
                h = m(h.clone() if getattr(m, "inplace", False) else h)
        return h


    def bn_project(self, e: torch.Tensor, h: torch.Tensor, stats: list) -> torch.Tensor:
        """Remove from e what the layer's train-mode BatchNorm cancels: per channel, its batch mean and
        its component along the normalised input xhat (BN's output is invariant to shifting or scaling
        a channel of h, so an update along those directions does nothing but grow or shift W).
        e' = e - mean(e) - xhat mean(e xhat), means over batch and space: BN's input Jacobian without
        its 1/sigma (as LRA drops phi'). Only when BN reads h directly and the forward recorded stats."""
        if not stats or not self.post or not isinstance(self.post[0], NORMS):
            return e
        mu, var = stats[0]
        dims = [0] + list(range(2, e.dim()))
        view = (1, -1) + (1,) * (e.dim() - 2)
        xhat = (h - mu.view(view)) / torch.sqrt(var.view(view) + self.post[0].eps)
        return e - e.mean(dims, keepdim=True) - xhat * (e * xhat).mean(dims, keepdim=True)


def _chain(leaves: list[nn.Module], where: str) -> list[LRALayer]:
    """Weight layers with their phi: shape-only ops go to the next layer's input, BN/activations to phi."""
    layers, pre, current = [], [], None
    for m in leaves:
        if isinstance(m, WEIGHTS):
            if current is not None:
                layers.append(current)
            current, pre = LRALayer(pre, m, []), []
        elif isinstance(m, SHAPE_OPS) or current is None:
            pre.append(m)           # shape-only ops belong to the next layer's input u_{l+1}
        else:
            current.post.append(m)  # BN / activations: phi_l
    if current is None or pre:
        raise BpfreeError(f"LRA needs {where} to end in a Linear/Conv2d layer")
    return layers + [current]


def _lra_graph(net) -> tuple[list[LRALayer], list]:
    """The flat list of weight layers and the nodes they form: a layer index, or a Residual."""
    leaves = []
    for k, block in enumerate(net.blocks):
        leaves += _leaves(block, f"block {k + 1}")
    leaves += _leaves(net.head, "the head")
    layers, nodes, run = [], [], []

    def close_run():
        for layer in _chain(run, "the network") if run else []:
            layers.append(layer)
            nodes.append(len(layers) - 1)
        run.clear()

    for m in leaves:
        if not isinstance(m, BasicBlock):
            run.append(m)
            continue
        close_run()
        body = _chain(_leaves(m.body, "a residual block"), "a residual block's body")
        if any(layer.pre for layer in body):
            raise BpfreeError("LRA does not support pooling inside a residual block's body")
        first = len(layers)
        layers.extend(body)
        shortcut = None
        if not isinstance(m.shortcut, nn.Identity):
            layers.extend(_chain(_leaves(m.shortcut, "a residual shortcut"), "a residual shortcut"))
            shortcut = len(layers) - 1
        nodes.append(Residual(list(range(first, first + len(body))), shortcut))
    close_run()
    if not isinstance(nodes[-1], int):
        raise BpfreeError("LRA needs a network that ends in a Linear/Conv2d output layer")
    if layers[-1].post:
        raise BpfreeError("LRA needs linear logits: the output layer must have no activation")
    return layers, nodes


def _unpool(d: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Map a feedback signal from u_{l+1}'s shape back to h_l's shape (transpose of the pooling and
    flatten ops up to scale: reshape, broadcast over space, or nearest upsampling)."""
    if tuple(d.shape[1:]) == shape:
        return d
    b = d.shape[0]
    if len(shape) == 3:
        c, hh, ww = shape
        if d.dim() == 2:
            if d.shape[1] == c * hh * ww:
                return d.reshape(b, c, hh, ww)
            if d.shape[1] == c:                             # global pool: broadcast over space
                return d[:, :, None, None].expand(b, c, hh, ww)
            side = int(math.isqrt(d.shape[1] // c))
            d = d.reshape(b, c, side, side)
        return F.interpolate(d, size=(hh, ww), mode="nearest")
    return d.reshape(b, *shape)


class LRAStats(StageStats):
    """Stage statistics plus the per-layer update/gradient cosine measured once per epoch."""

    def reset(self):
        super().reset()
        self.alignment: Optional[list[float]] = None

    def summary(self) -> dict:
        row = super().summary()
        if self.alignment is not None:
            row["align_cos"] = [round(a, 4) for a in self.alignment]
        return row


@dataclass
class _Sweep:
    """Everything one forward pass + target sweep produces (lists per weight layer, index 0 = layer 1)."""

    u: list            # detached layer inputs u_l
    h: list            # pre-activations, attached to W_l only
    e: list            # error units e_l (e_L = softmax - onehot), detached
    d: dict            # feedback name -> the displacement it produced, attached to that matrix only
    block_e: dict      # residual node index -> its output error e_out (before any BN projection)
    logits: torch.Tensor


class LRAStage(Stage):
    """All L layers and their feedback matrices; `step` = forward, target sweep, local updates.

    The layers form a chain of *nodes*: a plain layer, or a residual block (`Residual`). Targets are
    computed recursively: first for each node's output from the error of the node above (or, for
    rec-LRA's skip links, from the output error), then, inside a residual block, for its layers.
    """

    def __init__(self, net, opts, recursive: bool):
        super().__init__("lra")
        layers, self.nodes = _lra_graph(net)
        self.layers = nn.ModuleList(layers)
        self.opts, self.recursive = opts, recursive
        self.num_classes = net.num_classes
        self.stats = LRAStats()
        self.shapes, self.out_shapes = self._shapes(net.in_shape)   # h_l per layer; node outputs
        N = len(self.nodes)
        # rec-LRA's error-skip links: every m-th node below the output takes its displacement from
        # the output error (E_{L->k}); the others from the node above (LRA-E's adjacent link).
        self.skip = [recursive and k < N - 1 and (N - 1 - k) % opts.skip_every == 0 for k in range(N)]
        self.sources = [None if k == N - 1 else N - 1 if self.skip[k] else k + 1 for k in range(N)]
        feedback = {}
        for k in range(N - 1):
            if self.skip[k]:                         # E_{L->k}: classes x prod(node k's output)
                shape = (self.num_classes, math.prod(self.out_shapes[k]))
                feedback[f"S{k}"] = nn.Parameter(torch.randn(shape) * opts.feedback_init_std)
            else:                                    # E_j: the shape of W_j, for each layer reading node k
                for j in self._entries(self.nodes[k + 1]):
                    feedback[f"W{j}"] = self._feedback_like(j)
        for node in self.nodes:                      # inside residual bodies: layer to layer
            if isinstance(node, Residual):
                for j in node.body[1:]:
                    feedback[f"W{j}"] = self._feedback_like(j)
        self.feedback = nn.ParameterDict(feedback)

    def _feedback_like(self, j: int) -> nn.Parameter:
        return nn.Parameter(torch.randn(self.layers[j].weight.weight.shape) * self.opts.feedback_init_std)

    @staticmethod
    def _entries(node) -> list[int]:
        return node.entries if isinstance(node, Residual) else [node]

    def _walk(self, z, run) -> tuple[torch.Tensor, list]:
        """Run the nodes on z; `run(j, z_in) -> z_j` computes layer j. Residual blocks add their
        shortcut and apply the block's ReLU. Returns the output and (h_out, z_out) per residual node."""
        outs = []
        for node in self.nodes:
            if isinstance(node, Residual):
                q = z
                for j in node.body:
                    q = run(j, q)
                h = q + (z if node.shortcut is None else run(node.shortcut, z))
                z = h.relu()
                outs.append((h, z))
            else:
                z = run(node, z)
                outs.append(None)
        return z, outs

    @torch.no_grad()
    def _shapes(self, in_shape):
        # h_l shapes, node output shapes, and each layer's input spatial size (for transposed convs)
        modes = [(m, m.training) for m in self.modules()]
        self.eval()
        shapes, self._u_hw = [None] * len(self.layers), [None] * len(self.layers)

        def run(j, z):
            layer = self.layers[j]
            u = layer.inp(z)
            self._u_hw[j] = tuple(u.shape[2:])
            h = layer.weight(u)
            shapes[j] = tuple(h.shape[1:])
            return layer.phi(h)
        _, outs = self._walk(torch.zeros(2, *in_shape), run)
        for m, mode in modes:
            m.training = mode
        out_shapes = [tuple(o[1].shape[1:]) if o else shapes[n] for n, o in zip(self.nodes, outs)]
        return shapes, out_shapes

    # --- the optimizer sees W, b and E; BN affine stays fixed (no LRA rule) -------------------
    def weight_params(self) -> list[nn.Parameter]:
        return [p for layer in self.layers for p in layer.weight.parameters()]

    def param_groups(self, cfg):
        groups = [{"params": [p for p in self.weight_params() if p.requires_grad]}]
        if self.opts.feedback_update != "fixed":
            groups.append({"params": [p for p in self.feedback.values() if p.requires_grad],
                           "lr": cfg.lr * self.opts.feedback_lr_mult})
        return groups

    # --- inference -------------------------------------------------------------------------
    def _plain(self, j, z):
        layer = self.layers[j]
        return layer.phi(layer.weight(layer.inp(z)))

    def forward(self, x):
        return (self._walk(x, self._plain)[0],)

    def readout(self, message):
        return message[0]

    # --- (3) feedback ------------------------------------------------------------------------
    def _down(self, j: int, e: torch.Tensor, d: dict) -> torch.Tensor:
        """Layer j's error e_j carried to its input u_j through E_j (W_j's shape): d = E_j^T e_j."""
        w, E = self.layers[j].weight, self.feedback[f"W{j}"]
        if isinstance(w, nn.Conv2d):
            # the transposed convolution of e_j with E_j, onto u_j's shape (W_j's stride/padding)
            u_shape = (e.shape[0], w.in_channels, *self._u_hw[j])
            out = torch.nn.grad.conv2d_input(u_shape, E, e, w.stride, w.padding, w.dilation, w.groups)
        else:
            out = e @ E                                        # d = E_j e_j  (E stored as W^T)
        d[f"W{j}"] = out
        return out

    def _displacement(self, k: int, es: list, d: dict, block_e: dict) -> torch.Tensor:
        """d_k at node k's output: from the output error (skip link) or from the node above's errors
        (`block_e`: each residual node's output error e_out)."""
        B = es[-1].shape[0]
        if self.skip[k]:
            d[f"S{k}"] = (es[-1] @ self.feedback[f"S{k}"]).reshape(B, *self.out_shapes[k])   # E_{L->k} e_L
            return d[f"S{k}"]
        above = self.nodes[k + 1]
        total = sum(self._down(j, es[j], d) for j in self._entries(above))
        if isinstance(above, Residual) and above.shortcut is None:
            total = total + block_e[k + 1]       # an identity shortcut passes the block's error straight down
        return _unpool(total, self.out_shapes[k])              # undo pool/flatten between the nodes

    def _sweep(self, x, labels, noise: bool) -> _Sweep:
        o = self.opts
        z = x + o.input_noise * torch.randn_like(x) if noise and o.input_noise > 0 else x
        n = len(self.layers)
        us, hs, zs, stats = [None] * n, [None] * n, [None] * n, [None] * n

        def run(j, z_in):                                               # (1) forward, one layer
            layer = self.layers[j]
            u = layer.inp(z_in).detach()                                # cut: no graph below u_l
            h = layer.weight(u)                                         # h_l = W_l u_l + b_l
            rec = []
            with torch.no_grad():
                z_out = layer.phi(h.detach(), record=rec)               # z_l = phi_l(h_l)
            us[j], hs[j], zs[j], stats[j] = u, h, z_out, rec
            return z_out
        logits, outs = self._walk(z, run)       # no graph beyond each layer's h_l (z_l are computed without)
        es, d, block_e = [None] * n, {}, {}
        es[-1] = (logits.softmax(1) - F.one_hot(labels, self.num_classes).to(logits.dtype)).detach()  # (2)

        def project(j, e):                                              # what layer j's BN cancels
            return self.layers[j].bn_project(e, hs[j].detach(), stats[j]) if o.bn_project else e

        def target_error(j, dj):                                        # y_l = phi(h_l - beta d_l)
            with torch.no_grad():
                y = self.layers[j].phi(hs[j].detach() - o.beta * dj.detach(), stats=stats[j] or None)
                return project(j, zs[j] - y)                            # e_l = z_l - y_l
        for k in range(len(self.nodes) - 2, -1, -1):                    # (3) top-down over nodes
            node, dk = self.nodes[k], self._displacement(k, es, d, block_e)   # dk attached to E only
            if not isinstance(node, Residual):
                es[node] = target_error(node, dk)
                continue
            h_out, z_out = outs[k]                                      # the block's output target
            e_out = (z_out - (h_out - o.beta * dk.detach()).relu()).detach()   # relu(h_out - beta d)
            block_e[k] = e_out
            es[node.last] = project(node.last, e_out)                   # the last body layer and the
            if node.shortcut is not None:                               # shortcut write h_out directly
                es[node.shortcut] = project(node.shortcut, e_out)
            for i in range(len(node.body) - 2, -1, -1):                 # then, inside the block
                j = node.body[i]
                es[j] = target_error(j, self._down(node.body[i + 1], es[node.body[i + 1]], d))
        return _Sweep(us, hs, es, d, block_e, logits)

    def _updates(self, s: _Sweep) -> tuple[list, dict]:
        """(4) Per-layer updates: [dW_l, db_l] for each layer, and dE per feedback matrix (name -> dE)."""
        B = s.logits.shape[0]
        o = self.opts
        dws = []
        for i, layer in enumerate(self.layers):
            params = list(layer.weight.parameters())
            # dW_l = e_l u_l^T / B: autograd inside ONE layer (graph: u_l (detached) -> h_l, params W_l, b_l)
            dws.append(list(torch.autograd.grad(s.h[i], params, grad_outputs=s.e[i] / B)))
        des = {}
        for name, E in self.feedback.items():
            if o.feedback_update == "fixed":
                des[name] = None
            elif o.feedback_update == "transpose":
                # dE_j = gamma dW_j^T (E_j has W_j's layout); skip links have no W: kept fixed
                des[name] = o.gamma * dws[int(name[1:])][0] if name[0] == "W" else None
            else:
                # dE = -gamma d e^T / B: the outer product of the displacement and the source error,
                # in E's layout (gradient of <d(E), c> wrt E at c = d)
                (g,) = torch.autograd.grad(s.d[name], [E], grad_outputs=s.d[name].detach())
                des[name] = -o.gamma * g / B
        return dws, des

    def _project(self, t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """(5) Ball projection: Delta <- c Delta / ||Delta|| if ||Delta|| > c."""
        c = self.opts.clip
        if t is None or c <= 0:
            return t
        n = t.norm()
        return t * (c / n) if n > c else t

    # --- training ----------------------------------------------------------------------------
    def local(self, message, labels):
        s = self._sweep(message[0], labels, noise=self.training)
        return LocalOutput(F.cross_entropy(s.logits, labels), (s.logits,), s.logits)

    def step(self, message, labels):
        x = message[0].detach()
        if self.opts.probe_size > 0 and self.stats.steps == 1 and self.training:
            # once per epoch, on the epoch's 2nd batch (the trainer meters activation memory on
            # the 1st one, and the probe's backprop pass must not count as LRA's footprint)
            self.stats.alignment = self.alignment(x[: self.opts.probe_size], labels[: self.opts.probe_size])
        s = self._sweep(x, labels, noise=self.training)
        dws, des = self._updates(s)
        self.optimizer.zero_grad(set_to_none=True)
        for layer, deltas in zip(self.layers, dws):
            for p, delta in zip(layer.weight.parameters(), deltas):
                p.grad = self._project(delta)                           # (6) through the optimizer
        for name, E in self.feedback.items():
            E.grad = self._project(des[name])
        self.optimizer.step()
        self.scheduler.step()
        logits = s.logits.detach()
        self.stats.add(LocalOutput(F.cross_entropy(logits, labels), (logits,), logits), labels)
        return (logits,)

    # --- diagnostic --------------------------------------------------------------------------
    def _bn_buffers(self):
        return [(m, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
                for m in self.modules() if isinstance(m, NORMS) and m.track_running_stats]

    def alignment(self, x: torch.Tensor, labels: torch.Tensor) -> list[float]:
        """Cosine between each layer's LRA weight update and the true backprop gradient of the
        cross-entropy on (x, labels), one value per weight layer (the output layer's is 1: its LRA
        update is the CE gradient). BN running statistics are left as they were."""
        saved = self._bn_buffers()
        try:
            dws, _ = self._updates(self._sweep(x, labels, noise=False))
            z = self._walk(x.detach(), self._plain)[0]      # the true gradient: one chained graph
            weights = [layer.weight.weight for layer in self.layers]
            grads = torch.autograd.grad(F.cross_entropy(z, labels), weights)
        finally:
            for m, mean, var, n in saved:
                m.running_mean.copy_(mean), m.running_var.copy_(var), m.num_batches_tracked.copy_(n)
        return [float(F.cosine_similarity(dw[0].flatten(), g.flatten(), dim=0)) for dw, g in zip(dws, grads)]


@dataclass
class LRAOptions:
    beta: float = field(default=0.1, metadata={"positive": True,
        "help": "target nudge: y_l = phi(h_l - beta d_l) (LRA-E code: 0.1; rec-LRA value unverified)"})
    gamma: float = field(default=1.0, metadata={"min": 0.0,
        "help": "feedback update scale gamma (LRA-E code: 1.0)"})
    feedback_update: str = field(default="transpose", metadata={"choices": FEEDBACK_UPDATES, "help":
        "transpose: dE = gamma dW^T (LRA-E code); error-product: dE = -gamma d e^T (rec-LRA Eq. 6 as "
        "reported by a port, unverified); fixed: E never changes"})
    feedback_init_std: float = field(default=0.1, metadata={"positive": True,
        "help": "E ~ N(0, std^2) at start (LRA-E code: 1.0; 0.1 learns digits far sooner, measured)"})
    feedback_lr_mult: float = field(default=1.0, metadata={"positive": True,
        "help": "feedback matrices' lr = this x --lr (LRA-E code: same optimizer, 1)"})
    clip: float = field(default=1.0, metadata={"min": 0.0,
        "help": "update-norm ball radius c per tensor, 0 = off (used in every rec-LRA run; value unverified)"})
    input_noise: float = field(default=0.0, metadata={"min": 0.0,
        "help": "std of Gaussian noise added to the input in training (rec-LRA appendix: 0.1, unverified)"})
    bn_project: bool = field(default=True, metadata={"help":
        "remove from each error what the layer's BatchNorm cancels (per-channel batch mean and xhat "
        "component; our BN adaptation, the papers use no BN)"})
    probe_size: int = field(default=64, metadata={"min": 0,
        "help": "samples of the per-epoch update/gradient alignment probe (0 = off)"})


@dataclass
class RecLRAOptions(LRAOptions):
    skip_every: int = field(default=2, metadata={"min": 1,
        "help": "error-skip link from the output every m layers below it (port: 2; unverified)"})


@register_rule
class LRAE(Rule):
    name = "lra-e"
    description = ("LRA-E: targets y_l = phi(h_l - beta E e_{l+1}) from the error above, "
                   "Hebbian local updates e_l u_l^T, learned feedback E (Ororbia & Mali 2019; one stage)")
    schedules = ("simultaneous",)
    recursive = False
    Options = LRAOptions
    stages_note = ("its layers learn from targets sent top-down from the output error within one stage; "
                   "the stage protocol does not carry a top-down signal between processes yet")

    def build_stages(self, net, options):
        return [LRAStage(net, options, self.recursive)]

    def alignment(self, x, labels) -> list[float]:
        return self.stages[0].alignment(x, labels)


@register_rule
class RecLRA(LRAE):
    name = "reclra"
    description = ("rec-LRA: LRA-E plus error-skip links from the output every m layers "
                   "(Ororbia et al. 2023; mlp, cnn, resnet18 via residual nodes; one stage)")
    recursive = True
    Options = RecLRAOptions
