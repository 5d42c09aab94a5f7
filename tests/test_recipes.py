"""`--recipe paper` for Fira, APOLLO, APOLLO-Mini and Muon (issue 18): each paper's published values per size,
pinned here as the papers state them, explicit flags winning, the `recipes` listing, unknown combinations refused."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli import parse_pretrain
from typer.testing import CliRunner

from galore_train.cli import app
from galore_train.config import TrainConfig
from galore_train.errors import UserError
from galore_train.plan import plan_steps
from galore_train.recipes import MICRO_BATCH, OPTIMIZER_RECIPES, apply_recipe, recipe_rows
from galore_train.registry import OPTIMIZERS

ROOT = Path(__file__).resolve().parents[1]
SQRT_128 = math.sqrt(128)
STEPS = {"llama_60m": 10_000, "llama_130m": 20_000, "llama_350m": 60_000, "llama_1b": 100_000}
RANKS = {"llama_60m": 128, "llama_130m": 256, "llama_350m": 256, "llama_1b": 512}  # GaLore's: 1/4 of d_model
FIRA_ALPHA = {"llama_60m": 0.25, "llama_130m": 0.25, "llama_350m": 0.25, "llama_1b": 0.0625}
# APOLLO's launch scripts (github.com/zhuhanqing/APOLLO scripts/pretrain_c4/llama_*_apollo*.sh, read for the
# numbers): APOLLO rank 128/192/256/256/256 at 60M/130M/350M/1B/7B (README: "256 works well for 1B and 7B");
# APOLLO-Mini's apollo_scale 128, 192 at 130M, which their package square-roots.
APOLLO_RANKS = {"llama_60m": 128, "llama_130m": 192, "llama_350m": 256, "llama_1b": 256}
MINI_SCALES = {"llama_60m": SQRT_128, "llama_130m": math.sqrt(192), "llama_350m": SQRT_128, "llama_1b": SQRT_128}


# eps: both reference implementations default to 1e-6 (added to the uncorrected sqrt(V)); launch scripts keep it
FIRA = dict(fira_residual="code", norm_growth_limit=1.01, eps=1e-6)  # the authors' residual, the paper's gamma
APOLLO = dict(lr=0.01, gap=200, apollo_proj="random", norm_growth_limit=1.01, eps=1e-6)


def expected(optimizer: str, model: str) -> dict:
    """The published values as their sources state them (the comments of recipes.py cite each), written out
    here independently of recipes.py."""
    if model == "llama_7b":
        return {
            "fira_adamw": dict(FIRA, rank=64, lr=0.005, scale=0.0625, gap=500, grad_clipping=1.0),
            "apollo_adamw": dict(APOLLO, rank=256, apollo_scale=1.0, apollo_scale_type="channel"),
            "apollo_mini": dict(APOLLO, rank=1, apollo_scale=SQRT_128),
        }[optimizer] | {"num_training_steps": 10_000 if optimizer == "fira_adamw" else 150_000}
    return {
        "fira_adamw": dict(FIRA, rank=RANKS[model], lr=0.01, scale=FIRA_ALPHA[model], gap=200),
        "apollo_adamw": dict(APOLLO, rank=APOLLO_RANKS[model], apollo_scale=1.0, apollo_scale_type="channel"),
        "apollo_mini": dict(APOLLO, rank=1, apollo_scale=MINI_SCALES[model]),
        "muon": dict(lr=0.001, weight_decay=0.1),
    }[optimizer] | {"num_training_steps": STEPS[model]}


COMBINATIONS = [
    (optimizer, model)
    for optimizer in ("fira_adamw", "apollo_adamw", "apollo_mini", "muon")
    for model in (*STEPS, "llama_7b")
    if not (optimizer == "muon" and model == "llama_7b")
]


@pytest.mark.parametrize("optimizer, model", COMBINATIONS)
def test_each_papers_settings_per_size(optimizer: str, model: str) -> None:
    cfg = apply_recipe(TrainConfig(model=model, optimizer=optimizer, recipe="paper"), explicit=set()).validate()
    assert {name: getattr(cfg, name) for name in expected(optimizer, model)} == expected(optimizer, model)
    assert (cfg.total_batch_size, cfg.max_length, cfg.scheduler, cfg.min_lr_ratio) == (512, 256, "cosine", 0.1)
    plan = plan_steps(cfg, world_size=1)
    assert cfg.batch_size == MICRO_BATCH[model] and plan.accumulation <= 64  # not 64 micro-batches of 8 at 60M
    assert plan.warmup_steps == cfg.num_training_steps // 10  # Fira's scripts: 1K/2K/6K/10K/1K; the others 10%
    if (optimizer, model) != ("fira_adamw", "llama_7b"):
        assert cfg.grad_clipping == 0.0  # only Fira's 7B script clips; APOLLO's limiter stands in for it
    if optimizer == "muon":
        assert cfg.norm_growth_limit is None  # the limiter is not Muon's


def test_the_recipe_reaches_the_optimizer_groups() -> None:
    """What the optimizer is built with: APOLLO-Mini's rank 1 and sqrt(128), APOLLO's channels, Fira's residual."""
    recipe = {
        name: apply_recipe(TrainConfig(model="llama_1b", optimizer=name, recipe="paper"), set())
        for name in OPTIMIZER_RECIPES
    }
    mini = OPTIMIZERS["apollo_mini"].matrix_group(recipe["apollo_mini"])
    assert (mini["rank"], mini["scale"], mini["scale_type"], mini["norm_growth_limit"]) == (1, SQRT_128, "tensor", 1.01)
    apollo = OPTIMIZERS["apollo_adamw"].matrix_group(recipe["apollo_adamw"])
    assert (apollo["scale"], apollo["scale_type"], apollo["proj"]) == (1.0, "channel", "random")
    assert OPTIMIZERS["fira_adamw"].settings(recipe["fira_adamw"])["residual"] == "code"
    assert OPTIMIZERS["muon"].settings(recipe["muon"])["weight_decay"] == 0.1


