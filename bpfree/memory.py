"""Activation-memory accounting that works on the CPU as well as on CUDA.

What we count: the bytes of tensors autograd *saves for backward* during one training step of a
stage (parameters excluded, shared storages counted once). Those tensors are alive together
between the forward and the backward pass, so their sum is the step's activation peak; it is the
quantity local learning shrinks (a block keeps only its own activations), and unlike
`torch.cuda.max_memory_allocated` it can be measured on any device. On CUDA we report the
allocator's peak as well.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch


class SavedTensorMeter:
    """Sums the unique storages saved for backward while active."""

    def __init__(self, exclude: set[int] = frozenset()):
        self.exclude = set(exclude)
        self.seen: set[int] = set()
        self.bytes = 0

    def _pack(self, t: torch.Tensor):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self.exclude and ptr not in self.seen:
            self.seen.add(ptr)
            self.bytes += storage.nbytes()
        return t

    @contextmanager
    def measure(self):
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            yield self


def parameter_storages(module: torch.nn.Module) -> set[int]:
    return {p.untyped_storage().data_ptr() for p in module.parameters()}


def saved_activation_bytes(module: torch.nn.Module, fn, *args):
    """Run `fn(*args)` (one training step of `module`) and return (its result, saved bytes)."""
    meter = SavedTensorMeter(exclude=parameter_storages(module))
    with meter.measure():
        result = fn(*args)
    return result, meter.bytes


def cuda_peak_bytes(device) -> int | None:
    if torch.device(device).type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device)
