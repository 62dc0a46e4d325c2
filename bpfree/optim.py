"""Optimizers and learning-rate schedules, built the same way for every stage of every rule."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from .options import check_fields, option

OPTIMIZERS = ("adam", "adamw", "sgd")
LR_SCHEDULES = ("constant", "cosine", "onecycle")


@dataclass
class OptimConfig:
    """What every stage's optimizer is made of; a rule may scale `lr` per parameter group.

    RunConfig's optimizer settings are these fields (same checks, same flags).
    """

    name: str = option("adam", choices=OPTIMIZERS, flag="--optimizer", help="optimizer of every stage")
    lr: float = option(1e-3, positive=True, help="learning rate")
    momentum: float = option(0.9, min=0.0, below=1.0, help="SGD momentum")
    weight_decay: float = option(0.0, min=0.0, help="weight decay")
    lr_schedule: str = option("cosine", choices=LR_SCHEDULES, help="per-step learning-rate schedule")

    def validate(self) -> None:
        check_fields(self)


def make_optimizer(params: Iterable, cfg: OptimConfig) -> torch.optim.Optimizer:
    params = list(params)
    tensors = [t for g in params for t in (g["params"] if isinstance(g, dict) else [g])]
    # One fused kernel per step where PyTorch has one (CPU and CUDA): the elementwise Adam/SGD passes
    # are a large share of a small network's step, and a local rule has many small optimizers.
    # Elsewhere foreach=True batches the per-parameter updates.
    fused = all(t.is_floating_point() and t.device.type in ("cpu", "cuda") for t in tensors)
    impl = {"fused": True} if fused else {"foreach": True}
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.momentum > 0, **impl)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **impl)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **impl)


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