def test_galore_and_the_baselines_keep_the_galore_papers_settings() -> None:
    galore = apply_recipe(TrainConfig(model="llama_1b", optimizer="galore_adamw", recipe="paper"), set())
    assert (galore.lr, galore.rank, galore.scale, galore.gap, galore.norm_growth_limit) == (0.01, 512, 0.25, 200, None)
    adamw = apply_recipe(TrainConfig(model="llama_1b", optimizer="adamw", recipe="paper"), set())
    assert (adamw.lr, adamw.weight_decay) == (0.001, 0.0)


def test_explicit_flags_win() -> None:
    cfg = TrainConfig(model="llama_1b", optimizer="fira_adamw", recipe="paper", scale=0.25, lr=0.02)
    resolved = apply_recipe(cfg, explicit={"scale", "lr"})
    assert (resolved.scale, resolved.lr, resolved.rank, resolved.num_training_steps) == (0.25, 0.02, 512, 100_000)
    mini = parse_pretrain(
        "--model", "llama_60m", "--optimizer", "apollo_mini", "--recipe", "paper", "--apollo-scale", "2"
    )
    assert (mini.apollo_scale, mini.rank, mini.lr) == (2.0, 1, 0.01)
    muon = parse_pretrain("--model", "llama_60m", "--optimizer", "muon", "--recipe", "paper", "--weight-decay", "0")
    assert (muon.weight_decay, muon.lr) == (0.0, 0.001)
    layerwise = apply_recipe(
        TrainConfig(model="llama_7b", optimizer="fira_adamw", recipe="paper", layerwise=True), set()
    )
    assert layerwise.grad_clipping == 0.0 and layerwise.rank == 64  # layer-wise updates cannot clip globally


@pytest.mark.parametrize(
    "optimizer, model, message",
    [
        ("muon", "llama_7b", "no published settings for --optimizer muon on 'llama_7b'; it covers llama_60m, "),
        ("fira_adamw", "llama_9m", "no published settings for --optimizer fira_adamw on 'llama_9m'"),
        ("apollo_mini", "configs/custom.json", "no published settings for --optimizer apollo_mini on 'custom'"),
    ],
)
def test_unpublished_combinations_are_refused(optimizer: str, model: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        apply_recipe(TrainConfig(model=model, optimizer=optimizer, recipe="paper"), set())


def test_an_unpublished_combination_is_one_line_on_the_command_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "galore_train", "pretrain", "--model", "llama_7b", "--optimizer", "muon"]
        + ["--recipe", "paper"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "muon on 'llama_7b'" in result.stderr


def test_recipes_lists_every_combination_with_its_source() -> None:
    rows = {
        (model, name): (settings, source)
        for model, names, settings, source in recipe_rows()
        for name in names.split(", ")
    }
    for optimizer, model in COMBINATIONS:
        settings, source = rows[model, optimizer]
        assert f"num_training_steps={expected(optimizer, model)['num_training_steps']}" in settings
        assert source
    assert (
        "apollo_scale=11.3137" in rows["llama_60m", "apollo_mini"][0]
        and "rank=1," in rows["llama_60m", "apollo_mini"][0]
    )
    assert "scale=0.0625" in rows["llama_1b", "fira_adamw"][0] and "llama_1b.sh" in rows["llama_1b", "fira_adamw"][1]
    assert "llama_7b_apollo.sh" in rows["llama_7b", "apollo_adamw"][1]
    assert "arXiv 2502.16982" in rows["llama_60m", "muon"][1]
    assert ("llama_7b", "muon") not in rows
    assert rows["llama_60m", "galore_adamw"] == rows["llama_60m", "galore_adamw8bit"]  # one row for both
    output = CliRunner().invoke(app, ["recipes"], env={"COLUMNS": "300"}).output
    assert "all: total_batch_size=512, max_length=256" in output
    assert all(optimizer in output for optimizer, _ in COMBINATIONS)


def test_the_micro_batch_is_the_recipes_unless_given() -> None:
    """`--recipe paper` at the default micro-batch 8 made 64 micro-batches per step at 60M; an explicit
    --batch-size still wins."""
    filled = apply_recipe(TrainConfig(model="llama_60m", optimizer="galore_adamw", recipe="paper"), explicit=set())
    assert filled.batch_size == 64 and plan_steps(filled, world_size=1).accumulation == 8
    given = apply_recipe(TrainConfig(model="llama_60m", batch_size=8, recipe="paper"), explicit={"batch_size"})
    assert given.batch_size == 8 and plan_steps(given, world_size=1).accumulation == 64
