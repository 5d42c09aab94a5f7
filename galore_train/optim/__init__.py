"""Optimizers: the GaLore family, torch.optim style and usable on their own (torch is their only dependency).

The --optimizer names, and how a TrainConfig builds one of these, live outside this package:
galore_train/registry.py and galore_train/optimizers.py.
"""

from galore_train.optim.apollo import ApolloAdamW
from galore_train.optim.base import GaLoreOptimizer
from galore_train.optim.fira import FiraAdamW
from galore_train.optim.galore_adafactor import GaLoreAdafactor
from galore_train.optim.galore_adamw import GaLoreAdamW
from galore_train.optim.galore_adamw8bit import GaLoreAdamW8bit
from galore_train.optim.layout import StateTensor
from galore_train.optim.muon import MuonAdamW
from galore_train.optim.natural_galore import NaturalGaLoreAdamW
from galore_train.optim.projector import GaLoreProjector
from galore_train.optim.sinkgd import SinkGDAdamW
from galore_train.optim.swan import SwanAdamW

__all__ = [
    "ApolloAdamW",
    "FiraAdamW",
    "GaLoreAdafactor",
    "GaLoreAdamW",
    "GaLoreAdamW8bit",
    "GaLoreOptimizer",
    "GaLoreProjector",
    "MuonAdamW",
    "NaturalGaLoreAdamW",
    "SinkGDAdamW",
    "StateTensor",
    "SwanAdamW",
]
