"""Training methods that change the model instead of the optimizer: `--optimizer lora|relora|low_rank`.

The training loop stays method-agnostic: `build_method(cfg)` gives a Method (`FullModel`, a no-op, for
plain optimizers), the optimizer is the regular `method.optimizer_name()` over the trainable parameters, and `scheduler_kwargs(cfg)`
goes into `schedule.build_scheduler` (ReLoRA's jagged restarts). See docs/methods.md.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from galore_train.config import TrainConfig, restart_warmup
from galore_train.errors import UserError
from galore_train.methods.base import BASE_OPTIMIZER, FullModel, Method
from galore_train.methods.lora import LoRA
from galore_train.methods.low_rank import LowRank
from galore_train.methods.relora import ReLoRA

_METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (LoRA, ReLoRA, LowRank)}
METHOD_NAMES = tuple(_METHODS)

__all__ = ["METHOD_NAMES", "Method", "MatrixParams", "base_optimizer_name", "build_method", "matrix_parameter_counts", "scheduler_kwargs"]


def build_method(cfg: TrainConfig) -> Method:
    """The Method named by --optimizer, or FullModel for a plain optimizer. Raises UserError on bad options."""
    if cfg.optimizer not in _METHODS:
        return FullModel(cfg)
    _check_options(cfg)
    return _METHODS[cfg.optimizer](cfg)


def base_optimizer_name(cfg: TrainConfig) -> str:
    """The optimizer that trains a method's parameters (--8bit still applies to it)."""
    return BASE_OPTIMIZER


def scheduler_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    """Extra keyword arguments for schedule.build_scheduler: ReLoRA's restarts, nothing otherwise."""
    if cfg.optimizer != "relora":
        return {}
    return {
        "restart_every": cfg.relora_reset,
        "restart_warmup": restart_warmup(cfg.restart_warmup_steps, cfg.relora_reset),
        "restart_offset": cfg.relora_warm_start,
    }


class MatrixParams(NamedTuple):
    """Parameter counts of one target matrix (out_features x in_features) under a method."""

    stored: int  # elements held in memory as weights
    trainable: int  # elements with gradients and optimizer state


def matrix_parameter_counts(method: str, out_features: int, in_features: int, rank: int) -> MatrixParams:
    """Per-matrix counts for the memory estimator; with AdamW add 2 x trainable for its states.

    LoRA/ReLoRA: mn + (m+n)r stored, (m+n)r trainable -> mn + 3(m+n)r with Adam (GaLore paper).
    Low-rank:    (m+n)r stored and trainable          -> 3(m+n)r with Adam.
    Biases are not counted (LLaMA's linears have none).
    """
    m, n = out_features, in_features
    adapters = (m + n) * rank
    if method in ("lora", "relora"):
        return MatrixParams(stored=m * n + adapters, trainable=adapters)
    if method == "low_rank":
        return MatrixParams(stored=adapters, trainable=adapters)
    raise ValueError(f"{method!r} is not one of {', '.join(METHOD_NAMES)}")


def _check_options(cfg: TrainConfig) -> None:
    if cfg.optimizer == "low_rank":
        return
    if not 0.0 <= cfg.lora_dropout < 1.0:
        raise UserError(f"--lora-dropout must be within [0, 1), got {cfg.lora_dropout}")
    if cfg.lora_alpha <= 0:
        raise UserError(f"--lora-alpha must be positive, got {cfg.lora_alpha}")
    if cfg.optimizer != "relora":
        return
    if cfg.relora_warm_start < 0:
        raise UserError(f"--relora-warm-start must be >= 0, got {cfg.relora_warm_start}")
    if cfg.restart_warmup_steps is not None and not 0 <= cfg.restart_warmup_steps < cfg.relora_reset:  # derived: fits
        raise UserError(
            f"--restart-warmup-steps must be >= 0 and smaller than --relora-reset ({cfg.relora_reset}), got {cfg.restart_warmup_steps}"
        )
