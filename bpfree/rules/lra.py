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

One training step on a batch (the stages' `step`, `feedback`, `update`; B the batch size):

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

Convolutions (which equation each line implements is marked in `_down` and `_sweep`):
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
layer, from its own statistics). Digits, cnn 16-32-64-64, 8 epochs, lr 2e-3: lra-e 43% -> 99.6%
(backprop 99%); resnet18 width 8: 18% -> 90% (lra-e) and 91% (reclra), backprop 98.9%.

Stages: one per BlockNet block (the output layer rides with the last), declared `top_down`. The
targets of layer l come from the error above it, which exists only after the whole forward pass,
so a batch is three passes over the stages: `step` bottom-up (forward, kept), `feedback` top-down
(the sweep (2)-(3) over the stage's nodes; the signal to the stage below is (e_L, d) with d the
displacement of the node under the boundary, or (e_L,) when that node is skip-linked), `update`
((4)-(6), independent per layer). Feedback matrices are drawn in one global order and each belongs
to the stage of the layer whose error it carries, so any cut learns exactly what one stage learns
(tested), on one process or on several (`--parallel`).

Deviations, each measured (validation splits; numbers in the report of issue 7):
* E ~ N(0, 0.01^2) (LRA-E code: N(0, 1)). Under the transpose rule E_t - W_t stays E_0 - W_0, so a
  small E_0 makes E track what W has learned: resnet18 width 8 on digits, lra-e 48% -> 97% (val),
  Fashion-MNIST mlp 2 epochs 74.6% -> 79.4%. (N(0, 1) vs 0.1 on a digits mlp: 50% vs 64% at 3 epochs.)
* Error units per unit of target step, e_l = (z_l - y_l) / beta (`--scale-errors`, default on). The
  raw z_l - y_l is beta times the error above, so it shrinks geometrically with depth: 10 nodes down
  resnet18 it is below float32's resolution of h_l and the lower blocks learn from rounding noise
  (weight-transport check: update/gradient cosines 0.4 / -0.02 in the stem and first block, 0.84 and
  more everywhere with the scaling); it also mis-weights a residual block's two paths (the body's
  error is one target step, a factor beta, further down than the shortcut's). With Adam the scale
  of an update does not matter, so this changes nothing else.
* Skip links E_{L->l} are kept fixed under `--feedback-update transpose` (they have no forward
  weight to track). The output error is softmax - onehot, the paper's alpha-mixed sign errors are
  not implemented.

Residual networks (`resnet18`), the recursive construction: the layers form a chain of *nodes*, a
plain layer or a residual block z_out = relu(h_out), h_out = BN(W_b phi_a(W_a z_in)) + skip(z_in)
(skip: identity, or a 1x1 conv + BN). Targets are computed for node outputs first, then inside the
blocks, so no derivative ever crosses a layer:

    d_out = displacement from the node above (or E_{L->k} e_L for a skip-linked node)
    e_out = z_out - relu(h_out - beta d_out)      the block's output error (target: y_out)
    e_b = P_b(e_out) / sigma_b, e_s likewise      the last body conv and the shortcut conv write h_out
                                                  through their BNs (P: the BN projection above)
    e_a = z_a - phi_a(h_a - beta E_b^T e_b)       the first conv, from the second's error
    d_in = E_a^T e_a + (e_out | E_s^T e_out)      what the block sends down: its entry convs' errors
                                                  through their feedback kernels, plus the block error
                                                  itself through an identity shortcut

rec-LRA's error-skip links attach to node outputs (every m-th node below the output), which is our
reading of "targets for block outputs first" (the port maps endpoints to block boundaries too;
unverified).

Measured on Fashion-MNIST (bench/lra.sh, 5 epochs, same Adam 1e-3 as E2EBP; bench/results/NOTES.md):
mlp 256x4: lra-e 88.56%, reclra 81.43%, E2EBP 88.85%; resnet18 width 16 on 20k examples: lra-e 88.66%,
reclra 87.85%, E2EBP 90.25%; fixed feedback (FA/DFA-style) 6-9 pt lower. 1.8-2.2x E2EBP's time per
epoch on one CPU process.

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
from .base import LocalOutput, Message, Rule, Stage, StageStats, register_rule

