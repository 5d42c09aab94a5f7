"""`--recipe paper`: each paper's published settings per model size, so nobody has to dig them out of a PDF.

PAPER_RECIPES is the GaLore paper's protocol per model (GaLore-family optimizers, and the baselines);
OPTIMIZER_RECIPES holds the optimizers whose own paper publishes other settings (Fira, APOLLO, APOLLO-Mini)
or that follow another paper's rule (Muon). A recipe fills in TrainConfig fields the user did not set on the
command line; explicit flags always win. The resolved configuration is printed at start and saved with every
checkpoint; `galore-train recipes` lists `recipe_rows()`, derived from these tables.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from galore_train.config import TrainConfig
from galore_train.errors import UserError
from galore_train.optim.apollo import APOLLO_SCALE, MINI_SCALE
from galore_train.optim.norm_growth import DEFAULT_LIMIT
from galore_train.registry import GALORE_NAMES, OPTIMIZERS, listing

# Table 2 / Section 5.1: total batch 512 x 256 tokens, cosine to 10% with 10% warm-up, GaLore lr 0.01,
# scale 0.25, gap 200; rank and steps per size. Steps, not Table 2's token counts (1.1B/2.2B/6.4B/13.1B):
# the paper's Table 5 and its reference scripts train 10K/20K/60K/100K steps, i.e. 1.3B/2.6B/7.9B/13.1B
# token positions at 512 x 256; a token budget would stop at 8,393/16,785/48,829/99,946 steps, shortening the
# cosine schedule. scripts/paper_*.sh use this recipe: it is the one copy of these numbers.
_COMMON = {"total_batch_size": 512, "max_length": 256, "scheduler": "cosine", "min_lr_ratio": 0.1, "warmup_steps": None}
_GALORE = {"lr": 0.01, "scale": 0.25, "gap": 200}
# Baselines' lr: the paper tunes it per method from {0.01, 0.005, 0.001, 0.0005, 0.0001} without publishing
# the winners; 0.001 is the value the reference scripts use for full-rank AdamW. An assumption, stated.
_BASELINE = {"lr": 0.001}
_BASELINE_SOURCE = "; lr 0.001 assumed (the paper tunes it per method without publishing it)"


# The micro-batch per device when --batch-size is not given: the paper publishes only the total batch (512), and
# the default micro-batch 8 made 64 micro-batches per step on one GPU. The largest power of two whose estimated
# bf16 peak (galore-train memory) fits a 24 GB card for AdamW and GaLore at 60M-1B (9.2, 13.2, 13.6, 17.6 GiB);
# 7B: the Table 3 reference's micro-batch (64 A100-80GB). On one GPU: 8, 8, 16, 32 and 64 micro-batches per step.
MICRO_BATCH = {"llama_60m": 64, "llama_130m": 64, "llama_350m": 32, "llama_1b": 16, "llama_7b": 8}


@dataclass(frozen=True)
class Recipe:
    values: dict[str, Any]
    source: str


def _size(size: str, rank: int, steps: int) -> Recipe:
    return Recipe(
        {**_COMMON, "rank": rank, "num_training_steps": steps},
        f"GaLore paper Table 2 ({size}: rank {rank}), Table 5 and reference scripts ({steps // 1000}K steps)",
    )


PAPER_RECIPES: dict[str, Recipe] = {
    "llama_60m": _size("60M", 128, 10_000),
    "llama_130m": _size("130M", 256, 20_000),
    "llama_350m": _size("350M", 256, 60_000),
    "llama_1b": _size("1B", 512, 100_000),
    "llama_7b": Recipe(
        {
            **_COMMON,
            "rank": 1024,
            "gap": 500,
            "scale": 0.25,
            "lr": 0.005,
            "num_training_steps": 150_000,
            "grad_clipping": 1.0,
        },
        "GaLore paper Table 3 / Section 5.2 (7B: rank 1024, gap 500, lr 0.005, 150K steps)",
    ),
}


# --- Optimizers with settings of their own paper: optimizer -> model -> Recipe ---------------------------
# Each recipe is complete: GaLore's C4 setup, under which these papers pre-train (PAPER_RECIPES at the Table 2
# sizes, _COMMON at 7B), plus its own values.
# Optimizer constants below (the limiter's gamma, APOLLO's scales) are the optimizers' defaults, which are
# these papers' values; the recipe states them so that `galore-train recipes` shows them with a source.

# Fira (Chen et al., arXiv 2410.01623): the paper follows GaLore's setup; its per-size values are those of the
# authors' published launch scripts (github.com/xichen-fy/Fira, pre_training_c4/scripts/llama_*.sh, Apache-2.0,
# read for the numbers only): GaLore's ranks, lr 0.01 and gap 200; alpha (our --scale) 0.25 up to 350M, 0.0625
# at 1B and 7B; weight decay 0; warm-up 1K/2K/6K/10K/1K steps = 10% (our default); batch 512 (sequence length:
# not passed, so their GaLore-derived trainer's 256). 7B: rank 64, lr 0.005, gap 500, clipping 1.0, 10K steps.
# gamma: the paper's 1.01. Residual "code" (alpha P P^T G subtracted): the authors' code, which produced the
# published perplexities (docs/beyond_galore.md). eps 1e-6: their optimizer's default (the scripts pass none),
# added to the uncorrected sqrt(V) as FiraAdamW does (optim/galore_adamw.py, EPS_ON_CORRECTED_V).
_FIRA_SOURCE = "Fira paper (arXiv 2410.01623: gamma 1.01) and the authors' pre_training_c4/scripts/{model}.sh"
_FIRA = {"fira_residual": "code", "norm_growth_limit": DEFAULT_LIMIT, "eps": 1e-6}

# APOLLO and APOLLO-Mini (Zhu et al., arXiv 2412.05270), from the authors' launch scripts
# (github.com/zhuhanqing/APOLLO, scripts/pretrain_c4/llama_*_apollo*.sh; their code is under a non-commercial
# license: read for the numbers only), README and project page. APOLLO: rank 128 / 192 / 256 / 256 / 256 at
# 60M / 130M / 350M / 1B / 7B (130M: "exact 1/4 of llama 130M model dimension", 768 / 4; README: "256 for
# APOLLO works well for 1B and 7B"), scale 1, channel-wise. APOLLO-Mini: rank 1, tensor-wise, apollo_scale 128
# (192 at 130M: "exact 1/4 of llama model dimension"), which their package square-roots: our factor sqrt(128),
# sqrt(192). Both: random projection, lr 0.01, gap 200, weight decay 0, warm-up 10%, GaLore's batch and steps
# (7B: 150K), the limiter (gamma 1.01) instead of clipping, eps 1e-6 (their optimizer's default, the scripts
# pass none; on the uncorrected sqrt(V), as ApolloAdamW does).
_APOLLO_SOURCE = "APOLLO (arXiv 2412.05270): the authors' scripts/pretrain_c4/{model}_apollo{mini}.sh and README"
_APOLLO = {"lr": 0.01, "gap": 200, "apollo_proj": "random", "norm_growth_limit": DEFAULT_LIMIT, "eps": 1e-6}
_APOLLO_RANKS = {"llama_60m": 128, "llama_130m": 192, "llama_350m": 256, "llama_1b": 256, "llama_7b": 256}
_MINI_SCALES = {model: math.sqrt(192) if model == "llama_130m" else MINI_SCALE for model in _APOLLO_RANKS}

# Muon (Jordan et al. 2024) with Moonlight's rule (Liu et al., arXiv 2502.16982): scale each matrix's update to
# AdamW's RMS (0.2 sqrt(max(m, n)), optim/muon.py) and reuse AdamW's lr and weight decay; their weight decay 0.1,
# momentum 0.95, Nesterov, 5 Newton-Schulz steps (torch.optim.Muon's defaults, fixed in optim/muon.py). The lr is
# this protocol's AdamW lr (_BASELINE, an assumption stated above). No 7B: the protocol has no AdamW lr there.
_MUON_SOURCE = "Moonlight (arXiv 2502.16982): AdamW-matched update RMS, weight decay 0.1, AdamW's lr" + _BASELINE_SOURCE
_MUON = {**_BASELINE, "weight_decay": 0.1}

# GaLore at 7B with --layerwise is the paper's one-GPU run (Section 5.2, Figure 1; the reference's
# scripts/single_gpu/llama_7b_checkpointing.sh): micro-batch 16 with activation checkpointing, 22.8 GB measured there
# (`galore-train memory` estimates 20.6 GiB = 22.1 GB with --8bit). The total batch is the micro-batch (None: batch x
# processes): accumulating under --layerwise holds a 13.5 GB gradient, and the reference, asked for 512, updated on
# every micro-batch in layer-wise mode, i.e. the same effective batch (scripts/paper_4090_7b.sh). Also under DDP
# (whole gradients on every GPU); not under --distributed fsdp, whose held gradient shards are 1/N: the paper's total
# batch of 512 stays there (scripts/paper_8x24gb_7b.sh).
_ONE_GPU_7B = {"batch_size": 16, "total_batch_size": None, "activation_checkpointing": True}
_ONE_GPU_7B_SOURCE = "; --layerwise: the paper's one-GPU run (micro-batch 16 = total batch, activation checkpointing)"

_TABLE2_SIZES = ("llama_60m", "llama_130m", "llama_350m", "llama_1b")


def _galore_protocol(model: str, **values: Any) -> dict[str, Any]:
    """GaLore's setup at a Table 2 size (batch, schedule, steps, GaLore's rank), then `values`."""
    return {**PAPER_RECIPES[model].values, **values}


def _apollo_protocol(model: str) -> dict[str, Any]:
    """GaLore's setup (7B: its batch and schedule, 150K steps, no clipping) with APOLLO's shared values."""
    if model == "llama_7b":
        return {**_COMMON, **_APOLLO, "num_training_steps": 150_000}
    return _galore_protocol(model, **_APOLLO)


OPTIMIZER_RECIPES: dict[str, dict[str, Recipe]] = {
    "fira_adamw": {
        **{
            model: Recipe(
                _galore_protocol(model, **{**_GALORE, "scale": 0.0625 if model == "llama_1b" else 0.25}, **_FIRA),
                _FIRA_SOURCE.format(model=model),
            )
            for model in _TABLE2_SIZES
        },
        "llama_7b": Recipe(
            {
                **_COMMON,
                "rank": 64,
                "lr": 0.005,
                "scale": 0.0625,
                "gap": 500,
                "grad_clipping": 1.0,
                "num_training_steps": 10_000,
                **_FIRA,
            },
            _FIRA_SOURCE.format(model="llama_7b"),
        ),
    },
    "apollo_adamw": {
        model: Recipe(
            {
                **_apollo_protocol(model),
                "rank": _APOLLO_RANKS[model],
                "apollo_scale": APOLLO_SCALE,
                "apollo_scale_type": "channel",
            },
            _APOLLO_SOURCE.format(model=model, mini=""),
        )
        for model in _APOLLO_RANKS
    },
    "apollo_mini": {
        model: Recipe(
            {**_apollo_protocol(model), "rank": 1, "apollo_scale": _MINI_SCALES[model]},
            _APOLLO_SOURCE.format(model=model, mini="_mini"),
        )
        for model in _APOLLO_RANKS
    },
    "muon": {model: Recipe(_galore_protocol(model, **_MUON), _MUON_SOURCE) for model in _TABLE2_SIZES},
}
OPTIMIZER_RECIPES["muon8bit"] = OPTIMIZER_RECIPES["muon"]  # the same Muon, its momentum in 8 bits


def _one_gpu_run(model: str, optimizer: str) -> bool:
    """Whether --layerwise makes this the paper's one-GPU 7B run (_ONE_GPU_7B)."""
    return model == "llama_7b" and optimizer in GALORE_NAMES and optimizer not in OPTIMIZER_RECIPES


