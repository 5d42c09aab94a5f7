"""`--recipe paper`: the GaLore paper's settings per model size, so nobody has to dig them out of a PDF.

A recipe fills in TrainConfig fields the user did not set on the command line; explicit flags always
win. The resolved configuration is printed at start and saved with every checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from galore_train.config import TrainConfig
from galore_train.errors import UserError
from galore_train.registry import OPTIMIZERS

# Table 2 / Section 5.1: total batch 512 x 256 tokens, cosine to 10% with 10% warm-up, GaLore lr 0.01,
# scale 0.25, gap 200; rank and token budget per size.
_COMMON = {"total_batch_size": 512, "max_length": 256, "scheduler": "cosine", "min_lr_ratio": 0.1, "warmup_steps": None}
_GALORE = {"lr": 0.01, "scale": 0.25, "gap": 200}
# Baselines' lr: the paper tunes it per method from {0.01, 0.005, 0.001, 0.0005, 0.0001} without publishing
# the winners; 0.001 is the value the reference scripts use for full-rank AdamW. An assumption, stated.
_BASELINE = {"lr": 0.001}


@dataclass(frozen=True)
class Recipe:
    values: dict[str, Any]
    source: str


def _size(rank: int, tokens: str, table: str) -> Recipe:
    return Recipe({**_COMMON, "rank": rank, "max_train_tokens": tokens}, f"GaLore paper {table}")


PAPER_RECIPES: dict[str, Recipe] = {
    "llama_60m": _size(128, "1.1B", "Table 2 (60M: rank 128, 1.1B tokens)"),
    "llama_130m": _size(256, "2.2B", "Table 2 (130M: rank 256, 2.2B tokens)"),
    "llama_350m": _size(256, "6.4B", "Table 2 (350M: rank 256, 6.4B tokens)"),
    "llama_1b": _size(512, "13.1B", "Table 2 (1B: rank 512, 13.1B tokens)"),
    "llama_7b": Recipe({**_COMMON, "rank": 1024, "gap": 500, "scale": 0.25, "lr": 0.005,
                         "num_training_steps": 150_000, "grad_clipping": 1.0},
                       "GaLore paper Table 3 / Section 5.2 (7B: rank 1024, gap 500, lr 0.005, 150K steps)"),
}


def recipe_values(cfg: TrainConfig) -> dict[str, Any]:
    """The values `--recipe paper` sets for this model and optimizer."""
    name = Path(cfg.model).stem
    if cfg.recipe != "paper":
        raise UserError(f"unknown --recipe {cfg.recipe!r}; known: paper")
    if name not in PAPER_RECIPES:
        raise UserError(f"--recipe paper covers {', '.join(PAPER_RECIPES)}; {name!r} has no published settings")
    recipe = PAPER_RECIPES[name]
    values = dict(recipe.values)
    if name != "llama_7b":
        galore = cfg.optimizer in OPTIMIZERS and OPTIMIZERS[cfg.optimizer].galore
        values.update(_GALORE if galore else _BASELINE)
    if cfg.layerwise:
        values.pop("grad_clipping", None)  # layer-wise updates cannot clip the global norm (paper's 4090 run: none)
    if "max_train_tokens" in values:
        values["num_training_steps"] = None  # the token budget decides the steps
    return values


def apply_recipe(cfg: TrainConfig, explicit: set[str]) -> TrainConfig:
    """Fill in the recipe's values for every field the user did not give explicitly."""
    values = {key: value for key, value in recipe_values(cfg).items() if key not in explicit}
    if "num_training_steps" in explicit:
        values.pop("max_train_tokens", None)
    return cfg.replace(**values)
