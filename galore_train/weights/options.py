"""One-line errors for weight-storage options that cannot work together (TrainConfig.validate calls this).

Kept apart from config.py so the rules sit beside the code they protect; it reads the config by attribute
and imports only the registry."""

from __future__ import annotations

from typing import Any

from galore_train.errors import UserError
from galore_train.registry import OPTIMIZERS, resolve_optimizer_name

INT8_ROUNDINGS = ("stochastic", "nearest")


def accumulates_projected(optimizer: str, eightbit: bool = False) -> bool:
    """Whether the optimizer's update reads only the low-rank gradient P^T G (the GaLore family), so its
    micro-batches can be summed in the projected space. Fira (the residual G - P P^T G) and APOLLO (G scaled
    by channel) need the full gradient."""
    if optimizer not in OPTIMIZERS or OPTIMIZERS[optimizer].is_method:
        return False
    spec = OPTIMIZERS[resolve_optimizer_name(optimizer, eightbit)]
    return spec.galore and getattr(spec.load(), "ACCUMULATES_PROJECTED", False)


def _steps_in_bitsandbytes(optimizer: str, eightbit: bool) -> bool:
    """Whether the optimizer (a method's: its base) is bitsandbytes' own, which writes the weight in its kernel."""
    spec = OPTIMIZERS.get(optimizer)
    if spec is None:
        return False
    name = resolve_optimizer_name(spec.base or optimizer, eightbit)
    return name in OPTIMIZERS and "bitsandbytes" in OPTIMIZERS[name].build


def check_weight_options(cfg: Any) -> None:
    """UserError for --int8-weights / --stochastic-rounding / --accumulate-projected combinations that cannot work."""
    if cfg.stochastic_rounding and cfg.dtype != "bf16":
        raise UserError(
            f"--stochastic-rounding rounds updated weights to bf16; it needs --dtype bf16 (got {cfg.dtype})"
        )
    if cfg.stochastic_rounding and cfg.int8_weights:
        raise UserError("--stochastic-rounding is for bf16 weights; --int8-weights rounds its own (--int8-rounding)")
    if cfg.stochastic_rounding and _steps_in_bitsandbytes(cfg.optimizer, cfg.eightbit):
        raise UserError(
            f"--stochastic-rounding steps an fp32 copy of each weight; bitsandbytes' {cfg.optimizer} --8bit steps"
            " the weight in its own kernel: use galore_adamw --8bit or drop --8bit"
        )
    if cfg.stochastic_rounding and cfg.distributed == "fsdp":
        raise UserError("--stochastic-rounding does not run under --distributed fsdp (docs/int8.md); use ddp")
    if cfg.int8_rounding not in INT8_ROUNDINGS:
        raise UserError(f"--int8-rounding must be one of {', '.join(INT8_ROUNDINGS)}; got {cfg.int8_rounding!r}")
    if cfg.int8_group_size <= 0:
        raise UserError(f"--int8-group-size must be positive, got {cfg.int8_group_size}")
    spec = OPTIMIZERS.get(cfg.optimizer)
    if cfg.int8_weights and spec is not None and spec.is_method:
        raise UserError(
            f"--int8-weights stores the dense target weights, which --optimizer {cfg.optimizer} replaces by"
            " low-rank factors or adapters; use a matrix optimizer (galore_adamw, apollo_mini, muon, adamw, ...)"
        )
    if cfg.int8_weights and cfg.distributed == "fsdp":
        raise UserError("--int8-weights does not run under --distributed fsdp (docs/int8.md); use ddp")
    if cfg.accumulate_projected and not cfg.layerwise:
        raise UserError("--accumulate-projected is a --layerwise option (plain updates hold full gradients anyway)")
    if cfg.accumulate_projected and not accumulates_projected(cfg.optimizer, cfg.eightbit):
        raise UserError(
            f"--accumulate-projected needs an optimizer that reads only P^T G (the GaLore family); {cfg.optimizer}"
            " reads the full gradient: drop the flag (it accumulates full gradients)"
        )
