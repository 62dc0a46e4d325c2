"""How a network runs: its train/eval modes and its memory layout on a device.

    with evaluating(net, head):   every module in eval mode inside, each back in its own mode after
    channels_last_is_exact(net, device)   whether conv layers may run channels-last there
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def evaluating(*modules: nn.Module):
    """Every given module (and its children) in eval mode inside; each back in its own mode after,
    so a net built from partly frozen modules keeps its mix."""
    modes = [(m, m.training) for module in modules for m in module.modules()]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def channels_last_is_exact(modules: nn.Module, device) -> bool:
    """False where channels-last would give wrong gradients: on the CPU (torch 2.13), the weight
    gradient of a strided 1x1 convolution with 2-7 input channels in channels-last layout is wrong
    (measured against NCHW: errors larger than the gradient itself; resnet18's shortcuts below width
    8 are such convolutions). Those networks train in the NCHW layout instead."""
    return torch.device(device).type != "cpu" or not any(
        isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.stride != (1, 1) and 2 <= m.in_channels < 8
        for m in modules.modules())
