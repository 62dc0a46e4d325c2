"""The registered networks. Each builder returns (units, head); `create_model` splits units into blocks.

Initialisation is PyTorch's default for every layer (no torchvision-style re-init): with BatchNorm
after every conv it trains as well, and it keeps the builders short. Convs followed by BatchNorm
have no bias (BN's shift makes it redundant). Spatial comments are for a 32x32 input.
"""
from __future__ import annotations

from torch import nn

from ..errors import BpfreeError
from .blocknet import register_model, require_image


# --- option checks (values may come from the CLI as ints, floats, tuples or strings) ----------------
def _positive_ints(model: str, option: str, value) -> list[int]:
    values = [value] if isinstance(value, int) else value
    try:
        values = list(values)
    except TypeError:
        values = None
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        raise BpfreeError(f"model {model} option {option} must be positive integers, got {value!r}")
    return values


def _positive_number(model: str, option: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise BpfreeError(f"model {model} option {option} must be a positive number, got {value!r}")
    return value


def _conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


def _pool_head(channels: int, num_classes: int) -> nn.Module:
    # (B, C, H, W) -> (B, C) -> (B, num_classes): global average pool, so any input size works
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))


# --- mlp ----------------------------------------------------------------------------------------------
@register_model("mlp", "fully connected Linear-ReLU layers (option widths, default 256x4), one unit per layer")
def mlp(num_classes, in_shape, widths=(256, 256, 256, 256)):
    widths = _positive_ints("mlp", "widths", widths)
    d = 1
    for s in in_shape:
        d *= s
    units = []
    for i, w in enumerate(widths):
        flatten = [nn.Flatten()] if i == 0 else []     # (B, *in_shape) -> (B, D), images included
        units.append(nn.Sequential(*flatten, nn.Linear(d, w), nn.ReLU(inplace=True)))   # (B, w)
        d = w
    return units, nn.Linear(d, num_classes)


# --- cnn ----------------------------------------------------------------------------------------------
@register_model("cnn", "conv3x3-BN-ReLU units (option widths, default 32-64-128-128), max-pool after "
                       "units 2.., GAP + linear head")
def cnn(num_classes, in_shape, widths=(32, 64, 128, 128)):
    require_image("cnn", in_shape)
    widths = _positive_ints("cnn", "widths", widths)
    c, size = in_shape[0], min(in_shape[1:])
    units = []
    for i, w in enumerate(widths):
        layers = _conv_bn_relu(c, w)                    # (B, w, s, s), s = 32, 16, 8, 4
        if i >= 1 and size >= 2:                        # halve after units 2.. while the map is >= 2x2
            layers.append(nn.MaxPool2d(2))              # (8x8 digits: 8 -> 4 -> 2 -> 1)
            size //= 2
        units.append(nn.Sequential(*layers))
        c = w
    return units, _pool_head(c, num_classes)


# --- vgg11 --------------------------------------------------------------------------------------------
VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


@register_model("vgg11", "VGG-11 with BN (option width_mult), 8 conv units each with its following "
                         "max-pool, GAP + linear head")
def vgg11(num_classes, in_shape, width_mult=1.0):
    require_image("vgg11", in_shape)
    width_mult = _positive_number("vgg11", "width_mult", width_mult)
    c, size, units = in_shape[0], min(in_shape[1:]), []
    for v in VGG11:
        if v == "M":
            if size >= 2:                               # skip pools once the map is 1x1 (8x8, 28x28 inputs)
                units[-1].append(nn.MaxPool2d(2))       # the pool belongs to the unit before it
                size //= 2
            continue
        w = max(1, round(v * width_mult))
        units.append(nn.Sequential(*_conv_bn_relu(c, w)))
        c = w
    # 32x32: 32 -> 16 -> 8 -> 4 -> 2 -> 1, so the GAP head sees (B, 512, 1, 1) as in CIFAR VGG
    return units, _pool_head(c, num_classes)


