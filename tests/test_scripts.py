"""The scripts/ that reproduce the paper: every one runs under DRY_RUN=1, prints only commands, and every
printed `galore-train pretrain` command parses with the real CLI into a valid TrainConfig, so renaming a
flag or an optimizer breaks this test instead of a GPU job days later."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest
import typer

from galore_train.cli import app, config_from_cli
from galore_train.config import TrainConfig
from galore_train.fsdp import check_fsdp_supported
from galore_train.methods import METHOD_NAMES
from galore_train.model import load_model_config
from galore_train.plan import plan_steps
from galore_train.recipes import PAPER_RECIPES
from galore_train.registry import resolve_optimizer_name

ROOT = Path(__file__).resolve().parents[1]
# The experiment scripts: those built on scripts/_common.sh, which gives them DRY_RUN and MAX_STEPS
# (other scripts, like the CPU demo, really train when run).
SCRIPTS = sorted(
    p for p in (ROOT / "scripts").glob("*.sh") if not p.name.startswith("_") and "_common.sh" in p.read_text()
)
COMMANDS = typer.main.get_command(app)


def dry_run(script: Path, tmp_path: Path, **env: str) -> list[list[str]]:
    """The commands the script would run (comment lines dropped), as argument lists."""
    assert script in SCRIPTS, f"{script.name} does not use scripts/_common.sh: a dry run would really train"
    environment = {
        **os.environ,
        "DRY_RUN": "1",
        "RUNS_DIR": str(tmp_path / "runs"),
        "RESULTS": str(tmp_path / "results"),
        **env,
    }
    result = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=environment, timeout=60)
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "results").exists(), "a dry run must not run anything"
    lines = [line for line in result.stdout.splitlines() if line.strip() and not line.startswith("#")]
    return [shlex.split(line) for line in lines]


def pretrain_args(command: list[str]) -> tuple[list[str], int]:
    """(pretrain's flags, processes) of a `galore-train pretrain` or `torchrun ... -m galore_train pretrain` line."""
    if command[:2] == ["galore-train", "pretrain"]:
        return command[2:], 1
    assert command[0] == "torchrun", command
    at = command.index("-m")
    assert command[at + 1 : at + 3] == ["galore_train", "pretrain"], command
    launcher = command[1:at]
    processes = int(launcher[launcher.index("--nproc_per_node") + 1])
    nodes = int(launcher[launcher.index("--nnodes") + 1]) if "--nnodes" in launcher else 1
    return command[at + 3 :], processes * nodes


def parse_pretrain(args: list[str]) -> TrainConfig:
    """The TrainConfig the real CLI builds from these flags (unknown flags and bad values raise)."""
    command = COMMANDS.commands["pretrain"]
    with command.make_context("pretrain", list(args)) as ctx:
        return config_from_cli(dict(ctx.params), ctx)


def pretrain_configs(script: Path, tmp_path: Path, **env: str) -> list[tuple[TrainConfig, int]]:
    commands = dry_run(script, tmp_path, **env)
    training = [c for c in commands if c[0] == "torchrun" or c[:2] == ["galore-train", "pretrain"]]
    return [(parse_pretrain(args), processes) for args, processes in map(pretrain_args, training)]


def test_every_paper_experiment_has_a_script() -> None:
    names = {p.name for p in SCRIPTS}
    assert {
        "paper_table2.sh",
        "paper_table3_7b.sh",
        "paper_table8_memory_1b.sh",
        "paper_4090_7b.sh",
        "mini_table2.sh",
    } <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_dry_run_prints_valid_commands(script: Path, tmp_path: Path) -> None:
    commands = dry_run(script, tmp_path)
    assert all(c[0] in ("galore-train", "torchrun") for c in commands), "only galore-train / torchrun commands"
    configs = pretrain_configs(script, tmp_path)
    assert configs, "the script trains nothing"
    for cfg, processes in configs:
        load_model_config(cfg.model)  # a known model
        if cfg.optimizer not in METHOD_NAMES:
            resolve_optimizer_name(cfg.optimizer, cfg.eightbit)  # a known optimizer (and 8-bit variant)
        plan = plan_steps(cfg, processes)  # the total batch divides over the processes
        assert plan.warmup_steps == plan.total_steps // 10, "warm-up 10% of the steps"
        assert not (cfg.layerwise and cfg.grad_clipping > 0), "galore-train refuses clipping with --layerwise"
    names = [cfg.output_dir for cfg, _ in configs]
    assert len(set(names)) == len(names), "two runs share an output directory"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_max_steps_shortens_every_run(script: Path, tmp_path: Path) -> None:
    for cfg, _ in pretrain_configs(script, tmp_path, MAX_STEPS="7"):
        assert cfg.num_training_steps == 7 and cfg.max_train_tokens is None
        assert cfg.warmup_steps is None  # 10% of the 7 steps


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_header_states_gpus_and_expected_result(script: Path) -> None:
    header = script.read_text().split("\nsource ", 1)[0].split("\ncd ", 1)[0]
    assert "GPU" in header and "Expected" in header


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_report_covers_every_run_the_script_trains(script: Path, tmp_path: Path) -> None:
    """Every `galore-train report` line parses with the real CLI and writes a file, and together they report
    every run the script trains (a run missing from the report would be days of GPU time nobody sees)."""
    reports = [c for c in dry_run(script, tmp_path) if c[:2] == ["galore-train", "report"]]
    assert reports, "the script reports nothing"
    reported: set[Path] = set()
    for command in reports:
        with COMMANDS.commands["report"].make_context("report", command[2:]) as ctx:
            assert ctx.params["output"] is not None, command
            reported |= set(ctx.params["run_dirs"] or [])
    trained = {Path(cfg.output_dir) for cfg, _ in pretrain_configs(script, tmp_path)}
    assert trained <= reported, f"trained but not reported: {sorted(map(str, trained - reported))}"


def test_table2_has_the_papers_settings(tmp_path: Path) -> None:
    configs = {
        Path(cfg.output_dir).name: (cfg, n) for cfg, n in pretrain_configs(ROOT / "scripts/paper_table2.sh", tmp_path)
    }
    assert len(configs) == 4 * 5  # 60M-1B x Full-Rank, GaLore, Low-Rank, LoRA, ReLoRA
    expected = {"60m": (128, 10_000), "130m": (256, 20_000), "350m": (256, 60_000), "1b": (512, 100_000)}
    for size, (rank, steps) in expected.items():
        galore, processes = configs[f"llama_{size}-galore"]
        plan = plan_steps(galore, processes)
        assert (galore.optimizer, galore.rank, galore.gap, galore.scale) == ("galore_adamw", rank, 200, 0.25)
        assert galore.lr == 0.01
        assert (plan.total_steps, plan.warmup_steps, plan.total_batch_size) == (steps, steps // 10, 512)
        assert galore.max_length == 256
        assert (galore.scheduler, galore.min_lr_ratio, galore.dtype) == ("cosine", 0.1, "bf16")
        lora = configs[f"llama_{size}-lora"][0]
        assert (lora.rank, lora.lr) == (rank, 0.001)


@pytest.mark.parametrize("script", ["paper_table2.sh", "paper_table3_7b.sh", "paper_4090_7b.sh", "paper_8x24gb_7b.sh"])
def test_paper_scripts_take_their_settings_from_the_recipe(script: str, tmp_path: Path) -> None:
    """One copy of the paper's numbers (galore_train/recipes.py): the scripts pass `--recipe paper` and set
    no step count of their own."""
    for cfg, _ in pretrain_configs(ROOT / "scripts" / script, tmp_path):
        assert cfg.recipe == "paper"
        assert cfg.num_training_steps == PAPER_RECIPES[Path(cfg.model).stem].values["num_training_steps"]
    text = (ROOT / "scripts" / script).read_text()
    assert "--num-training-steps" not in text and "$(steps " not in text


def test_sweep_runs_the_papers_lr_grid(tmp_path: Path) -> None:
    configs = pretrain_configs(ROOT / "scripts/paper_table2.sh", tmp_path, LR_SWEEP="1", SIZES="60m", METHODS="full")
    assert sorted(cfg.lr for cfg, _ in configs) == [0.0001, 0.0005, 0.001, 0.005, 0.01]


def test_7b_settings_and_multi_node_launch(tmp_path: Path) -> None:
    env = {"NNODES": "8", "NODE_RANK": "3", "RDZV_ENDPOINT": "node0:29500"}
    commands = dry_run(ROOT / "scripts/paper_table3_7b.sh", tmp_path, **env)
    launch = commands[0]
    assert launch[:3] == ["torchrun", "--nnodes", "8"] and "--rdzv_endpoint" in launch
    configs = pretrain_configs(ROOT / "scripts/paper_table3_7b.sh", tmp_path, **env)
    galore = next(cfg for cfg, _ in configs if "galore" in cfg.optimizer)
    assert (galore.eightbit, galore.rank, galore.gap, galore.lr, galore.num_training_steps) == (
        True,
        1024,
        500,
        0.005,
        150_000,
    )
    assert plan_steps(galore, 64).accumulation == 1  # 64 GPUs x micro-batch 8 = 512
    adam = next(cfg for cfg, _ in configs if cfg.optimizer == "adamw")
    assert (adam.lr, adam.grad_clipping, galore.grad_clipping) == (0.0005, 1.0, 1.0)
    ((single, processes),) = pretrain_configs(ROOT / "scripts/paper_4090_7b.sh", tmp_path)
    assert processes == 1 and single.eightbit and single.layerwise and single.activation_checkpointing
    assert (single.rank, single.gap, single.lr, single.grad_clipping) == (1024, 500, 0.005, 0.0)
    assert plan_steps(single, 1).accumulation == 1


def test_7b_on_8_gpus_of_24gb_trains_the_papers_batch_sharded_and_layer_wise(tmp_path: Path) -> None:
    ((cfg, processes),) = pretrain_configs(ROOT / "scripts/paper_8x24gb_7b.sh", tmp_path)
    assert processes == 8 and (cfg.distributed, cfg.proj_type) == ("fsdp", "right")
    assert cfg.optimizer == "galore_adamw" and cfg.eightbit and cfg.layerwise and cfg.activation_checkpointing
    assert (cfg.rank, cfg.gap, cfg.lr, cfg.grad_clipping, cfg.dtype) == (1024, 500, 0.005, 0.0, "bf16")
    plan = plan_steps(cfg, processes)
    assert (plan.total_batch_size, plan.accumulation) == (512, 4)  # 16 per GPU x 8 GPUs x 4 micro-batches
    check_fsdp_supported(cfg)  # what pretrain checks at start: 8-bit GaLore, layer-wise and right projections shard


def test_mini_table2_budget(tmp_path: Path) -> None:
    configs = [cfg for cfg, _ in pretrain_configs(ROOT / "scripts/mini_table2.sh", tmp_path)]
    assert len(configs) == 5 * 3 + 5  # a 3-lr sweep per method (seed 0), then seed 1 at the best lr
    assert {c.optimizer for c in configs} == {"adamw", "galore_adamw", "low_rank", "lora", "relora"}
    assert {c.seed for c in configs} == {0, 1}
    tokens = {c.num_training_steps * c.total_batch_size * c.max_length for c in configs}
    assert tokens == {204_800}, "every method sees the same token budget"
    assert all(Path(c.data_files.replace("*", "x")).parent.is_dir() for c in configs), "the shared C4 data"


def test_mini_optimizers_compares_every_optimizer_at_one_budget(tmp_path: Path) -> None:
    configs = [cfg for cfg, _ in pretrain_configs(ROOT / "scripts/mini_optimizers.sh", tmp_path)]
    assert [c.optimizer for c in configs] == [
        "adamw",
        "adam",
        "adafactor",
        "adam8bit",
        "galore_adamw",
        "galore_adafactor",
        "galore_adamw8bit",
    ]
    assert {(c.lr, c.num_training_steps * c.total_batch_size * c.max_length) for c in configs} == {
        (0.003, 204_800)
    }  # both families tuned to 0.003
    galore = [c for c in configs if c.optimizer.startswith("galore")]
    assert {(c.rank, c.gap, c.scale) for c in galore} == {(64, 20, 0.25)}


def test_mini_beyond_sweeps_the_new_optimizers_and_meets_on_a_bigger_model(tmp_path: Path) -> None:
    configs = [cfg for cfg, _ in pretrain_configs(ROOT / "scripts/mini_beyond.sh", tmp_path)]
    small = [c for c in configs if c.model == "llama_9m"]
    new = {"fira_adamw", "apollo_adamw", "apollo_mini", "muon"}
    assert len(small) == 4 * 3 + 4 + 4  # a 3-lr sweep (seed 0) + seed 1 per new optimizer; AdamW, GaLore x 2 seeds
    assert {c.lr for c in small if c.optimizer in new} == {0.01, 0.003, 0.001}
    baselines = {(c.optimizer, c.lr, c.seed) for c in small if c.optimizer not in new}
    assert baselines == {(o, 0.003, s) for o in ("adamw", "galore_adamw") for s in (0, 1)}  # mini Table 2's best runs
    assert {c.num_training_steps * c.total_batch_size * c.max_length for c in small} == {204_800}
    projected = ("galore_adamw", "fira_adamw", "apollo_adamw")
    assert {(c.rank, c.gap) for c in small if c.optimizer in projected} == {(64, 20)}
    big = [c for c in configs if c.model == "llama_20m"]
    assert sorted((c.optimizer, c.seed) for c in big) == sorted(
        (o, s) for o in new | {"adamw", "galore_adamw"} for s in (0, 1)
    )
    assert {c.num_training_steps for c in big} == {100}  # the default: half the llama_9m steps
    assert {c.gap for c in big if c.optimizer not in ("adamw", "muon")} == {10}
    assert {c.rank for c in big if c.optimizer in ("galore_adamw", "fira_adamw", "apollo_adamw")} == {128}
    assert all("steps100" in Path(c.output_dir).name for c in big), "a shorter head-to-head never reuses 200-step runs"


def test_mini_tuned_gives_every_method_the_same_budget_on_both_models(tmp_path: Path) -> None:
    """One rule for all: seed 0 at 0.001 / 0.003 / 0.01 (grown at an edge in a real run), seed 1 at the best;
    all eight methods, llama_9m and llama_20m, 200 steps each, rank d_model / 2, gap 20."""
    configs = [cfg for cfg, _ in pretrain_configs(ROOT / "scripts/mini_tuned.sh", tmp_path)]
    optimizers = ["adamw", "galore_adamw", "fira_adamw", "apollo_adamw", "apollo_mini", "muon", "swan", "sinkgd"]
    for model in ("llama_9m", "llama_20m"):
        mine = [c for c in configs if c.model == model]
        assert sorted({c.optimizer for c in mine}) == sorted(optimizers)
        for optimizer in optimizers:
            runs = [(c.lr, c.seed) for c in mine if c.optimizer == optimizer]
            assert sorted(runs) == [(0.001, 0), (0.003, 0), (0.003, 1), (0.01, 0)], (model, optimizer)
        assert {c.num_training_steps * c.total_batch_size * c.max_length for c in mine} == {204_800}
        projected = [c for c in mine if c.optimizer in ("galore_adamw", "fira_adamw", "apollo_adamw")]
        assert {(c.rank, c.gap) for c in projected} == {({"llama_9m": 64, "llama_20m": 128}[model], 20)}
        assert all(Path(c.output_dir).name.startswith(f"{model}-") for c in mine)


def test_mini_randomized_svd_pairs_exact_and_randomized_runs(tmp_path: Path) -> None:
    """Each seed's two runs differ in --svd only, at the llama_20m head-to-head settings of mini_beyond.sh."""
    configs = [cfg for cfg, _ in pretrain_configs(ROOT / "scripts/mini_randomized_svd.sh", tmp_path)]
    assert sorted((c.seed, c.svd) for c in configs) == [(s, m) for s in (0, 1) for m in ("full", "randomized")]
    settings = {
        (c.model, c.optimizer, c.rank, c.gap, c.scale, c.lr, c.num_training_steps, c.total_batch_size, c.max_length)
        for c in configs
    }
    assert settings == {("llama_20m", "galore_adamw", 128, 10, 0.25, 0.003, 100, 4, 256)}
    for seed in (0, 1):
        full, randomized = (
            {k: v for k, v in vars(c).items() if k not in ("svd", "output_dir", "run_name")}
            for c in sorted((c for c in configs if c.seed == seed), key=lambda c: c.svd)
        )
        assert full == randomized


@pytest.mark.slow
def test_mini_table2_really_runs_reports_and_reuses_finished_runs(tmp_path: Path, shared_data) -> None:
    """The mini script end to end at 2 steps a run: trains, picks the lr, reports; a rerun trains nothing."""
    env = {
        **os.environ,
        "MAX_STEPS": "2",
        "METHODS": "galore",
        "LR_GRID": "0.01 0.003",
        "GALORE_TRAIN_SHARED_DATA": str(shared_data),
        "RUNS_DIR": str(tmp_path / "runs"),
        "RESULTS": str(tmp_path / "results"),
    }
    script = ["bash", str(ROOT / "scripts/mini_table2.sh")]
    first = subprocess.run(script, capture_output=True, text=True, env=env, timeout=900)
    assert first.returncode == 0, first.stderr[-2000:]
    runs = {p.name for p in (tmp_path / "runs").iterdir()}
    seed_1 = runs - {"galore-lr0.003-s0", "galore-lr0.01-s0"}
    assert len(runs) == 3 and seed_1 <= {"galore-lr0.003-s1", "galore-lr0.01-s1"} and len(seed_1) == 1
    table = (tmp_path / "results" / "mini_table2.md").read_text()
    assert "| GaLore | " in table and "(n=2)" in table and "## Setup" in table
    second = subprocess.run(script, capture_output=True, text=True, env=env, timeout=900)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "# mini_table2: galore" not in second.stdout and second.stdout.count("reused") == 3
    assert "reusing 3 runs" in (tmp_path / "results" / "mini_table2.md").read_text()
