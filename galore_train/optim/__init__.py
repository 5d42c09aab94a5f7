"""Optimizers: the GaLore family (torch.optim style, usable on their own) and the --optimizer registry."""

from galore_train.optim.galore_adafactor import GaLoreAdafactor
from galore_train.optim.galore_adamw import GaLoreAdamW
from galore_train.optim.galore_adamw8bit import GaLoreAdamW8bit
from galore_train.optim.natural_galore import NaturalGaLoreAdamW
from galore_train.optim.projector import GaLoreOptimizer, GaLoreProjector
from galore_train.optim.registry import (
    OPTIMIZER_NAMES,
    build_optimizer,
    galore_parameter_split,
    resolve_optimizer_name,
)

__all__ = [
    "GaLoreAdafactor",
    "GaLoreAdamW",
    "GaLoreAdamW8bit",
    "GaLoreOptimizer",
    "GaLoreProjector",
    "NaturalGaLoreAdamW",
    "OPTIMIZER_NAMES",
    "build_optimizer",
    "galore_parameter_split",
    "resolve_optimizer_name",
]
