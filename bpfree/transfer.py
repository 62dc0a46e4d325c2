"""Transferability estimation with the kernel proxy (Duan, Yu & Principe, arXiv 2005.05541).

A trained (frozen) feature extractor is scored on a *target* task without any training: push the
target data through it and evaluate the hidden-module proxy objective of its features against the
target's ideal kernel (by default the kernel-target alignment A, in [0, 1]). The better the
features already separate the target's classes, the higher the score, and the better the
expected accuracy of an output layer trained on top of them. Forward passes only: "practically no
computation overhead".

`transferability(modules, x, y)` scores one candidate; `rank_sources({name: modules}, data)` scores
and ranks several. Pure functions: nothing is trained, and every module is returned in the mode
(train / eval) it came in.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence, Union

import torch
from torch import nn

from .errors import BpfreeError
from .rules.base import Rule, Stage
from .rules.kernel import PROXIES, KernelProxy, same_class

Modules = Union[Rule, nn.Module, Sequence[nn.Module]]


def _as_modules(source: Modules) -> list[nn.Module]:
    """The feature extractor as a list of modules applied in order.

    A Rule: its `feature_stages()` (by default every stage but the last, or its only stage). An
    nn.ModuleList / list / tuple: its items in order. Any other nn.Module (e.g. an nn.Sequential of
    blocks): itself. Stages whose `extracts_features()` is False (an output layer) are left out."""
    if isinstance(source, Rule):
        mods = source.feature_stages()
    elif isinstance(source, (nn.ModuleList, list, tuple)):
        mods = list(source)
    elif isinstance(source, nn.Module):
        mods = [source]
    else:
        raise BpfreeError("transferability needs a rule, a module or a list of modules, "
                          f"got {type(source).__name__}")
    mods = [m for m in mods if not isinstance(m, Stage) or m.extracts_features()]
    if not mods or not all(isinstance(m, nn.Module) for m in mods):
        raise BpfreeError("transferability needs at least one module to extract features with")
    return mods


def _push(mods: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    message: tuple = (x,)
    for m in mods:
        out = m(*message)
        message = out if isinstance(out, tuple) else (out,)
    return message[0]


@torch.no_grad()
def transferability(stages_or_module: Modules, x: torch.Tensor, y: torch.Tensor, proxy: str = "alignment",
                    batch_size: int = 256, *, kernel: str = "cosine", sigma: float = 0.5,
                    temperature: float = 1.0, seed: int = 0, max_examples: Optional[int] = None) -> float:
    """Mean proxy objective (higher = more transferable) of the frozen modules' features on (x, y).

    The data are visited in one fixed random order (`seed`), so that batches mix classes even when
    the target set is sorted by class, in batches of `batch_size`; batches of fewer than 2 examples
    are skipped and the rest averaged, weighted by their number of pairs. Features go through the
    same phi as in training: ReLU, average pool for conv maps as the last stage's `feature_pool()`
    says (a `kernel` hidden module: its proxy's; any other module: global), unit norm.
    Objective: alignment A in [0, 1]; raw: same-class minus different-class mean kernel; neo, mse,
    contrastive: minus their loss (see `bpfree.rules.kernel.kernel_proxy_loss`). Deterministic for
    a fixed seed and thread count.
    """
    if proxy not in PROXIES:
        raise BpfreeError(f"unknown proxy {proxy!r}; choose one of: {', '.join(PROXIES)}")
    if batch_size < 2:
        raise BpfreeError(f"batch_size must be at least 2 (the proxy compares pairs), got {batch_size}")
    if len(x) != len(y):
        raise BpfreeError(f"x and y differ in length: {len(x)} and {len(y)}")
    mods = _as_modules(stages_or_module)
    pool = mods[-1].feature_pool() if isinstance(mods[-1], Stage) else 1
    scorer = KernelProxy(proxy, kernel, sigma, temperature, pool)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    if max_examples is not None:
        order = order[:max_examples]
    modes = [(m, m.training) for mod in mods for m in mod.modules()]
    for mod in mods:
        mod.eval()
    device = next((p.device for mod in mods for p in mod.parameters()), x.device)
    total, weight = 0.0, 0
    try:
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            if len(idx) < 2:
                continue
            z = _push(mods, x[idx.to(x.device)].to(device))
            pairs = len(idx) * (len(idx) - 1) // 2
            total += float(scorer.objective(z, same_class(y[idx.to(y.device)].to(device)))) * pairs
            weight += pairs
    finally:
        for m, mode in modes:
            m.training = mode
    if weight == 0:
        raise BpfreeError("transferability needs at least 2 target examples")
    return total / weight


def rank_sources(candidates: Mapping[str, Modules], data, proxy: str = "alignment",
                 **kwargs) -> list[tuple[str, float]]:
    """Score every candidate feature extractor on the target `data` and rank them, best first.

    `data` is a `bpfree.data.Data` (its training split is used: the target data one would train
    the output layer on) or an (x, y) pair. Ties are broken by name, so the order is deterministic.
    kwargs go to `transferability`."""
    if not candidates:
        raise BpfreeError("rank_sources needs at least one candidate")
    if hasattr(data, "x_train"):
        x, y = data.normalize(data.x_train), data.y_train     # uint8 images -> the float32 the network reads
    else:
        x, y = data
    scores = [(name, transferability(mods, x, y, proxy, **kwargs)) for name, mods in candidates.items()]
    return sorted(scores, key=lambda item: (-item[1], item[0]))
