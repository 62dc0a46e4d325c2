"""The network as LRA sees it: weight layers with their phi, grouped into nodes (a layer or a residual block).

`build_graph(net)` reads a BlockNet's blocks and head as a chain of `LRALayer`s (u = pre(z_prev),
h = W u + b, z = phi(h)) and groups them into nodes; `walk` runs nodes with any per-layer function;
`unpool` carries a feedback signal back over the shape-only ops between two nodes. Nothing here
learns: the algorithm is in `stage.py`.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import BpfreeError
from ...models import BasicBlock
from ...models.modes import evaluating

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

    @property
    def layers(self) -> list[int]:
        """Every layer of the block: the body, then the shortcut conv if there is one."""
        return self.body + ([self.shortcut] if self.shortcut is not None else [])


def entries(node) -> list[int]:
    """The layers that read a node's input."""
    return node.entries if isinstance(node, Residual) else [node]


def layers_of(node) -> list[int]:
    """The layers a node consists of."""
    return node.layers if isinstance(node, Residual) else [node]


class LRALayer(nn.Module):
    """u = pre(z_prev); h = W u + b; z = phi(h). `post` holds phi's modules (BN, activation)."""

    def __init__(self, pre: list[nn.Module], weight: nn.Module, post: list[nn.Module]):
        super().__init__()
        self.pre, self.weight, self.post = nn.ModuleList(pre), weight, nn.ModuleList(post)

    def input_map(self, z_prev: torch.Tensor) -> torch.Tensor:
        """u_l = pool_l(z_{l-1}): the shape-only ops in front of the weight layer."""
        for module in self.pre:
            z_prev = module(z_prev)
        return z_prev

    def phi(self, h, stats: Optional[list] = None, record: Optional[list] = None):
        """phi_l(h). With `record` (training forward): BN uses and appends its batch statistics.
        With `stats`: BN normalises with those recorded statistics (the target pass)."""
        norm_index = 0
        for module in self.post:
            if isinstance(module, NORMS):
                if stats is not None:
                    mu, var = stats[norm_index]
                    norm_index += 1
                elif record is not None and module.training:
                    mu, var = _batch_statistics(module, h)
                    record.append((mu, var))
                else:
                    h = module(h)
                    continue
                # the forward and the target pass normalise by one function of the same statistics, so
                # z_l - y_l is exactly 0 where d_l is (BN's training kernel rounds differently: in the
                # layers whose errors are tiny, that difference would be most of e_l)
                h = F.batch_norm(h, mu, var, module.weight, module.bias, False, 0.0, module.eps)
            else:
                h = module(h)                # (in-place activations were made out-of-place: `_chain`)
        return h

    def weight_update(self, u: torch.Tensor, e: torch.Tensor) -> list[torch.Tensor]:
        """[dW, db] = [e u^T, sum of e] over the batch: the weight gradient of h = W u + b at output
        gradient e, computed directly (Linear: one product; Conv2d: the weight-gradient kernel)."""
        weight = self.weight
        conv = isinstance(weight, nn.Conv2d)
        dw = conv_backward(weight, u, weight.weight, e, "weight") if conv else e.t() @ u
        return [dw] if weight.bias is None else [dw, e.sum((0, 2, 3) if conv else 0)]

    def bn_project(self, e: torch.Tensor, h: torch.Tensor, stats: list, through: bool = False,
                   scale: float = 1.0) -> torch.Tensor:
        """Remove from e what the layer's train-mode BatchNorm cancels: per channel, its batch mean and
        its component along the normalised input xhat (BN's output is invariant to shifting or scaling
        a channel of h, so an update along those directions does nothing but grow or shift W).
        e' = e - mean(e) - xhat mean(e xhat), means over batch and space: BN's input Jacobian without
        its 1/sigma (as LRA drops phi'); `through` divides by sigma as well. Returns scale * e'.
        Only when BN reads h directly and the forward recorded stats (else scale * e)."""
        if not stats or not self.post or not isinstance(self.post[0], NORMS):
            return e if scale == 1.0 else e * scale
        mu, var = stats[0]
        eps = self.post[0].eps
        invstd = torch.rsqrt(var + eps)
        # BN's own input-gradient kernel at gamma = 1 computes (e - mean(e) - xhat mean(e xhat)) / sigma
        # in one fused pass (the same formula written out takes ~7 passes over e)
        e = torch.ops.aten.native_batch_norm_backward(e, h, None, None, None, mu, invstd, True, eps,
                                                      [True, False, False])[0]
        if through:
            return e if scale == 1.0 else e.mul_(scale)
        return e.mul_((scale / invstd).view((1, -1) + (1,) * (e.dim() - 2)))


