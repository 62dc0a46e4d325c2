"""Optimizers and learning-rate schedules, built the same way for every stage of every rule."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from .errors import BpfreeError

OPTIMIZERS = ("adam", "adamw", "sgd")
LR_SCHEDULES = ("constant", "cosine", "onecycle")


@dataclass
class OptimConfig:
    """What every stage's optimizer is made of; a rule may scale `lr` per parameter group."""

    name: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_schedule: str = "cosine"

    def validate(self) -> None:
        if self.name not in OPTIMIZERS:
            raise BpfreeError(f"unknown optimizer {self.name!r}; choose one of: {', '.join(OPTIMIZERS)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise BpfreeError(
                f"unknown lr schedule {self.lr_schedule!r}; choose one of: {', '.join(LR_SCHEDULES)}")
        if not self.lr > 0:
            raise BpfreeError(f"--lr must be > 0, got {self.lr}")
        if not self.weight_decay >= 0:
            raise BpfreeError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.momentum < 1:
            raise BpfreeError(f"--momentum must be in [0, 1), got {self.momentum}")


def make_optimizer(params: Iterable, cfg: OptimConfig) -> torch.optim.Optimizer:
    # foreach=True batches the per-parameter updates: a local rule has many small optimizers,
    # and launching one kernel per tensor is where its overhead comes from.
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.momentum > 0, foreach=True)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)


def make_scheduler(opt: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    """A per-step schedule spanning exactly the steps this stage will train for."""
    total_steps = max(1, total_steps)
    if cfg.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    if cfg.lr_schedule == "onecycle":
        # Peaks at 3x the base lr, as in the recipe measured in shared/evidence.
        max_lr = [3 * g["lr"] for g in opt.param_groups]
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=total_steps)
    return torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)
