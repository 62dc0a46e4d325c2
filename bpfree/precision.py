"""Mixed precision, one way for every stage: autocast around a stage's forward pass and local loss
(`Stage.step`) and around prediction; parameters and optimizer state stay float32.

    fp32   no autocast
    bf16   torch.autocast(dtype=bfloat16): same exponent range as float32, no loss scaling needed;
           works on CPU too (torch's CPU autocast), so CI tests it
    fp16   torch.autocast(dtype=float16) with one gradient scaler per stage (stages have their own
           optimizers, so each scales its own loss and skips its own step on overflow)
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(precision: str, device) -> contextlib.AbstractContextManager:
    """The autocast region for `precision` on `device` (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=_DTYPES[precision])


def grad_scaler(precision: str, device) -> Optional[torch.amp.GradScaler]:
    """A loss scaler for fp16 (None otherwise)."""
    return torch.amp.GradScaler(torch.device(device).type) if precision == "fp16" else None