def paper_recipe(model: str, optimizer: str, layerwise: bool = False, sharded: bool = False) -> Recipe:
    """The published settings for `model` (a name or config path) and `optimizer` (`layerwise`: --layerwise,
    `sharded`: --distributed fsdp); a one-line UserError if none."""
    name = Path(model).stem
    if optimizer in OPTIMIZER_RECIPES:
        covered = OPTIMIZER_RECIPES[optimizer]
        if name not in covered:
            raise UserError(
                f"--recipe paper has no published settings for --optimizer {optimizer} on {name!r}; "
                f"it covers {listing(list(covered))}"
            )
        recipe = covered[name]
    else:
        if name not in PAPER_RECIPES:
            raise UserError(f"--recipe paper covers {', '.join(PAPER_RECIPES)}; {name!r} has no published settings")
        recipe = PAPER_RECIPES[name]
        if name != "llama_7b":
            galore = optimizer in OPTIMIZERS and OPTIMIZERS[optimizer].galore
            extra = _GALORE if galore else _BASELINE
            recipe = Recipe({**recipe.values, **extra}, recipe.source + ("" if galore else _BASELINE_SOURCE))
    recipe = Recipe({"batch_size": MICRO_BATCH[name], **recipe.values}, recipe.source)
    if layerwise and not sharded and _one_gpu_run(name, optimizer):
        recipe = Recipe({**recipe.values, **_ONE_GPU_7B}, recipe.source + _ONE_GPU_7B_SOURCE)
    if layerwise and "grad_clipping" in recipe.values:
        # layer-wise updates cannot clip the global norm (the GaLore paper's 4090 run: none)
        recipe = Recipe({k: v for k, v in recipe.values.items() if k != "grad_clipping"}, recipe.source)
    return recipe