FEEDBACK_UPDATES = ("transpose", "error-product", "fixed")
WEIGHTS = (nn.Linear, nn.Conv2d)
ELEMENTWISE = (nn.ReLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.GELU, nn.Identity, nn.Dropout)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
SHAPE_OPS = (nn.Flatten, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


# --- the network as layers and nodes ------------------------------------------------------------
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


def _entries(node) -> list[int]:
    return node.entries if isinstance(node, Residual) else [node]


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

    def bn_project(self, e: torch.Tensor, h: torch.Tensor, stats: list, through: bool = False) -> torch.Tensor:
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
        sigma = torch.sqrt(var.view(view) + self.post[0].eps)
        xhat = (h - mu.view(view)) / sigma
        e = e - e.mean(dims, keepdim=True) - xhat * (e * xhat).mean(dims, keepdim=True)
        return e / sigma if through else e


def _chain(leaves: list, where: str) -> list[tuple[LRALayer, int]]:
    """(module, block) pairs -> (weight layer with its phi, the block of its weight): shape-only ops
    go to the next layer's input, BN/activations to phi."""
    layers, pre, current = [], [], None
    for m, block in leaves:
        if isinstance(m, WEIGHTS):
            if current is not None:
                layers.append(current)
            current, pre = (LRALayer(pre, m, []), block), []
        elif isinstance(m, SHAPE_OPS) or current is None:
            pre.append(m)              # shape-only ops belong to the next layer's input u_{l+1}
        else:
            current[0].post.append(m)  # BN / activations: phi_l
    if current is None or pre:
        raise BpfreeError(f"LRA needs {where} to end in a Linear/Conv2d layer")
    return layers + [current]


@dataclass
class Graph:
    """The whole network as LRA sees it, shared (read-only) by its stages.

    layers: the weight layers, in forward order; nodes: a layer index or a Residual; block: each
    node's BlockNet block (the head's nodes count as the last block's); skip: whether a node takes
    its displacement from the output error (rec-LRA) rather than from the node above; out_shapes:
    each node's output shape; u_hw: each conv layer's input spatial size (for transposed convs)."""

    layers: list
    nodes: list
    block: list[int]
    skip: list[bool] = field(default_factory=list)
    out_shapes: list = field(default_factory=list)
    u_hw: list = field(default_factory=list)


def _graph(net, recursive: bool, skip_every: int) -> Graph:
    K = len(net.blocks)
    leaves = [(m, k) for k, block in enumerate(net.blocks) for m in _leaves(block, f"block {k + 1}")]
    leaves += [(m, K - 1) for m in _leaves(net.head, "the head")]   # the output layer trains with the last block
    layers, nodes, blocks, run = [], [], [], []

    def close_run():
        for layer, block in _chain(run, "the network") if run else []:
            layers.append(layer)
            nodes.append(len(layers) - 1)
            blocks.append(block)
        run.clear()

    for m, block in leaves:
        if not isinstance(m, BasicBlock):
            run.append((m, block))
            continue
        close_run()
        body = [layer for layer, _ in _chain([(c, block) for c in _leaves(m.body, "a residual block")],
                                             "a residual block's body")]
        if any(layer.pre for layer in body):
            raise BpfreeError("LRA does not support pooling inside a residual block's body")
        first = len(layers)
        layers.extend(body)
        shortcut = None
        if not isinstance(m.shortcut, nn.Identity):
            layers.extend(layer for layer, _ in _chain([(c, block) for c in _leaves(m.shortcut, "a residual shortcut")],
                                                       "a residual shortcut"))
            shortcut = len(layers) - 1
        nodes.append(Residual(list(range(first, first + len(body))), shortcut))
        blocks.append(block)
    close_run()
    if not isinstance(nodes[-1], int):
        raise BpfreeError("LRA needs a network that ends in a Linear/Conv2d output layer")
    if layers[-1].post:
        raise BpfreeError("LRA needs linear logits: the output layer must have no activation")
    empty = sorted(set(range(K)) - set(blocks))
    if empty:
        raise BpfreeError(f"LRA needs a weight layer in every block; block {empty[0] + 1} has none: use fewer --blocks")
    N = len(nodes)
    # rec-LRA's error-skip links: every m-th node below the output takes its displacement from the
    # output error (E_{L->k}); the others from the node above (LRA-E's adjacent link).
    skip = [recursive and k < N - 1 and (N - 1 - k) % skip_every == 0 for k in range(N)]
    g = Graph(layers, nodes, blocks, skip)
    g.out_shapes, g.u_hw = _trace(g, net.in_shape)
    return g


def _walk(nodes, z, run) -> tuple[torch.Tensor, dict]:
    """Run `nodes` on z; `run(j, z_in) -> z_j` computes layer j. Residual blocks add their shortcut
    and apply the block's ReLU. Returns the output and {node index: (h_out, z_out)} per residual."""
    outs = {}
    for k, node in nodes:
        if isinstance(node, Residual):
            q = z
            for j in node.body:
                q = run(j, q)
            h = q + (z if node.shortcut is None else run(node.shortcut, z))
            z = h.relu()
            outs[k] = (h, z)
        else:
            z = run(node, z)
    return z, outs


@torch.no_grad()
def _trace(g: Graph, in_shape) -> tuple[list, list]:
    """Node output shapes and each layer's input spatial size, from one eval-mode pass."""
    modules = nn.ModuleList(g.layers)
    modes = [(m, m.training) for m in modules.modules()]
    modules.eval()
    u_hw, z_of = [None] * len(g.layers), {}

    def run(j, z):
        layer = g.layers[j]
        u = layer.inp(z)
        u_hw[j] = tuple(u.shape[2:])
        z_of[j] = layer.phi(layer.weight(u))
        return z_of[j]
    _, outs = _walk(list(enumerate(g.nodes)), torch.zeros(2, *in_shape), run)
    for m, mode in modes:
        m.training = mode
    out_shapes = [tuple((outs[k][1] if k in outs else z_of[n]).shape[1:]) for k, n in enumerate(g.nodes)]
    return out_shapes, u_hw


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


# --- one stage: a contiguous run of nodes ---------------------------------------------------------
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
class _Pass:
    """One forward pass of a stage (dicts keyed by global layer / node index)."""

    u: dict            # detached layer inputs u_l
    h: dict            # pre-activations, attached to W_l only
    z: dict            # activities z_l (no graph)
    stats: dict        # BN batch statistics recorded by each layer's phi
    outs: dict         # residual node -> (h_out, z_out)
    out: torch.Tensor  # the stage's output (the logits for the last stage)


@dataclass
class _Errors:
    """What a stage's part of the target sweep produces."""

    e: dict            # error units e_l per layer (e_L = softmax - onehot at the output), detached
    d: dict            # feedback name -> the displacement it produced, attached to that matrix only
    block_e: dict      # residual node index -> its output error e_out (before any BN projection)
    e_out: torch.Tensor  # the output error e_L, which every stage needs for rec-LRA's skip links


class LRAStage(Stage):
    """Nodes a..b-1 of the network, their layers and the feedback matrices they own.

    `step` runs the forward pass and keeps it; `feedback(signal)` takes the signal from the stage
    above (nothing, for the last stage: it has the logits), sets the targets and error units of its
    layers top-down and returns the signal for the stage below; `update` applies the local updates.
    The signal is (e_L,) plus, unless the node below is skip-linked, its displacement d.
    A feedback matrix belongs to the stage whose errors it carries: E_j (W_j's shape) to layer j's
    stage, E_{L->k} to node k's stage.
    """

    def __init__(self, g: Graph, a: int, b: int, feedback: dict, opts, num_classes: int):
        super().__init__(f"lra{g.block[a]}")
        self.g, self.a, self.b = g, a, b
        self.opts, self.num_classes = opts, num_classes
        self.own = [j for k in range(a, b) for j in self._layers_of(g.nodes[k])]
        self.layers = nn.ModuleDict({str(j): g.layers[j] for j in self.own})
        self.feedback_weights = nn.ParameterDict(feedback)
        self.is_last = b == len(g.nodes)
        self.stats = LRAStats()
        self.above: list["LRAStage"] = []   # the stages above (set by the rule; for the alignment probe)
        self._pass: Optional[_Pass] = None      # kept from step to update
        self._errors: Optional[_Errors] = None
        self._labels: Optional[torch.Tensor] = None

    @staticmethod
    def _layers_of(node) -> list[int]:
        return node.body + ([node.shortcut] if node.shortcut is not None else []) if isinstance(node, Residual) else [node]

    def layer(self, j: int) -> LRALayer:
        return self.layers[str(j)]

    def _nodes(self):
        return [(k, self.g.nodes[k]) for k in range(self.a, self.b)]

    # --- the optimizer sees W, b and E; BN affine stays fixed (no LRA rule) -------------------
    def weight_params(self) -> list[nn.Parameter]:
        return [p for j in self.own for p in self.layer(j).weight.parameters()]

    def param_groups(self, cfg):
        groups = [{"params": [p for p in self.weight_params() if p.requires_grad]}]
        if self.opts.feedback_update != "fixed":
            groups.append({"params": [p for p in self.feedback_weights.values() if p.requires_grad],
                           "lr": cfg.lr * self.opts.feedback_lr_mult})
        return groups

    # --- inference -------------------------------------------------------------------------
    def _plain(self, j, z):
        layer = self.layer(j)
        return layer.phi(layer.weight(layer.inp(z)))

    def forward(self, x):
        return (_walk(self._nodes(), x, self._plain)[0],)

    def readout(self, message):
        return message[0] if self.is_last else None

    # --- (1) forward ---------------------------------------------------------------------------
    def _forward(self, x: torch.Tensor, noise: bool) -> _Pass:
        o = self.opts
        if noise and o.input_noise > 0 and self.a == 0:                 # noise on the network input only
            x = x + o.input_noise * torch.randn_like(x)
        p = _Pass({}, {}, {}, {}, {}, x)

        def run(j, z_in):
            layer = self.layer(j)
            u = layer.inp(z_in).detach()                                # cut: no graph below u_l
            h = layer.weight(u)                                         # h_l = W_l u_l + b_l
            rec = []
            with torch.no_grad():
                z_out = layer.phi(h.detach(), record=rec)               # z_l = phi_l(h_l)
            p.u[j], p.h[j], p.z[j], p.stats[j] = u, h, z_out, rec
            return z_out
        p.out, p.outs = _walk(self._nodes(), x, run)    # no graph beyond each layer's h_l
        return p

    # --- (2)-(3) the target sweep over this stage's nodes ----------------------------------
    def _down(self, j: int, e: torch.Tensor, d: dict) -> torch.Tensor:
        """Layer j's error e_j carried to its input u_j through E_j (W_j's shape): d = E_j^T e_j."""
        w, E = self.layer(j).weight, self.feedback_weights[f"W{j}"]
        if isinstance(w, nn.Conv2d):
            # the transposed convolution of e_j with E_j, onto u_j's shape (W_j's stride/padding)
            u_shape = (e.shape[0], w.in_channels, *self.g.u_hw[j])
            out = torch.nn.grad.conv2d_input(u_shape, E, e, w.stride, w.padding, w.dilation, w.groups)
        else:
            out = e @ E                                        # d = E_j e_j  (E stored as W^T)
        d[f"W{j}"] = out
        return out

    def _from_above(self, k: int, r: _Errors) -> torch.Tensor:
        """The displacement node k gets from node k+1 (this stage's): its entry layers' errors through
        their feedback kernels, plus the block error through an identity shortcut, unpooled."""
        above = self.g.nodes[k + 1]
        if not isinstance(above, Residual):
            return _unpool(self._down(above, r.e[above], r.d), self.g.out_shapes[k])
        total = self._down(above.body[0], r.e[above.body[0]], r.d)
        if above.shortcut is None:
            total = total + r.block_e[k + 1]     # an identity shortcut passes the block's error straight down
        else:
            total = total + self._down(above.shortcut, r.e[above.shortcut], r.d)
        return _unpool(total, self.g.out_shapes[k])            # undo pool/flatten between the nodes

    def _sweep(self, p: _Pass, signal: Message, labels: torch.Tensor) -> tuple[_Errors, Message]:
        o, g = self.opts, self.g
        if self.is_last:                                                # (2) e_L = softmax(z_L) - onehot(y)
            e_out = (p.out.softmax(1) - F.one_hot(labels, self.num_classes).to(p.out.dtype)).detach()
        else:
            e_out = signal[0]
        r = _Errors({}, {}, {}, e_out)
        B = e_out.shape[0]

        def project(j, e, through=False):                               # what layer j's BN cancels
            return self.layer(j).bn_project(e, p.h[j].detach(), p.stats[j], through) if o.bn_project else e

        unit = o.beta if o.scale_errors else 1.0                        # e_l per unit of target step

        def target_error(j, dj):                                        # y_l = phi(h_l - beta d_l)
            with torch.no_grad():
                y = self.layer(j).phi(p.h[j].detach() - o.beta * dj.detach(), stats=p.stats[j] or None)
                return project(j, (p.z[j] - y) / unit)                  # e_l = z_l - y_l
        for k in range(self.b - 1, self.a - 1, -1):                     # (3) top-down over the nodes
            node = g.nodes[k]
            if k == len(g.nodes) - 1:
                r.e[node] = e_out                                       # the output layer
                continue
            if g.skip[k]:                                               # rec-LRA: d_k = E_{L->k} e_L
                r.d[f"S{k}"] = (e_out @ self.feedback_weights[f"S{k}"]).reshape(B, *g.out_shapes[k])
                dk = r.d[f"S{k}"]
            else:                                                       # LRA-E: from the node above,
                dk = self._from_above(k, r) if k + 1 < self.b else signal[1]   # or from the stage above
            if not isinstance(node, Residual):
                r.e[node] = target_error(node, dk)
                continue
            h_out, z_out = p.outs[k]                                    # the block's output target
            r.block_e[k] = ((z_out - (h_out - o.beta * dk.detach()).relu()) / unit).detach()   # relu(h_out - beta d)
            r.e[node.last] = project(node.last, r.block_e[k], True)     # the last body layer and the
            if node.shortcut is not None:                               # shortcut write h_out directly
                r.e[node.shortcut] = project(node.shortcut, r.block_e[k], True)
            for i in range(len(node.body) - 2, -1, -1):                 # then, inside the block
                j = node.body[i]
                r.e[j] = target_error(j, self._down(node.body[i + 1], r.e[node.body[i + 1]], r.d))
        if self.a == 0:
            return r, ()
        if g.skip[self.a - 1]:
            return r, (e_out,)
        return r, (e_out, self._from_above(self.a - 1, r).detach())

    # --- (4) local updates -------------------------------------------------------------------
    def _updates(self, p: _Pass, r: _Errors) -> tuple[dict, dict]:
        """Per-layer updates {j: [dW_l, db_l]} and dE per feedback matrix (name -> dE or None)."""
        B = r.e_out.shape[0]
        o = self.opts
        dws = {}
        for j in self.own:
            params = list(self.layer(j).weight.parameters())
            # dW_l = e_l u_l^T / B: autograd inside ONE layer (graph: u_l (detached) -> h_l, params W_l, b_l)
            dws[j] = list(torch.autograd.grad(p.h[j], params, grad_outputs=r.e[j] / B))
        des = {}
        for name, E in self.feedback_weights.items():
            if o.feedback_update == "fixed":
                des[name] = None
            elif o.feedback_update == "transpose":
                # dE_j = gamma dW_j^T (E_j has W_j's layout); skip links have no W: kept fixed
                des[name] = o.gamma * dws[int(name[1:])][0] if name[0] == "W" else None
            else:
                # dE = -gamma d e^T / B: the outer product of the displacement and the source error,
                # in E's layout (gradient of <d(E), c> wrt E at c = d)
                (grad,) = torch.autograd.grad(r.d[name], [E], grad_outputs=r.d[name].detach())
                des[name] = -o.gamma * grad / B
        return dws, des

    def _project(self, t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """(5) Ball projection: Delta <- c Delta / ||Delta|| if ||Delta|| > c."""
        c = self.opts.clip
        if t is None or c <= 0:
            return t
        n = t.norm()
        return t * (c / n) if n > c else t

    # --- training: step (forward), feedback (targets), update ---------------------------------
    def step(self, message, labels):
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

    def feedback(self, signal, labels):
        self._errors, down = self._sweep(self._pass, tuple(t.detach() for t in signal), labels)
        self._labels = labels
        return down

    def update(self):
        p, r = self._pass, self._errors
        dws, des = self._updates(p, r)
        self.optimizer.zero_grad(set_to_none=True)
        for j in self.own:
            for param, delta in zip(self.layer(j).weight.parameters(), dws[j]):
                param.grad = self._project(delta)                       # (6) through the optimizer
        for name, E in self.feedback_weights.items():
            E.grad = self._project(des[name])
        self.optimizer.step()
        self.scheduler.step()
        if self.is_last:      # the output's cross-entropy
            loss = F.cross_entropy(p.out, self._labels)
        else:                 # below it, how far activities are from their targets: sum_l ||e_l||^2 / 2B
            loss = sum(r.e[j].pow(2).sum() for j in self.own) / (2 * r.e_out.shape[0])
        self.stats.add(LocalOutput(loss, (p.out,), p.out if self.is_last else None), self._labels)
        self._pass = self._errors = self._labels = None


# --- the update/gradient alignment diagnostic -----------------------------------------------------
def _bn_buffers(stages):
    return [(m, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
            for s in stages for m in s.modules() if isinstance(m, NORMS) and m.track_running_stats]


def alignment(stages: list[LRAStage], x: torch.Tensor, labels: torch.Tensor) -> list[list[float]]:
    """Cosine between each layer's LRA weight update and the true backprop gradient of the
    cross-entropy on (x, labels), per stage (`stages`: consecutive, the last holding the output;
    x: the first one's input). The output layer's is 1: its LRA update is the CE gradient.
    Nothing is updated; BN running statistics are left as they were."""
    saved = _bn_buffers(stages)
    try:
        passes, m = [], x.detach()
        for s in stages:
            passes.append(s._forward(m, noise=False))
            m = passes[-1].out
        signal, errors = (), [None] * len(stages)
        for i in range(len(stages) - 1, -1, -1):
            errors[i], signal = stages[i]._sweep(passes[i], signal, labels)
        dws = [s._updates(p, r)[0] for s, p, r in zip(stages, passes, errors)]
        z = x.detach()                                  # the true gradient: one chained graph
        for s in stages:
            z = _walk(s._nodes(), z, s._plain)[0]
        weights = [s.layer(j).weight.weight for s in stages for j in s.own]
        grads = iter(torch.autograd.grad(F.cross_entropy(z, labels), weights))
    finally:
        for mod, mean, var, n in saved:
            mod.running_mean.copy_(mean), mod.running_var.copy_(var), mod.num_batches_tracked.copy_(n)
    return [[float(F.cosine_similarity(dw[j][0].flatten(), next(grads).flatten(), dim=0)) for j in s.own]
            for s, dw in zip(stages, dws)]


def _feedback_matrices(g: Graph, opts, num_classes: int) -> dict[str, tuple[int, nn.Parameter]]:
    """Every feedback matrix, name -> (the node whose stage owns it, E), drawn in one fixed order so
    the network's E does not depend on how it is cut into stages."""
    def like(j):
        return nn.Parameter(torch.randn(g.layers[j].weight.weight.shape) * opts.feedback_init_std)
    out, N = {}, len(g.nodes)
    for k in range(N - 1):
        if g.skip[k]:                        # E_{L->k}: classes x prod(node k's output)
            shape = (num_classes, math.prod(g.out_shapes[k]))
            out[f"S{k}"] = (k, nn.Parameter(torch.randn(shape) * opts.feedback_init_std))
        else:                                # E_j: the shape of W_j, for each layer reading node k
            for j in _entries(g.nodes[k + 1]):
                out[f"W{j}"] = (k + 1, like(j))
    for k, node in enumerate(g.nodes):       # inside residual bodies: layer to layer
        if isinstance(node, Residual):
            for j in node.body[1:]:
                out[f"W{j}"] = (k, like(j))
    return out


@dataclass
class LRAOptions:
    beta: float = field(default=0.1, metadata={"positive": True,
        "help": "target nudge: y_l = phi(h_l - beta d_l) (LRA-E code: 0.1; rec-LRA value unverified)"})
    gamma: float = field(default=1.0, metadata={"min": 0.0,
        "help": "feedback update scale gamma (LRA-E code: 1.0)"})
    feedback_update: str = field(default="transpose", metadata={"choices": FEEDBACK_UPDATES, "help":
        "transpose: dE = gamma dW^T (LRA-E code); error-product: dE = -gamma d e^T (rec-LRA Eq. 6 as "
        "reported by a port, unverified); fixed: E never changes"})
    feedback_init_std: float = field(default=0.01, metadata={"positive": True,
        "help": "E ~ N(0, std^2) at start (LRA-E code: 1.0; 0.01 aligns far sooner, measured)"})
    feedback_lr_mult: float = field(default=1.0, metadata={"positive": True,
        "help": "feedback matrices' lr = this x --lr (LRA-E code: same optimizer, 1)"})
    clip: float = field(default=1.0, metadata={"min": 0.0,
        "help": "update-norm ball radius c per tensor, 0 = off (used in every rec-LRA run; value unverified)"})
    input_noise: float = field(default=0.0, metadata={"min": 0.0,
        "help": "std of Gaussian noise added to the input in training (rec-LRA appendix: 0.1, unverified)"})
    scale_errors: bool = field(default=True, metadata={"help":
        "error units per unit of target step, e_l = (z_l - y_l) / beta (ours: the raw z_l - y_l shrinks "
        "by beta per layer and is float32 rounding noise 10 layers down)"})
    bn_project: bool = field(default=True, metadata={"help":
        "remove from each error what the layer's BatchNorm cancels (per-channel batch mean and xhat "
        "component; our BN adaptation: the papers give BN no rule)"})
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
                   "Hebbian local updates e_l u_l^T, learned feedback E (Ororbia & Mali 2019; a stage per block)")
    schedules = ("simultaneous",)
    recursive = False
    Options = LRAOptions
    top_down = True

    def build_stages(self, net, options):
        g = _graph(net, self.recursive, getattr(options, "skip_every", 1))
        feedback, N = _feedback_matrices(g, options, net.num_classes), len(g.nodes)
        cuts = [k for k in range(1, N) if g.block[k] != g.block[k - 1]] + [N]   # one stage per block
        stages, a = [], 0
        for b in cuts:
            owned = {name: E for name, (k, E) in feedback.items() if a <= k < b}
            stages.append(LRAStage(g, a, b, owned, options, net.num_classes))
            a = b
        for i, stage in enumerate(stages):
            stage.above = stages[i + 1:]
        return stages

    def alignment(self, x, labels) -> list[float]:
        """The update/gradient cosine of every weight layer, bottom to top (see `alignment`)."""
        return [c for stage in alignment(list(self.stages), x, labels) for c in stage]


@register_rule
class RecLRA(LRAE):
    name = "reclra"
    description = ("rec-LRA: LRA-E plus error-skip links from the output every m layers "
                   "(Ororbia et al. 2023; mlp, cnn, resnet18 via residual nodes; a stage per block)")
    recursive = True
    Options = RecLRAOptions
