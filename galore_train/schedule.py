"""Learning-rate schedules as pure functions of the step, wrapped in a LambdaLR.

The factor multiplies each param group's initial lr. Pure functions make the shapes easy to test and
keep the scheduler's state to a single step counter (bit-exact resume is trivial).
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def lr_factor(step: int, *, kind: str, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Linear warm-up from 0, then cosine/linear decay to `min_ratio` at `total_steps` (or constant)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if kind == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    if kind == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {kind!r}")


def build_scheduler(optimizer: Optimizer, *, kind: str, total_steps: int, warmup_steps: int, min_ratio: float) -> LambdaLR:
    return LambdaLR(
        optimizer,
        lambda step: lr_factor(step, kind=kind, total_steps=total_steps, warmup_steps=warmup_steps, min_ratio=min_ratio),
    )
