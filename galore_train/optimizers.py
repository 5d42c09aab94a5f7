"""A TrainConfig -> the torch.optim.Optimizer over the model: the registry's entry, built on the parameters.

GaLore-family optimizers get two param groups: the .weight of every target linear layer
(`galore_train.model.target_linear_modules`, the one rule shared with LoRA and the memory estimator)
in a GaLore group, everything else (embeddings, norms, lm_head) in a plain full-rank group run by the
same base optimizer. Only parameters with requires_grad are optimized.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from galore_train.config import TrainConfig
from galore_train.errors import UserError
from galore_train.model import target_linear_modules
from galore_train.registry import (
    NORM_GROWTH_NAMES,
    OPTIMIZERS,
    OptimizerSpec,
    galore_group,
    moments_group,
    resolve_optimizer_name,
)

NamedParams = list[tuple[str, nn.Parameter]]


def galore_parameter_split(model: nn.Module, targets: list[str]) -> tuple[NamedParams, NamedParams]:
    """(galore, plain): trainable (name, parameter) pairs, in model order. GaLore = the .weight of
    each target linear layer; plain = every other trainable parameter."""
    target_weights = {f"{name}.weight" for name in target_linear_modules(model, targets)}
    galore: NamedParams = []
    plain: NamedParams = []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (galore if name in target_weights else plain).append((name, param))
    return galore, plain


def _check_rank(galore: NamedParams, rank: int) -> None:
    if rank <= 0:
        raise UserError(f"--rank must be positive, got {rank}")
    for name, param in galore:
        if rank >= min(param.shape):
            raise UserError(
                f"--rank {rank} is not below min{tuple(param.shape)} of {name}: GaLore would save nothing; lower --rank"
            )


def _matrix_groups(
    model: nn.Module, cfg: TrainConfig, spec: OptimizerSpec, moments: dict[str, Any]
) -> list[dict[str, Any]]:
    """[plain, matrices]: the target weights in their own group, with GaLore's keys (spec.galore), the moments'
    dtype (--moments-dtype) and the optimizer's own (spec.matrix_group: Fira's and APOLLO's limiter, APOLLO's
    projection, Muon's flag)."""
    galore, plain = galore_parameter_split(model, cfg.galore_targets)
    if not galore:
        raise UserError(f"--galore-targets {cfg.galore_targets} selects no trainable weight")
    group: dict[str, Any] = {"params": galore}
    if spec.galore:
        group.update(galore_group(cfg), **moments)
    if spec.matrix_group is not None:
        group.update(spec.matrix_group(cfg))
    if "rank" in group:
        _check_rank(galore, group["rank"])
    return [{"params": plain}, group] if plain else [group]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer named by cfg.optimizer (and cfg.eightbit) over the model's trainable parameters."""
    spec = OPTIMIZERS[resolve_optimizer_name(cfg.optimizer, cfg.eightbit)]
    if cfg.norm_growth_limit and not spec.norm_growth:
        raise UserError(f"--norm-growth-limit applies to {', '.join(NORM_GROWTH_NAMES)}, not {spec.name}")
    moments = moments_group(spec.name, cfg.moments_dtype)
    if spec.galore or spec.matrix_group is not None:
        params: Any = _matrix_groups(model, cfg, spec, moments)
    else:
        params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UserError("the model has no trainable parameters")
    try:
        return spec.load()(params, **spec.settings(cfg))
    except ValueError as err:  # optimizer-side checks (e.g. an unknown proj_type) are user input too
        raise UserError(str(err)) from None
