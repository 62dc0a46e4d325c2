"""Auxiliary classifiers that give a block a local learning signal (`--aux-head` of bwbpf and dgl).

For a block output h of shape (C, H, W), with W channels in the head (`--aux-width`, default C):

    linear:  logits = Linear(GAP(h))                                          BWBPF's released head
    conv:    logits = Linear(flatten(avgpool_2x2(ReLU(BN(conv3x3_W(h))))))   the design of shared/evidence
  DGL's auxiliary networks (Belilovsky et al. 2020; eugenium/DGL, auxiliary_nets_study/models.py):
    mlp:     logits = MLP(flatten(avgpool_2x2(r(h))))
    mlp-sr:  logits = MLP(flatten(avgpool_2x2([ReLU(BN(conv1x1_W(.)))] x 3 (r(h)))))     DGL's default
    cnn:     logits = Linear(flatten(BN(avgpool_2x2([ReLU(BN(conv3x3_W(.)))] x 2 (h)))))
    MLP(z)   = Linear(ReLU(BN1d(Linear_4W(.))) x 3 (z))     three hidden layers as wide as their input
    r(h)     = adaptive avgpool to ceil(H/4) x ceil(W/4)    DGL's "reduce the size by 16" first

On vector features (D,) every head reads h as a (D, 1, 1) map with 1x1 convolutions and no 2x2
pooling (so an MLP's hidden width is W, default D). On token sequences (T, D) (transformer blocks)
`linear` is LayerNorm + Linear and every other kind LayerNorm + Linear_W + GELU + Linear (W default D):
at every position for a language model (SOLO's "loss head per stage"), on the mean token for a
classifier; BatchNorm and convolutions have no meaning across tokens. Which head a rule uses decides how much accuracy
local learning keeps: with detached blocks the conv head lost least against E2EBP, a pooled linear
head most (measured: shared/evidence/README.md, "Auxiliary-head design").
"""
from __future__ import annotations

import math
from typing import Optional

from torch import nn

from ..errors import BpfreeError
from ..models.transformer import Pool

AUX_HEADS = ("linear", "mlp", "mlp-sr", "cnn", "conv")


def make_aux_head(kind: str, in_shape: tuple[int, ...], num_classes: int, width: Optional[int] = None,
                  per_position: bool = False) -> nn.Module:
    """The aux classifier `kind` for a block whose output has shape `in_shape` (C, H, W), (D,) or tokens
    (T, D); `width` is the head's channel count W (default: the block's own, C or D); `per_position`:
    scores at every token (a language model) rather than one per example."""
    if kind not in AUX_HEADS:
        raise BpfreeError(f"unknown aux head {kind!r}; choose one of: {', '.join(AUX_HEADS)}")
    if width is not None and width <= 0:
        raise BpfreeError(f"--aux-width must be positive, got {width}")
    if len(in_shape) == 2:
        return token_head(in_shape[1], num_classes, per_position, None if kind == "linear" else width or in_shape[1])
    vector = len(in_shape) == 1
    c = in_shape[0]
    w = width or c
    side = 1 if vector else 2                  # the final pooled map is side x side
    head: list[nn.Module] = [nn.Unflatten(1, (c, 1, 1))] if vector else []
    if kind == "linear":
        return nn.Sequential(*head, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes))
    if kind == "conv":
        head += _conv_bn_relu(c, w, 1 if vector else 3)
        return nn.Sequential(*head, nn.AdaptiveAvgPool2d(side), nn.Flatten(), nn.Linear(w * side ** 2, num_classes))
    if kind == "cnn":
        head += _conv_bn_relu(c, w, 1 if vector else 3) + _conv_bn_relu(w, w, 1 if vector else 3)
        return nn.Sequential(*head, nn.AdaptiveAvgPool2d(side), nn.BatchNorm2d(w), nn.Flatten(),
                             nn.Linear(w * side ** 2, num_classes))
    if not vector:                             # mlp, mlp-sr: first reduce the resolution by 4 per side
        head.append(nn.AdaptiveAvgPool2d((math.ceil(in_shape[1] / 4), math.ceil(in_shape[2] / 4))))
    if kind == "mlp-sr":
        head += _conv_bn_relu(c, w, 1) + _conv_bn_relu(w, w, 1) + _conv_bn_relu(w, w, 1)
        c = w
    head += [nn.AdaptiveAvgPool2d(side), nn.Flatten()]
    return nn.Sequential(*head, *_bn_mlp(c * side ** 2, w * side ** 2, num_classes))


def token_head(dim: int, num_classes: int, per_position: bool, hidden: Optional[int] = None) -> nn.Module:
    """Scores from tokens (B, T, D): LayerNorm, [Linear_hidden, GELU], Linear; per position, or on the
    mean token."""
    pool = [] if per_position else [Pool("mean")]
    mlp = [nn.Linear(dim, hidden), nn.GELU()] if hidden else []
    return nn.Sequential(*pool, nn.LayerNorm(dim), *mlp, nn.Linear(hidden or dim, num_classes))


def _conv_bn_relu(c_in: int, c_out: int, k: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


def _bn_mlp(d_in: int, width: int, d_out: int, hidden: int = 3) -> list[nn.Module]:
    # DGL's classifier: `hidden` x (Linear, BatchNorm1d, ReLU), then a linear layer to the classes
    layers, d = [], d_in
    for _ in range(hidden):
        layers += [nn.Linear(d, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True)]
        d = width
    return layers + [nn.Linear(d, d_out)]
