"""AugLocal: local learning with augmented auxiliary networks (Ma, Wu, Si, Tan, "Scaling Supervised Local
Learning with Augmented Auxiliary Networks", ICLR 2024, arXiv 2402.17318; released code:
ChenxiangMA/AugLocal, networks/auxiliary_nets.py `unifSamp`, networks/resnet.py, train.py).

The network's units u_0 .. u_{n-1} are grouped into K blocks; block k ends at unit e_k. Per batch:

    h_k  = block_k(detach(h_{k-1}))
    L_k  = CE(aux_k(h_k), y)            k < K: updates block_k and aux_k
    L_K  = CE(head(h_K), y)             the last block trains through the network's own head

    aux_k = classifier ∘ copy(u_{s_d}) ∘ ... ∘ copy(u_{s_1})        fresh copies, never the main units
    s_j   = round(e_k + j · (n-1-e_k) / d_k),  j = 1..d_k          a uniform sample of the units after
                                                                    block k, always ending at u_{n-1}
            (every following unit when d_k >= n-1-e_k)
    d_k   = max(1, round(d · (1 - r_k) + r_k)),  r_k = τ · (k-1) / (K-2)      the pyramid: d at block 1,
                                                                    falling linearly to d(1-τ)+τ at K-1
    classifier = Linear(flatten(avgpool_1x1(.)))                    BatchNorm1d before the Linear when d_k <= 1

`--aux-depth` is d (the released README: 2 for ResNet-32, 3 for ResNet-110), `--pyramid` is τ (the
released runs: 0.5; 0 gives every aux net depth d, the released code without --pyramid). round() is
Python's (halves to even), as in the released code, so the sampled units and depths are its own.

Deviations from the released code, each with why:
* Blocks are bpfree's (`--blocks K`, `--split`) and K is the number of blocks trained: the released
  train.py turns --local_module_num K into K-d modules (the last d layers join the last module), so its
  "ResNet-32, K=16, d=2" trains 14 modules.
* A sampled unit whose input shape differs from what reaches it (units skipped between two samples
  changed the channels or the resolution) gets an adapter in front: average pooling to its input size,
  then a 1x1 conv-BN-ReLU to its input channels (Linear-ReLU for vector units). The released code
  rebuilds the sampled ResNet block with the incoming channels, a stride-2 conv and a projection
  shortcut; an adapter works for any unit (mlp, cnn, vgg11, resnets) without knowing its insides.
* Copies are initialised as bpfree's models are (PyTorch's defaults; BatchNorm statistics reset);
  the released code He-initialises every conv. Parameters without `reset_parameters` keep the
  copied values (as separate tensors).
* No width factor (the released --aux_net_widen, default 1): copies keep their units' widths.
* Simultaneous schedule only: the paper defines no greedy (sequential) variant.
"""
from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import BpfreeError
from ..models.modes import evaluating
from ..options import option
from .base import Rule, register_rule
from .heads import token_head
from .local import CrossEntropy, LocalBlock


def pyramid_depths(depth: int, decay: float, blocks: int) -> list[int]:
    """d_k of the aux nets of blocks 1..K-1: d at block 1, falling linearly to d(1-τ)+τ at block K-1."""
    span = blocks - 2
    ratios = [m * decay / span if span > 0 else 0.0 for m in range(blocks - 1)]
    return [max(1, round(depth * (1 - r) + r)) for r in ratios]


def sample_units(last: int, n: int, depth: int) -> list[int]:
    """Indices of `depth` units spread uniformly over those after unit `last` (of n), ending at n-1."""
    following = n - 1 - last
    if depth >= following:
        return list(range(last + 1, n))
    return [round(last + following / depth * j) for j in range(1, depth + 1)]


def units_of(net) -> list[nn.Module]:
    """The network's units in order: the members of each block (a block that is no nn.Sequential is one)."""
    return [u for block in net.blocks for u in (block if isinstance(block, nn.Sequential) else [block])]


@torch.no_grad()
def _unit_shapes(net, units: list[nn.Module]) -> list[tuple[int, ...]]:
    """Input shape of each unit, then the last unit's output shape (traced in eval mode, modes restored)."""
    x, shapes = torch.zeros(2, *net.in_shape), [tuple(net.in_shape)]
    with evaluating(net):
        for unit in units:
            x = unit(x)
            shapes.append(tuple(x.shape[1:]))
    return shapes


