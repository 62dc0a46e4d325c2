"""Activation-memory accounting that works on the CPU as well as on CUDA.

What we count: the bytes of tensors autograd *saves for backward* during one training step of a
stage (parameters excluded, shared storages counted once). Those tensors are alive together
between the forward and the backward pass, so their sum is the step's activation peak; it is the
quantity local learning shrinks (a block keeps only its own activations), and unlike
`torch.cuda.max_memory_allocated` it can be measured on any device. On CUDA we report the
allocator's peak as well.

Activation checkpointing (`backprop --checkpoint blocks`) hides its recomputation from these hooks:
torch saves the recomputed tensors through its own. A recomputation run inside `recomputation()`
counts the tensors it creates toward the active meter as a transient peak, so the reported figure is
what is kept between the passes plus the largest recomputed block (an upper bound of the true peak).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

_ACTIVE: list["SavedTensorMeter"] = []     # meters measuring now (a global: backward may run on another thread)


class SavedTensorMeter:
    """Sums the unique storages saved for backward while active."""

    def __init__(self, exclude: set[int] = frozenset()):
        self.exclude = set(exclude)
        self.seen: set[int] = set()
        self.saved = 0        # saved for backward through autograd's hooks
        self.transient = 0    # the largest recomputation (activation checkpointing), held during its backward

    @property
    def bytes(self) -> int:
        return self.saved + self.transient

    def _pack(self, t: torch.Tensor):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self.exclude and ptr not in self.seen:
            self.seen.add(ptr)
            self.saved += storage.nbytes()
        return t

    @contextmanager
    def measure(self):
        _ACTIVE.append(self)
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
                yield self
        finally:
            _ACTIVE.remove(self)


class LiveSavedMeter:
    """The peak of the bytes saved for backward *alive at once* (a storage counts from when autograd
    saves it until autograd frees it, after the backward pass that used it), for executions whose
    saved tensors come and go within a step (micro-batched pipeline schedules), where the sum that
    `SavedTensorMeter` reports would overstate the peak."""

    def __init__(self, exclude: set[int] = frozenset()):
        self.exclude = set(exclude)
        self.live: dict[int, list[int]] = {}      # storage -> [bytes, saved references alive]
        self.now = self.peak = 0

    def _pack(self, t: torch.Tensor):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in self.exclude:
            return _Held(t, None, ptr)
        entry = self.live.setdefault(ptr, [storage.nbytes(), 0])
        if entry[1] == 0:
            self.now += entry[0]
            self.peak = max(self.peak, self.now)
        entry[1] += 1
        return _Held(t, self, ptr)

    def _release(self, ptr: int) -> None:
        entry = self.live[ptr]
        entry[1] -= 1
        if entry[1] == 0:
            self.now -= entry[0]
            del self.live[ptr]

    @contextmanager
    def measure(self):
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda held: held.tensor):
            yield self


class _Held:
    """A saved tensor as autograd keeps it: released from the meter when autograd frees it."""
    __slots__ = ("tensor", "meter", "ptr")

    def __init__(self, tensor, meter, ptr):
        self.tensor, self.meter, self.ptr = tensor, meter, ptr

    def __del__(self):
        if self.meter is not None:
            self.meter._release(self.ptr)


class _NewStorages(TorchDispatchMode):
    """Sums the bytes of the storages that operators create while active (views of `known` ones excluded)."""

    def __init__(self, known: set[int]):
        super().__init__()
        self.seen = set(known)     # parameters and tensors already counted: views of them are not new
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.seen:
                self.seen.add(t.untyped_storage().data_ptr())
                self.bytes += t.untyped_storage().nbytes()
        return out


@contextmanager
def recomputation():
    """Wrap a checkpoint's recomputation: what it creates counts toward the measuring meter (if any)."""
    if not _ACTIVE:
        yield
        return
    try:                 # torch ends a recomputation early, by an exception, once it has what backward needs
        with _NewStorages(set().union(*(m.exclude | m.seen for m in _ACTIVE))) as created:
            yield
    finally:
        for meter in _ACTIVE:
            meter.transient = max(meter.transient, created.bytes)


def tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (any nesting of tuples, lists and dicts)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in tree_leaves(tensors) if isinstance(t, torch.Tensor)}
    return sum(storages.values())


def parameter_storages(module: torch.nn.Module) -> set[int]:
    return {p.untyped_storage().data_ptr() for p in module.parameters()}


def saved_activation_bytes(module: torch.nn.Module, fn, *args):
    """Run `fn(*args)` (one training step of `module`) and return (its result, saved bytes)."""
    meter = SavedTensorMeter(exclude=parameter_storages(module))
    with meter.measure():
        result = fn(*args)
    return result, meter.bytes


class CudaPeak:
    """Peak CUDA memory: of the whole run (`run_bytes`) and of single steps (`measure`), on the CPU None.

    A step's peak is the allocator's peak during the step above what was allocated when it began
    (weights, optimizer state and the data already on the device excluded), so it is comparable
    with the saved-activation count; measuring resets the allocator's peak, so the run's peak is
    carried across resets here."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.device, self.peak = device, 0

    @contextmanager
    def measure(self):
        box = {"bytes": None}
        if not self.cuda:
            yield box
            return
        torch.cuda.synchronize(self.device)
        self.peak = max(self.peak, torch.cuda.max_memory_allocated(self.device))
        start = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        yield box
        torch.cuda.synchronize(self.device)
        box["bytes"] = torch.cuda.max_memory_allocated(self.device) - start

    def run_bytes(self) -> int | None:
        return max(self.peak, torch.cuda.max_memory_allocated(self.device)) if self.cuda else None
