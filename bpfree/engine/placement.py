"""Where stages go: each stage's step time, measured on a probe batch, and contiguous groups of
stages per rank that minimise the slowest rank's time per batch (`models.partition`)."""
from __future__ import annotations

import copy
import time
import warnings

import torch

from ..rules.step import train_batch


def stage_costs(stages, trained: list[int], x: torch.Tensor, labels: torch.Tensor, top_down: bool,
                repeats: int = 3) -> list[float]:
    """Seconds per training step of each stage on one batch (whole batches: a top-down rule's
    stage works on the way back too), measured on copies of the stages: the weights are untouched."""
    with warnings.catch_warnings():   # a copied scheduler no longer sees its optimizer's step hook
        warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*")
        copies = copy.deepcopy(stages)
    for k, stage in enumerate(copies):
        stage.train(k in trained)
    rng = torch.get_rng_state()
    rounds = []

    def timed(k, what, fn, *args):
        begin = time.perf_counter()
        out = fn(*args)
        rounds[-1][k] += time.perf_counter() - begin
        return out

    for _ in range(repeats):
        rounds.append([0.0] * len(copies))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*")
            train_batch(copies, range(len(copies)), trained, (x,), labels, None, top_down, call=timed)
    torch.set_rng_state(rng)
    kept = rounds[1:] or rounds       # the first round pays one-off set-up costs
    return [min(r[k] for r in kept) for k in range(len(copies))]