def _fresh_copy(unit: nn.Module) -> nn.Module:
    """The unit's architecture with new parameters and statistics (nothing shared with the original)."""
    unit = copy.deepcopy(unit)
    for m in unit.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return unit


def _adapter(got: tuple[int, ...], want: tuple[int, ...]) -> list[nn.Module]:
    """Layers turning a (C,H,W) or (D,) tensor of shape `got` into the shape a copied unit expects."""
    if got == want:
        return []
    if len(want) == 1:
        flatten = [nn.Flatten()] if len(got) > 1 else []
        return flatten + [nn.Linear(math.prod(got), want[0]), nn.ReLU(inplace=True)]
    if len(got) != len(want):
        raise BpfreeError(f"auglocal cannot feed a unit expecting {want} from a block output of shape {got}")
    layers: list[nn.Module] = []
    if got[1:] != want[1:]:
        layers.append(nn.AdaptiveAvgPool2d(want[1:]))
    if got[0] != want[0]:
        layers += [nn.Conv2d(got[0], want[0], 1, bias=False), nn.BatchNorm2d(want[0]), nn.ReLU(inplace=True)]
    return layers


def _classifier(shape: tuple[int, ...], num_classes: int, batch_norm: bool, per_position: bool) -> list[nn.Module]:
    """Global average pooling (for maps), [BatchNorm1d], Linear: the released aux net's last layers;
    for tokens (T, D), LayerNorm + Linear (per position for a language model, else on the mean token)."""
    if len(shape) == 2:
        return [token_head(shape[1], num_classes, per_position)]
    pool = [nn.AdaptiveAvgPool2d(1), nn.Flatten()] if len(shape) == 3 else []
    norm = [nn.BatchNorm1d(shape[0])] if batch_norm else []
    return pool + norm + [nn.Linear(shape[0], num_classes)]


def _augmented_aux(units, shapes, last: int, depth: int, num_classes: int,
                   per_position: bool = False) -> tuple[nn.Sequential, list[int]]:
    """Block k's aux net (ending at unit `last`, nominal depth d_k) and the indices of the units it copies."""
    sampled = sample_units(last, len(units), depth)
    layers, shape = [], shapes[last + 1]
    for i in sampled:
        layers += _adapter(shape, shapes[i]) + [_fresh_copy(units[i])]
        shape = shapes[i + 1]
    return nn.Sequential(*layers, *_classifier(shape, num_classes, depth <= 1, per_position)), sampled


@register_rule
class AugLocal(Rule):
    name = "auglocal"
    locality = "aux network copies later layers (at their current weights; no gradient crosses)"
    description = ("augmented local learning: each block's aux net is a fresh copy of a uniform sample of the "
                   "units after it, depth shrinking for later blocks (pyramid)")
    schedules = ("simultaneous",)

    @dataclass
    class Options:
        aux_depth: int = option(2, min=1,
                                help="d: units copied into block 1's aux net (released README: 2 for "
                                     "ResNet-32)")
        pyramid: float = option(0.5, min=0.0, max=1.0,
                                help="τ: aux depth falls linearly from d to d(1-τ)+τ at block K-1 (0: all d)")

    def build_stages(self, net, options):
        units = units_of(net)
        shapes = _unit_shapes(net, units)
        sizes = [len(b) if isinstance(b, nn.Sequential) else 1 for b in net.blocks]
        ends = [end - 1 for end in itertools.accumulate(sizes)]          # index of each block's last unit
        self.depths = pyramid_depths(options.aux_depth, options.pyramid, net.num_blocks)
        plans = [_augmented_aux(units, shapes, last, depth, net.num_classes, net.per_position)
                 for last, depth in zip(ends[:-1], self.depths)]
        self.sampled = [sampled for _, sampled in plans]                 # unit indices copied, per block
        objectives = [CrossEntropy(aux) for aux, _ in plans] + [CrossEntropy(net.head)]
        return [LocalBlock(f"block{k + 1}", b, o) for k, (b, o) in enumerate(zip(net.blocks, objectives))]
