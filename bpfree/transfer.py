"""Transferability estimation: score frozen source modules on a target task without training them.

A trained (frozen) feature extractor is scored on a *target* task: push the target data through it
once and score the features with an estimator from `bpfree.estimators`: `kernel` (the hidden-module
proxy objective of its features against the target's ideal kernel, Duan, Yu & Principe, arXiv
2005.05541), `logme` (the default: it predicted transfer best in bench/transferability.py, with
hscore, which is degenerate when the target has fewer examples than feature dimensions), leep,
hscore, nce or probe. The better the features already
suit the target, the higher the score, and the better the expected accuracy of an output layer
trained on top of them. Forward passes only (probe trains one linear layer on a few examples).

    features(source, x)            N x D: phi before its unit norm: ReLU, pool conv maps, flatten
    source_probs(source, x)        the source's own classifier on x (a Rule's prediction), or None
    transferability(source, x, y)  the kernel score of one candidate
    score_sources({name: source}, data, estimators)   every estimator on every candidate, timed
    rank_sources({name: source}, data, "logme")       candidates ranked by one estimator

A source is a Rule (its network's blocks: the body an output layer is replaced on, whatever the
rule's stage cut; conv maps pooled as its last feature stage says), or modules applied in order.
Pure functions: nothing is trained, and every module is returned in the mode it came in.
"""
from __future__ import annotations

import time
from typing import Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .errors import BpfreeError
from .estimators import ESTIMATORS, estimate
from .models.modes import evaluating
from .rules.base import Rule, Stage
from .rules.kernel import PROXIES

__all__ = ["PROXIES", "features", "rank_sources", "score_sources", "source_probs", "transferability"]

Modules = Union[Rule, nn.Module, Sequence[nn.Module]]


def _as_modules(source: Modules) -> tuple[list[nn.Module], Optional[int]]:
    """The feature extractor as modules applied in order, and how phi pools its conv maps.

    A Rule: its network's blocks, pooled as its last `feature_stages()` says. An nn.ModuleList /
    list / tuple: its items in order. Any other nn.Module (e.g. an nn.Sequential of blocks): itself.
    Stages whose `extracts_features()` is False (an output layer) are left out; the last stage's
    `feature_pool()` says how to pool (a plain module: globally)."""
    if isinstance(source, Rule):
        return list(source.net.blocks), source.feature_stages()[-1].feature_pool()
    if isinstance(source, (nn.ModuleList, list, tuple)):
        mods = list(source)
    elif isinstance(source, nn.Module):
        mods = [source]
    else:
        raise BpfreeError("transferability needs a rule, a module or a list of modules, "
                          f"got {type(source).__name__}")
    mods = [m for m in mods if not isinstance(m, Stage) or m.extracts_features()]
    if not mods or not all(isinstance(m, nn.Module) for m in mods):
        raise BpfreeError("transferability needs at least one module to extract features with")
    return mods, mods[-1].feature_pool() if isinstance(mods[-1], Stage) else 1


def _batched(fn, x: torch.Tensor, device, batch_size: int) -> torch.Tensor:
    return torch.cat([fn(x[i:i + batch_size].to(device)) for i in range(0, len(x), batch_size)])


