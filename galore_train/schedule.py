"""Learning-rate schedules as pure functions of the step, wrapped in a LambdaLR.

The factor multiplies each param group's initial lr. Pure functions make the shapes easy to test and
keep the scheduler's state to a single step counter (bit-exact resume is trivial).

ReLoRA's "jagged" schedule is the same global schedule with a short linear re-warm-up after every
restart (Lialin et al. 2023, Fig. 2): the restart keyword arguments switch it on, the defaults keep
the plain schedule.
"""

from __future__ import annotations

import functools
import math
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def base_factor(step: int, *, kind: str, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
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


def restart_ramp(
    step: int, *, restart_every: int, restart_warmup: int, restart_offset: int, warmup_steps: int
) -> float:
    """Multiplier in (0, 1] that re-warms the lr linearly for `restart_warmup` steps after each restart.

    Restarts happen at steps `restart_offset + k * restart_every`. A restart at step 0 or inside the
    global warm-up is no restart: the global warm-up already ramps there. Ramping *towards the global
    schedule's current value* (instead of a fixed peak) makes the jagged curve touch the plain one
    again exactly when the re-warm-up ends.
    """
    if restart_every <= 0 or restart_warmup <= 0 or step < restart_offset:
        return 1.0
    since_restart = (step - restart_offset) % restart_every
    restart = step - since_restart
    if restart < max(1, warmup_steps) or since_restart >= restart_warmup:
        return 1.0
    return (since_restart + 1) / restart_warmup


def lr_factor(
    step: int,
    *,
    kind: str,
    total_steps: int,
    warmup_steps: int,
    min_ratio: float,
    restart_every: int = 0,
    restart_warmup: int = 0,
    restart_offset: int = 0,
) -> float:
    """The lr multiplier used by optimizer step `step` (0-based): global schedule x restart ramp."""
    factor = base_factor(step, kind=kind, total_steps=total_steps, warmup_steps=warmup_steps, min_ratio=min_ratio)
    ramp = restart_ramp(
        step,
        restart_every=restart_every,
        restart_warmup=restart_warmup,
        restart_offset=restart_offset,
        warmup_steps=warmup_steps,
    )
    return factor * ramp


def build_scheduler(optimizer: Optimizer, *, start_step: int = 0, **schedule: Any) -> LambdaLR:
    """LambdaLR over `lr_factor` with the given schedule keywords (kind, total_steps, warmup_steps,
    min_ratio, restart_*). `start_step` > 0 starts a fresh optimizer mid-run (e.g. after ReLoRA's warm
    start rebuilt it): its groups' current lr is taken as the peak and the next step uses
    `lr_factor(start_step)`."""
    if start_step > 0:
        # LambdaLR resumes from `last_epoch` only when the groups already carry their peak lr.
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
    return LambdaLR(optimizer, functools.partial(lr_factor, **schedule), last_epoch=start_step - 1)
