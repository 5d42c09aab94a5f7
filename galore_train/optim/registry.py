"""`--optimizer NAME` -> a torch.optim.Optimizer for the model, and the GaLore parameter grouping.

GaLore optimizers get two param groups: the .weight of every target linear layer
(`galore_train.model.target_linear_modules`, the one rule shared with LoRA and the memory estimator)
in a GaLore group, everything else (embeddings, norms, lm_head) in a plain full-rank group run by the
same base optimizer. Only parameters with requires_grad are optimized.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn

from galore_train.config import TrainConfig
from galore_train.errors import UserError
from galore_train.model import target_linear_modules
from galore_train.optim.apollo import APOLLO_SCALE, MINI_SCALE, ApolloAdamW
from galore_train.optim.fira import FiraAdamW
from galore_train.optim.galore_adafactor import GaLoreAdafactor
from galore_train.optim.galore_adamw import GaLoreAdamW
from galore_train.optim.galore_adamw8bit import GaLoreAdamW8bit, import_bitsandbytes
from galore_train.optim.muon import MuonAdamW
from galore_train.optim.natural_galore import NaturalGaLoreAdamW
from galore_train.optim.norm_growth import DEFAULT_LIMIT

NamedParams = list[tuple[str, nn.Parameter]]

FULL_RANK_NAMES = ("adamw", "adam", "adafactor", "adam8bit")
GALORE_NAMES = ("galore_adamw", "galore_adafactor", "galore_adamw8bit", "natural_galore_adamw")
BEYOND_NAMES = ("fira_adamw", "apollo_adamw", "apollo_mini", "muon")  # beyond GaLore (issue 18), built below
NORM_GROWTH_NAMES = BEYOND_NAMES[:3]  # the optimizers that take --norm-growth-limit
OPTIMIZER_NAMES = FULL_RANK_NAMES + GALORE_NAMES + BEYOND_NAMES
_EIGHTBIT = {"adamw": "adam8bit", "adam": "adam8bit", "galore_adamw": "galore_adamw8bit"}


def resolve_optimizer_name(name: str, eightbit: bool) -> str:
    """The optimizer actually built for --optimizer NAME [--8bit]."""
    if name not in OPTIMIZER_NAMES:
        raise UserError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZER_NAMES)}")
    if not eightbit or name in ("adam8bit", "galore_adamw8bit"):
        return name
    if name not in _EIGHTBIT:
        raise UserError(f"--8bit has no variant of {name!r}; it applies to adamw, adam and galore_adamw")
    return _EIGHTBIT[name]


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
            raise UserError(f"--rank {rank} is not below min{tuple(param.shape)} of {name}: GaLore would save nothing; lower --rank")


def _galore_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    galore, plain = galore_parameter_split(model, cfg.galore_targets)
    if not galore:
        raise UserError(f"--galore-targets {cfg.galore_targets} selects no trainable weight")
    _check_rank(galore, cfg.rank)
    galore_group = {"params": galore, "rank": cfg.rank, "update_proj_gap": cfg.gap, "scale": cfg.scale,
                    "proj_type": cfg.proj_type, "svd": cfg.svd, "stagger_refresh": cfg.stagger_refresh,
                    "proj_bits": cfg.proj_bits, "proj_group_size": cfg.proj_group_size, "adaptive_gap": cfg.adaptive_gap,
                    "cos_threshold": cfg.cos_threshold}
    return [{"params": plain}, galore_group] if plain else [galore_group]


def _adam_betas(cfg: TrainConfig) -> tuple[float, float]:
    return (0.9 if cfg.beta1 is None else cfg.beta1, cfg.beta2)


_BUILDERS: dict[str, Callable[[Any, TrainConfig], torch.optim.Optimizer]] = {
    "adamw": lambda params, cfg: torch.optim.AdamW(params, lr=cfg.lr, betas=_adam_betas(cfg), eps=cfg.eps, weight_decay=cfg.weight_decay),
    "adam": lambda params, cfg: torch.optim.Adam(params, lr=cfg.lr, betas=_adam_betas(cfg), eps=cfg.eps, weight_decay=cfg.weight_decay),
    "adam8bit": lambda params, cfg: import_bitsandbytes().optim.AdamW8bit(params, lr=cfg.lr, betas=_adam_betas(cfg), eps=cfg.eps, weight_decay=cfg.weight_decay),
    "adafactor": lambda params, cfg: GaLoreAdafactor(params, lr=cfg.lr, beta1=cfg.beta1, weight_decay=cfg.weight_decay),
    "galore_adamw": lambda params, cfg: GaLoreAdamW(params, lr=cfg.lr, betas=_adam_betas(cfg), eps=cfg.eps, weight_decay=cfg.weight_decay),
    "galore_adamw8bit": lambda params, cfg: GaLoreAdamW8bit(params, lr=cfg.lr, betas=_adam_betas(cfg), eps=cfg.eps, weight_decay=cfg.weight_decay),
    "galore_adafactor": lambda params, cfg: GaLoreAdafactor(params, lr=cfg.lr, beta1=cfg.beta1, weight_decay=cfg.weight_decay),
    "natural_galore_adamw": lambda params, cfg: NaturalGaLoreAdamW(
        params, lr=cfg.lr, betas=_adam_betas(cfg), eps=cfg.eps, weight_decay=cfg.weight_decay,
        fisher_history=cfg.fisher_history, fisher_damping=cfg.fisher_damping),
    # --- beyond GaLore (issue 18): param groups from _beyond_groups -------------------------------
    "fira_adamw": lambda params, cfg: FiraAdamW(params, lr=cfg.lr, betas=_adam_betas(cfg), eps=cfg.eps,
                                                weight_decay=cfg.weight_decay, residual=cfg.fira_residual),
    "apollo_adamw": lambda params, cfg: ApolloAdamW(params, lr=cfg.lr, betas=_adam_betas(cfg), eps=cfg.eps,
                                                    weight_decay=cfg.weight_decay, proj_seed=cfg.seed),
    "apollo_mini": lambda params, cfg: ApolloAdamW(params, lr=cfg.lr, betas=_adam_betas(cfg), eps=cfg.eps,
                                                   weight_decay=cfg.weight_decay, proj_seed=cfg.seed),
    "muon": lambda params, cfg: MuonAdamW(params, lr=cfg.lr, betas=_adam_betas(cfg), eps=cfg.eps,
                                          weight_decay=cfg.weight_decay),
}


# --- beyond GaLore (issue 18) -------------------------------------------------------------------

def _norm_growth_limit(cfg: TrainConfig) -> Optional[float]:
    """--norm-growth-limit as a param-group value: unset -> Fira's and APOLLO's 1.01, 0 -> None (off)."""
    if cfg.norm_growth_limit is None:
        return DEFAULT_LIMIT
    return cfg.norm_growth_limit or None


def _beyond_groups(model: nn.Module, cfg: TrainConfig, name: str) -> list[dict[str, Any]]:
    """Param groups of the BEYOND_NAMES: GaLore's split; the target matrices get the method's keys."""
    mini = name == "apollo_mini"
    groups = _galore_groups(model, cfg.replace(rank=1) if name in ("muon", "apollo_mini") else cfg)  # muon: no rank
    if name == "muon":
        return groups[:-1] + [{"params": groups[-1]["params"], "muon": True}]
    matrices = groups[-1]
    matrices["norm_growth_limit"] = _norm_growth_limit(cfg)
    if name != "fira_adamw":
        matrices.update(proj=cfg.apollo_proj, scale_type="tensor" if mini else cfg.apollo_scale_type,
                        scale=cfg.apollo_scale if cfg.apollo_scale is not None else MINI_SCALE if mini else APOLLO_SCALE)
    return groups


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer named by cfg.optimizer (and cfg.eightbit) over the model's trainable parameters."""
    name = resolve_optimizer_name(cfg.optimizer, cfg.eightbit)
    if cfg.norm_growth_limit and name not in NORM_GROWTH_NAMES:
        raise UserError(f"--norm-growth-limit applies to {', '.join(NORM_GROWTH_NAMES)}, not {name}")
    if name in BEYOND_NAMES:
        params: Any = _beyond_groups(model, cfg, name)
    elif name in GALORE_NAMES:
        params = _galore_groups(model, cfg)
    else:
        params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UserError("the model has no trainable parameters")
    try:
        return _BUILDERS[name](params, cfg)
    except ValueError as err:  # optimizer-side checks (e.g. an unknown proj_type) are user input too
        raise UserError(str(err)) from None