# --- resnet18, resnet32/56/110 --------------------------------------------------------------------------
class BasicBlock(nn.Module):
    """The ResNet basic block: two 3x3 convs plus a shortcut (1x1 conv + BN when the shape changes:
    He et al.'s option B)."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(*_conv_bn_relu(c_in, c_out, stride),
                                  nn.Conv2d(c_out, c_out, 3, 1, padding=1, bias=False), nn.BatchNorm2d(c_out))
        self.shortcut = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        return (self.body(x) + self.shortcut(x)).relu()


@register_model("resnet18", "ResNet-18, CIFAR stem (3x3 conv, no max-pool; option width), 8 basic-block "
                            "units; K=4 gives the 4 stages")
def resnet18(num_classes, in_shape, width=64):
    require_image("resnet18", in_shape)
    width = _positive_ints("resnet18", "width", width)
    if len(width) != 1:
        raise BpfreeError(f"model resnet18 option width must be one positive integer, got {width}")
    w = width[0]
    # (out channels, stride) of the 8 basic blocks: stages layer1..layer4 of two blocks each
    plan = [(w, 1), (w, 1), (2 * w, 2), (2 * w, 1), (4 * w, 2), (4 * w, 1), (8 * w, 2), (8 * w, 1)]
    stem = nn.Sequential(*_conv_bn_relu(in_shape[0], w))   # (B, w, 32, 32)
    units, c = [], w
    for i, (c_out, stride) in enumerate(plan):              # 32 -> 32 -> 16 -> 8 -> 4 (8x8: 8 -> 4 -> 2 -> 1)
        block = BasicBlock(c, c_out, stride)
        # The stem is too small to be a block of its own, so it rides with the first basic block.
        units.append(nn.Sequential(stem, block) if i == 0 else block)
        c = c_out
    return units, _pool_head(c, num_classes)


# --- resnet32, resnet56, resnet110: the CIFAR ResNets of depth 6n+2 ------------------------------------
def _cifar_resnet(name: str, n: int, num_classes: int, in_shape: tuple[int, ...]):
    """He et al. 2016, section 4.2: a 3x3 conv stem of 16 channels, then 3 stages of n basic blocks
    with 16, 32, 64 channels (stride 2 at the first block of stages 2 and 3), GAP + linear.

    The stem is a unit of its own and so is every basic block: 3n + 1 units, so K can reach one
    block per stage (InfoPro's K=16 on resnet32 cuts after the stem and after every block but the
    last). Where the shape changes the shortcut is a 1x1 conv + BN (option B), as in InfoPro's and
    AugLocal's released code (the K-scaling results these models are for); He et al.'s CIFAR nets
    zero-pad instead (option A), 2.8k parameters fewer (0.6% of resnet32)."""
    require_image(name, in_shape)
    units, c = [nn.Sequential(*_conv_bn_relu(in_shape[0], 16))], 16     # (B, 16, 32, 32)
    for stage, c_out in enumerate((16, 32, 64)):                         # 32 -> 32 -> 16 -> 8
        for i in range(n):
            units.append(BasicBlock(c, c_out, 2 if stage and i == 0 else 1))
            c = c_out
    return units, _pool_head(c, num_classes)


@register_model("resnet32", "CIFAR ResNet-32 (He et al. 2016; 16-32-64 channels), stem + 15 basic-block units")
def resnet32(num_classes, in_shape):
    return _cifar_resnet("resnet32", 5, num_classes, in_shape)


@register_model("resnet56", "CIFAR ResNet-56 (He et al. 2016; 16-32-64 channels), stem + 27 basic-block units")
def resnet56(num_classes, in_shape):
    return _cifar_resnet("resnet56", 9, num_classes, in_shape)


@register_model("resnet110", "CIFAR ResNet-110 (He et al. 2016; 16-32-64 channels), stem + 54 basic-block units")
def resnet110(num_classes, in_shape):
    return _cifar_resnet("resnet110", 18, num_classes, in_shape)
