"""Auxiliary classifiers that give a block a local learning signal (`--aux-head` of bwbpf and dgl).

    linear:  logits = W · avgpool_1x1(h)                              BWBPF's released head
    mlp:     logits = MLP_2(flatten(avgpool_2x2(h)))                  DGL's "mlp" head
    conv:    logits = W · flatten(avgpool_2x2(ReLU(BN(conv3x3(h)))))

Every head takes a block's output of shape (C, H, W) or (D,) and returns class scores. Their design
decides how much accuracy local learning keeps: with detached blocks the conv head lost least
against E2EBP, a pooled linear head most (measured: shared/evidence/README.md, "Auxiliary-head design").
"""
from __future__ import annotations

from torch import nn

from ..errors import BpfreeError

AUX_HEADS = ("linear", "mlp", "conv")


def make_aux_head(kind: str, in_shape: tuple[int, ...], num_classes: int, width: int = 256) -> nn.Module:
    """`linear`: global average pool + linear (BWBPF's released head).
    `mlp`: adaptive average pool to 2x2 + MLP with two hidden layers of `width` (DGL's "mlp" head).
    `conv`: conv3x3-BN-ReLU with `width` channels, adaptive average pool to 2x2, linear.
    On vector features every kind is an MLP with that many hidden layers (0, 2, 1)."""
    if kind not in AUX_HEADS:
        raise BpfreeError(f"unknown aux head {kind!r}; choose one of: {', '.join(AUX_HEADS)}")
    if width <= 0:
        raise BpfreeError(f"--aux-width must be positive, got {width}")
    if len(in_shape) == 1:
        return _mlp(in_shape[0], num_classes, width, hidden={"linear": 0, "mlp": 2, "conv": 1}[kind])
    channels = in_shape[0]
    if kind == "linear":
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))
    pooled = 4 * (width if kind == "conv" else channels)   # after pooling to 2x2
    if kind == "mlp":
        return nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), _mlp(pooled, num_classes, width, hidden=2))
    return nn.Sequential(nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                         nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(pooled, num_classes))


def _mlp(d_in: int, d_out: int, width: int, hidden: int) -> nn.Module:
    layers, d = [nn.Flatten()], d_in
    for _ in range(hidden):
        layers += [nn.Linear(d, width), nn.ReLU(inplace=True)]
        d = width
    return nn.Sequential(*layers, nn.Linear(d, d_out))