def recipe_values(cfg: TrainConfig) -> dict[str, Any]:
    """The values `--recipe paper` sets for this model and optimizer."""
    if cfg.recipe != "paper":
        raise UserError(f"unknown --recipe {cfg.recipe!r}; known: paper")
    return dict(recipe_for(cfg).values)


def recipe_for(cfg: TrainConfig) -> Recipe:
    """The paper's recipe for this configuration's model, optimizer, --layerwise and --distributed."""
    return paper_recipe(cfg.model, cfg.optimizer, cfg.layerwise, cfg.distributed == "fsdp")


def recipe_rows() -> list[tuple[str, str, str, str]]:
    """(model, optimizers, settings, source) for every published combination, the settings without those of
    common_settings(); optimizers with the same recipe share a row. What `galore-train recipes` prints: derived
    from the tables, never typed twice."""
    models = list(dict.fromkeys([*PAPER_RECIPES, *(m for covered in OPTIMIZER_RECIPES.values() for m in covered)]))
    rows = []
    for model, layerwise in [*((model, False) for model in models), ("llama_7b", True)]:
        groups: dict[tuple[str, str], list[str]] = {}
        for optimizer in OPTIMIZERS:
            try:
                recipe = paper_recipe(model, optimizer, layerwise)
            except UserError:
                continue
            if layerwise and not _one_gpu_run(model, optimizer):
                continue  # elsewhere, --layerwise only drops clipping
            own = {k: v for k, v in recipe.values.items() if k not in _COMMON or _COMMON[k] != v}
            groups.setdefault((_settings(own), recipe.source), []).append(optimizer)
        label = f"{model} --layerwise" if layerwise else model
        rows += [(label, ", ".join(names), settings, source) for (settings, source), names in groups.items()]
    return rows


def common_settings() -> str:
    """The settings every recipe shares (GaLore's C4 setup; warm-up: the default 10% of the steps)."""
    return _settings({k: v for k, v in _COMMON.items() if v is not None})


def _settings(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={f'{v:g}' if isinstance(v, float) else v}" for k, v in values.items())


def apply_recipe(cfg: TrainConfig, explicit: set[str]) -> TrainConfig:
    """Fill in the recipe's values for every field the user did not give explicitly."""
    values = {key: value for key, value in recipe_values(cfg).items() if key not in explicit}
    if "max_train_tokens" in explicit:
        values.pop("num_training_steps", None)  # the user's token budget decides the steps
    return cfg.replace(**values)
