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

Not supported yet: residual networks (`resnet18`): the recursive treatment of residual blocks needs
the paper's block-level construction; `build_stages` refuses models whose blocks contain anything
but Linear/Conv2d, BatchNorm, elementwise activations, pooling and Flatten.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BpfreeError
from .base import LocalOutput, Rule, Stage, StageStats, register_rule

FEEDBACK_UPDATES = ("transpose", "error-product", "fixed")
WEIGHTS = (nn.Linear, nn.Conv2d)
ELEMENTWISE = (nn.ReLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.GELU, nn.Identity, nn.Dropout)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
SHAPE_OPS = (nn.Flatten, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def _leaves(module: nn.Module, where: str) -> list[nn.Module]:
    """The layers of an (arbitrarily nested) nn.Sequential, in order."""
    if isinstance(module, nn.Sequential):
        return [leaf for child in module for leaf in _leaves(child, where)]
    if isinstance(module, WEIGHTS + ELEMENTWISE + NORMS + SHAPE_OPS):
        return [module]
    raise BpfreeError(f"LRA cannot train {where}: it contains a {type(module).__name__}; supported are "
                      f"feed-forward stacks of Linear/Conv2d, BatchNorm, activations and pooling "
                      f"(mlp, cnn; residual networks are not supported yet)")


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


def _lra_layers(net) -> list[LRALayer]:
    leaves = []
    for k, block in enumerate(net.blocks):
        leaves += _leaves(block, f"block {k + 1}")
    leaves += _leaves(net.head, "the head")
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
        raise BpfreeError("LRA needs a network that ends in a Linear/Conv2d output layer")
    if current.post:
        raise BpfreeError("LRA needs linear logits: the output layer must have no activation")
    layers.append(current)
    return layers


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
    """Everything one forward pass + target sweep produces (per layer lists, index 0 = layer 1)."""

    u: list            # detached layer inputs u_l
    h: list            # pre-activations, attached to W_l only
    e: list            # error units e_l (e_L = softmax - onehot), detached
    d: list            # feedback displacements d_l (None for the output layer), attached to E only
    logits: torch.Tensor


class LRAStage(Stage):
    """All L layers and their feedback matrices; `step` = forward, target sweep, local updates."""

    def __init__(self, net, opts, recursive: bool):
        super().__init__("lra")
        self.layers = nn.ModuleList(_lra_layers(net))
        self.opts, self.recursive = opts, recursive
        self.num_classes = net.num_classes
        self.stats = LRAStats()
        L = len(self.layers)
        shapes = self._shapes(net.in_shape)              # h_l shapes (no batch dim)
        # sources[l]: index of the layer whose error drives layer l's target (None: output layer)
        self.sources = []
        for i in range(L):
            if i == L - 1:
                self.sources.append(None)
            elif recursive and (L - 1 - i) % opts.skip_every == 0:
                self.sources.append(L - 1)           # rec-LRA error-skip link from the output
            else:
                self.sources.append(i + 1)           # adjacent link (LRA-E)
        feedback = []
        for i in range(L - 1):
            if self.sources[i] == i + 1:             # E_{l+1}: the shape of W_{l+1}
                shape = self.layers[i + 1].weight.weight.shape
            else:                                    # E_{L->l}: classes x prod(h_l)
                shape = (self.num_classes, math.prod(shapes[i]))
            feedback.append(nn.Parameter(torch.randn(shape) * opts.feedback_init_std))
        self.feedback = nn.ParameterList(feedback)
        self.shapes = shapes

    @torch.no_grad()
    def _shapes(self, in_shape):
        # h_l shapes, and the spatial size of each conv layer's input u_l (for the transposed conv)
        modes = [(m, m.training) for m in self.modules()]
        self.eval()
        z, shapes, self._u_hw = torch.zeros(2, *in_shape), [], []
        for layer in self.layers:
            u = layer.inp(z)
            self._u_hw.append(tuple(u.shape[2:]))
            h = layer.weight(u)
            shapes.append(tuple(h.shape[1:]))
            z = layer.phi(h)
        for m, mode in modes:
            m.training = mode
        return shapes

    # --- the optimizer sees W, b and E; BN affine stays fixed (no LRA rule) -------------------
    def weight_params(self) -> list[nn.Parameter]:
        return [p for layer in self.layers for p in layer.weight.parameters()]

    def param_groups(self, cfg):
        groups = [{"params": [p for p in self.weight_params() if p.requires_grad]}]
        if self.opts.feedback_update != "fixed":
            groups.append({"params": [p for p in self.feedback if p.requires_grad],
                           "lr": cfg.lr * self.opts.feedback_lr_mult})
        return groups

    # --- inference -------------------------------------------------------------------------
    def forward(self, x):
        z = x
        for layer in self.layers:
            z = layer.phi(layer.weight(layer.inp(z)))
        return (z,)

    def readout(self, message):
        return message[0]

    # --- (3) feedback: d_l from the error of its source layer --------------------------------
    def _feedback(self, i: int, e_src: torch.Tensor, E: torch.Tensor) -> torch.Tensor:
        src = self.sources[i]
        if src == i + 1:
            w = self.layers[i + 1].weight
            if isinstance(w, nn.Conv2d):
                # d = E_{l+1}^T * e_{l+1}: transposed convolution onto u_{l+1}'s shape
                u_shape = (e_src.shape[0], w.in_channels, *self._u_hw[i + 1])
                d = torch.nn.grad.conv2d_input(u_shape, E, e_src, w.stride, w.padding, w.dilation, w.groups)
            else:
                d = e_src @ E                                  # d = E_{l+1} e_{l+1}  (E stored as W^T)
            return _unpool(d, self.shapes[i])                 # undo pool/flatten between l and l+1
        return (e_src @ E).reshape(e_src.shape[0], *self.shapes[i])   # d = E_{L->l} e_L (skip)

    def _sweep(self, x, labels, noise: bool) -> _Sweep:
        o = self.opts
        z = x + o.input_noise * torch.randn_like(x) if noise and o.input_noise > 0 else x
        us, hs, zs, stats = [], [], [], []
        for layer in self.layers:                                       # (1) forward
            u = layer.inp(z).detach()                                   # cut: no graph below u_l
            h = layer.weight(u)                                         # h_l = W_l u_l + b_l
            rec = []
            with torch.no_grad():
                z = layer.phi(h.detach(), record=rec)                   # z_l = phi_l(h_l)
            us.append(u), hs.append(h), zs.append(z), stats.append(rec)
        L = len(self.layers)
        logits = zs[-1]
        es, ds = [None] * L, [None] * L
        es[-1] = (logits.softmax(1) - F.one_hot(labels, self.num_classes).to(logits.dtype)).detach()  # (2)
        for i in range(L - 2, -1, -1):                                  # (3) top-down, l = L-1 .. 1
            d = self._feedback(i, es[self.sources[i]], self.feedback[i])  # attached to E only
            with torch.no_grad():
                layer = self.layers[i]
                y = layer.phi(hs[i].detach() - o.beta * d.detach(),
                              stats=stats[i] if stats[i] else None)     # y_l = phi(h_l - beta d_l)
                es[i] = zs[i] - y                                       # e_l = z_l - y_l
            ds[i] = d
        return _Sweep(us, hs, es, ds, logits)

    def _updates(self, s: _Sweep) -> tuple[list, list]:
        """(4) Per-layer updates: [dW_l, db_l] for each layer and dE for each feedback matrix."""
        B = s.logits.shape[0]
        o = self.opts
        dws = []
        for i, layer in enumerate(self.layers):
            params = list(layer.weight.parameters())
            # dW_l = e_l u_l^T / B: autograd inside ONE layer (graph: u_l (detached) -> h_l, params W_l, b_l)
            dws.append(list(torch.autograd.grad(s.h[i], params, grad_outputs=s.e[i] / B)))
        des = []
        for i, E in enumerate(self.feedback):
            if o.feedback_update == "fixed":
                des.append(None)
            elif o.feedback_update == "transpose":
                # dE = gamma dW_{l+1}^T (E has W_{l+1}'s layout); skip links have no W: kept fixed
                des.append(o.gamma * dws[i + 1][0] if self.sources[i] == i + 1 else None)
            else:
                # dE_{j->i} = -gamma d_i e_j^T / B: the outer product of the displacement and the
                # source error, in E's layout (gradient of <d(E), c> wrt E at c = d)
                (g,) = torch.autograd.grad(s.d[i], [E], grad_outputs=s.d[i].detach())
                des.append(-o.gamma * g / B)
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
        for E, delta in zip(self.feedback, des):
            E.grad = self._project(delta)
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
            z = x.detach()
            for layer in self.layers:                       # the true gradient: one chained graph
                z = layer.phi(layer.weight(layer.inp(z)))
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
                   "(Ororbia et al. 2023; mlp/cnn, no residual blocks yet; one stage)")
    recursive = True
    Options = RecLRAOptions
