"""Training methods that change the model instead of the optimizer: `--optimizer lora|relora|low_rank`.

The training loop stays method-agnostic: `build_method(cfg)` gives a Method (`FullModel`, a no-op, for
plain optimizers), the optimizer is the regular `method.optimizer_name()` over the trainable parameters,
and `scheduler_kwargs(cfg)` goes into `schedule.build_scheduler` (ReLoRA's jagged restarts). Which names
are methods, and which class each builds, is the registry's (galore_train/registry.py); each class
describes itself. See docs/methods.md.
"""

from __future__ import annotations

from typing import Any, Optional

from galore_train.config import TrainConfig
from galore_train.methods.base import FullModel, MatrixParams, Method
from galore_train.registry import METHOD_NAMES, OPTIMIZERS

__all__ = [
    "METHOD_NAMES",
    "Method",
    "MatrixParams",
    "base_optimizer_name",
    "build_method",
    "method_class",
    "scheduler_kwargs",
]


def method_class(name: str) -> Optional[type[Method]]:
    """The Method class of --optimizer `name`, or None for a plain optimizer."""
    spec = OPTIMIZERS.get(name)
    return spec.load() if spec is not None and spec.is_method else None


def build_method(cfg: TrainConfig) -> Method:
    """The Method named by --optimizer, or FullModel for a plain optimizer. Raises UserError on bad options."""
    cls = method_class(cfg.optimizer)
    if cls is None:
        return FullModel(cfg)
    cls.check_options(cfg)
    return cls(cfg)


def base_optimizer_name(cfg: TrainConfig) -> str:
    """The optimizer that trains a method's parameters (--8bit still applies to it)."""
    return OPTIMIZERS[cfg.optimizer].base


def scheduler_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    """Extra keyword arguments for schedule.build_scheduler: ReLoRA's restarts, nothing otherwise."""
    cls = method_class(cfg.optimizer)
    return cls.scheduler_kwargs(cfg) if cls is not None else {}