def conv_backward(conv: nn.Conv2d, u: torch.Tensor, kernel: torch.Tensor, e: torch.Tensor, wrt: str) -> torch.Tensor:
    """The gradient wrt the kernel (`wrt="weight"`) or wrt u (`"input"`) of conv(u; kernel), with conv's
    stride/padding, at output gradient e: torch's convolution backward kernel, called with the real
    u and kernel. (torch.nn.grad's helpers pass zero-stride stand-ins for the one they do not need,
    which make the kernel copy the trainer's channels-last u and e to NCHW first.)"""
    grads = torch.ops.aten.convolution_backward(e, u, kernel, None, conv.stride, conv.padding, conv.dilation,
                                                False, [0] * len(conv.stride), conv.groups,
                                                [wrt == "input", wrt == "weight", False])
    return grads[0] if wrt == "input" else grads[1]


def _batch_statistics(norm: nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A train-mode BatchNorm's batch mean and biased variance of h, with its running statistics
    updated as the module itself would (unbiased variance, momentum). BN's own kernel gives them
    (its normalised output is not used, see `phi`): on CPU it is ~4x faster than `torch.var_mean`."""
    momentum = 0.0
    if norm.track_running_stats:
        norm.num_batches_tracked.add_(1)
        momentum = norm.momentum if norm.momentum is not None else 1.0 / float(norm.num_batches_tracked)
    _, mu, invstd = torch.native_batch_norm(h, None, None, norm.running_mean, norm.running_var, True,
                                            momentum, norm.eps)
    return mu, (invstd.pow(-2) - norm.eps).clamp_(min=0.0)


def _out_of_place(module: nn.Module) -> nn.Module:
    """phi must not overwrite h (the targets and updates read it): an in-place activation is used as a
    shallow copy with inplace=False (activations hold no state), which saves phi a clone of h."""
    if getattr(module, "inplace", False):
        module = copy.copy(module)
        module.inplace = False
    return module


def _chain(leaves: list, where: str) -> list[tuple[LRALayer, int]]:
    """(module, block) pairs -> (weight layer with its phi, the block of its weight): shape-only ops
    go to the next layer's input, BN/activations to phi."""
    layers, pre, current = [], [], None
    for module, block in leaves:
        if isinstance(module, WEIGHTS):
            if current is not None:
                layers.append(current)
            current, pre = (LRALayer(pre, module, []), block), []
        elif isinstance(module, SHAPE_OPS) or current is None:
            pre.append(module)              # shape-only ops belong to the next layer's input u_{l+1}
        else:
            current[0].post.append(_out_of_place(module))  # BN / activations: phi_l
    if current is None or pre:
        raise BpfreeError(f"LRA needs {where} to end in a Linear/Conv2d layer")
    return layers + [current]


@dataclass
class Graph:
    """The whole network as LRA sees it, shared (read-only) by its stages.

    layers: the weight layers, in forward order; nodes: a layer index or a Residual; block: each
    node's BlockNet block (the head's nodes count as the last block's); skip: whether a node takes
    its displacement from the output error (rec-LRA) rather than from the node above; out_shapes:
    each node's output shape."""

    layers: list
    nodes: list
    block: list[int]
    skip: list[bool] = field(default_factory=list)
    out_shapes: list = field(default_factory=list)


def build_graph(net, recursive: bool, skip_every: int) -> Graph:
    """The graph of a BlockNet; with `recursive`, every `skip_every`-th node below the output is
    skip-linked to the output error (rec-LRA)."""
    num_blocks = len(net.blocks)
    leaves = [(module, k) for k, block in enumerate(net.blocks) for module in _leaves(block, f"block {k + 1}")]
    # the output layer trains with the last block
    leaves += [(module, num_blocks - 1) for module in _leaves(net.head, "the head")]
    layers, nodes, blocks, run = [], [], [], []

    def close_run():
        for layer, block in _chain(run, "the network") if run else []:
            layers.append(layer)
            nodes.append(len(layers) - 1)
            blocks.append(block)
        run.clear()

    for module, block in leaves:
        if not isinstance(module, BasicBlock):
            run.append((module, block))
            continue
        close_run()
        body = [layer for layer, _ in _chain([(c, block) for c in _leaves(module.body, "a residual block")],
                                             "a residual block's body")]
        if any(layer.pre for layer in body):
            raise BpfreeError("LRA does not support pooling inside a residual block's body")
        first = len(layers)
        layers.extend(body)
        shortcut = None
        if not isinstance(module.shortcut, nn.Identity):
            shortcut_leaves = [(c, block) for c in _leaves(module.shortcut, "a residual shortcut")]
            layers.extend(layer for layer, _ in _chain(shortcut_leaves, "a residual shortcut"))
            shortcut = len(layers) - 1
        nodes.append(Residual(list(range(first, first + len(body))), shortcut))
        blocks.append(block)
    close_run()
    if not isinstance(nodes[-1], int):
        raise BpfreeError("LRA needs a network that ends in a Linear/Conv2d output layer")
    if layers[-1].post:
        raise BpfreeError("LRA needs linear logits: the output layer must have no activation")
    empty = sorted(set(range(num_blocks)) - set(blocks))
    if empty:
        raise BpfreeError(f"LRA needs a weight layer in every block; block {empty[0] + 1} has none: use fewer --blocks")
    num_nodes = len(nodes)
    # rec-LRA's error-skip links: every m-th node below the output takes its displacement from the
    # output error (E_{L->k}); the others from the node above (LRA-E's adjacent link).
    skip = [recursive and k < num_nodes - 1 and (num_nodes - 1 - k) % skip_every == 0 for k in range(num_nodes)]
    graph = Graph(layers, nodes, blocks, skip)
    graph.out_shapes = _trace(graph, net.in_shape)
    return graph


def walk(nodes, z, layer_fn: Callable[[int, torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """Run `nodes` ((index, node) pairs) on z; `layer_fn(j, z_in) -> z_j` computes layer j. Residual
    blocks add their shortcut and apply the block's ReLU. Returns the output and
    {node index: (h_out, z_out)} per residual."""
    outs = {}
    for k, node in nodes:
        if isinstance(node, Residual):
            body_out = z
            for j in node.body:
                body_out = layer_fn(j, body_out)
            h = body_out + (z if node.shortcut is None else layer_fn(node.shortcut, z))
            z = h.relu()
            outs[k] = (h, z)
        else:
            z = layer_fn(node, z)
    return z, outs


@torch.no_grad()
def _trace(graph: Graph, in_shape) -> list:
    """Node output shapes, from one eval-mode pass."""
    z_of = {}

    def layer_fn(j, z):
        layer = graph.layers[j]
        z_of[j] = layer.phi(layer.weight(layer.input_map(z)))
        return z_of[j]
    with evaluating(*graph.layers):
        _, outs = walk(list(enumerate(graph.nodes)), torch.zeros(2, *in_shape), layer_fn)
    return [tuple((outs[k][1] if k in outs else z_of[node]).shape[1:]) for k, node in enumerate(graph.nodes)]


def unpool(d: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Map a feedback signal from u_{l+1}'s shape back to h_l's shape (transpose of the pooling and
    flatten ops up to scale: reshape, broadcast over space, or nearest upsampling)."""
    if tuple(d.shape[1:]) == shape:
        return d
    batch = d.shape[0]
    if len(shape) == 3:
        channels, height, width = shape
        if d.dim() == 2:
            if d.shape[1] == channels * height * width:
                return d.reshape(batch, channels, height, width)
            if d.shape[1] == channels:                      # global pool: broadcast over space
                return d[:, :, None, None].expand(batch, channels, height, width)
            side = int(math.isqrt(d.shape[1] // channels))
            d = d.reshape(batch, channels, side, side)
        return F.interpolate(d, size=(height, width), mode="nearest")
    return d.reshape(batch, *shape)