@torch.no_grad()
def features(source: Modules, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The frozen modules' features of x, N x D, on the modules' device: phi without its unit norm
    (ReLU, average pool of conv maps to p x p as `_as_modules` says, flatten), in batches."""
    mods, pool = _as_modules(source)
    device = next((p.device for mod in mods for p in mod.parameters()), x.device)

    def phi(xb):
        message: tuple = (xb,)
        for m in mods:
            out = m(*message)
            message = out if isinstance(out, tuple) else (out,)
        z = F.relu(message[0])
        return (F.adaptive_avg_pool2d(z, pool) if z.dim() == 4 and pool else z).flatten(1)
    with evaluating(*mods):
        return _batched(phi, x, device, batch_size)


@torch.no_grad()
def source_probs(source: Modules, x: torch.Tensor, batch_size: int = 256) -> Optional[torch.Tensor]:
    """The source's own classifier on x as probabilities (softmax of a Rule's prediction), N x C_s;
    None for a source given as bare modules (no classifier: leep and nce do not apply)."""
    if not isinstance(source, Rule):
        return None
    device = next(source.stages.parameters()).device
    with evaluating(source.stages):
        return _batched(lambda xb: torch.softmax(source.predict(xb).float(), 1), x, device, batch_size)


def transferability(stages_or_module: Modules, x: torch.Tensor, y: torch.Tensor, proxy: str = "alignment",
                    batch_size: int = 256, *, kernel: str = "cosine", sigma: float = 0.5,
                    temperature: float = 1.0, seed: int = 0, max_examples: Optional[int] = None) -> float:
    """The kernel estimator (higher = more transferable) of the frozen modules' features on (x, y):
    the proxy objective averaged over seeded batches of `batch_size` (see `bpfree.estimators`).
    Deterministic for a fixed seed and thread count."""
    if len(x) != len(y):
        raise BpfreeError(f"x and y differ in length: {len(x)} and {len(y)}")
    if proxy not in PROXIES:
        raise BpfreeError(f"unknown proxy {proxy!r}; choose one of: {', '.join(PROXIES)}")
    f = features(stages_or_module, x, batch_size=max(batch_size, 2))
    return estimate("kernel", f, y, seed=seed, proxy=proxy, kernel=kernel, sigma=sigma, temperature=temperature,
                    batch_size=batch_size, max_examples=max_examples)


def _target(data) -> tuple[torch.Tensor, torch.Tensor]:
    # a Data: its training split (the data one would train the output layer on); else an (x, y) pair
    if hasattr(data, "x_train"):
        return data.normalize(data.x_train), data.y_train     # uint8 images -> the float32 the network reads
    return data


def score_sources(candidates: Mapping[str, Modules], data, estimators: Sequence[str] = ("kernel",), *,
                  seed: int = 0, **options) -> dict[str, dict]:
    """Every estimator on every candidate: {name: {"forward_s": s, estimator: {"score": v or None,
    "seconds": s, "note": why None}}}. The features (and, for leep / nce, the source classifier's
    predictions) are computed once per candidate, their time in forward_s; an estimator that does
    not apply to a candidate (leep on bare modules) gets score None and a note instead of an error.
    `data` as in `rank_sources`; options go to the kernel estimator (proxy, batch_size, ...)."""
    if not candidates:
        raise BpfreeError("score_sources needs at least one candidate")
    for name in estimators:
        ESTIMATORS.get(name)                     # an unknown name fails before any work
    x, y = _target(data)
    table = {}
    for cand, source in candidates.items():
        start = time.perf_counter()
        f = features(source, x)
        probs = source_probs(source, x) if any(ESTIMATORS.get(e).needs_source_classifier for e in estimators) else None
        row: dict = {"forward_s": time.perf_counter() - start}
        for name in estimators:
            if ESTIMATORS.get(name).needs_source_classifier and probs is None:
                row[name] = {"score": None, "seconds": 0.0,
                             "note": "not applicable: needs the source's own classifier"}
                continue
            start = time.perf_counter()
            score = estimate(name, f, y, probs, seed=seed, **(options if name == "kernel" else {}))
            row[name] = {"score": score, "seconds": time.perf_counter() - start}
        table[cand] = row
    return table


def rank_sources(candidates: Mapping[str, Modules], data, estimator: str = "logme", **options) -> list[tuple[str, float]]:
    """Score every candidate feature extractor on the target `data` with `estimator` (default logme,
    see `bpfree.estimators`) and rank them, best first.

    `data` is a `bpfree.data.Data` (its training split is used: the target data one would train
    the output layer on) or an (x, y) pair. Ties are broken by name, so the order is deterministic.
    options go to the estimator (kernel: proxy, batch_size, ...), seed to every one."""
    if not candidates:
        raise BpfreeError("rank_sources needs at least one candidate")
    seed = options.pop("seed", 0)
    x, y = _target(data)
    scores = []
    for name, source in candidates.items():
        probs = source_probs(source, x) if ESTIMATORS.get(estimator).needs_source_classifier else None
        scores.append((name, estimate(estimator, features(source, x), y, probs, seed=seed, **options)))
    return sorted(scores, key=lambda item: (-item[1], item[0]))
