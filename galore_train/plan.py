"""How a run's budget divides into optimizer steps: total steps, warm-up and accumulation per process."""

from __future__ import annotations

import math
from dataclasses import dataclass

from galore_train.config import TrainConfig, parse_token_count
from galore_train.errors import UserError


@dataclass(frozen=True)
class StepPlan:
    """How a run's budget divides into optimizer steps over `world_size` processes."""

    total_steps: int
    warmup_steps: int
    accumulation: int
    total_batch_size: int


def plan_steps(cfg: TrainConfig, world_size: int) -> StepPlan:
    per_step = cfg.batch_size * world_size
    total_batch = cfg.total_batch_size or per_step
    if total_batch % per_step:
        raise UserError(
            f"--total-batch-size {total_batch} is not a multiple of --batch-size {cfg.batch_size} x {world_size}"
            " process(es)"
        )
    if cfg.num_training_steps is not None:
        steps = cfg.num_training_steps
    else:
        steps = math.ceil(parse_token_count(cfg.max_train_tokens) / (total_batch * cfg.max_length))
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else steps // 10
    if warmup >= steps and steps > 1:
        raise UserError(f"--warmup-steps {warmup} must be smaller than the {steps} training steps")
    return StepPlan(
        total_steps=steps, warmup_steps=warmup, accumulation=total_batch // per_step, total_batch_size=total_batch
    )
