"""The commands users type, as typed (issue 23): what each resolves to (galore_train/implied.py), read from the
resolved configuration; local data and tokenizer flags stand in for the hub, as on a machine without network."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from conftest import TOKENIZER, TRAIN_FILES
from typer.testing import CliRunner

from galore_train.cli import app, resolve_from_cli
from galore_train.errors import UserError
from galore_train.implied import Resolved, fields_read, optimizer_only_fields
from galore_train.memory.estimate import estimate_memory
from galore_train.model import load_model_config
from galore_train.registry import OPTIMIZERS, resolve_optimizer_name

ROOT = Path(__file__).resolve().parents[1]
LOCAL = ("--data-files", TRAIN_FILES, "--tokenizer", TOKENIZER)


def resolve(*args: str) -> Resolved:
    """`galore-train pretrain ARGS --data-files ... --tokenizer ...`, resolved in-process (nothing runs)."""
    with typer.main.get_command(app).commands["pretrain"].make_context("pretrain", [*args, *LOCAL]) as ctx:
        return resolve_from_cli(dict(ctx.params), ctx)


def test_1b_with_galores_flags_is_the_papers_galore_run() -> None:
    resolved = resolve("--model", "llama_1b", "--rank", "512", "--gap", "200")
    cfg = resolved.config
    assert (cfg.optimizer, cfg.rank, cfg.gap, cfg.scale, cfg.lr) == ("galore_adamw", 512, 200, 0.25, 0.01)
    assert (cfg.num_training_steps, cfg.total_batch_size, cfg.max_length, cfg.recipe) == (100_000, 512, 256, "paper")
    notes = "\n".join(resolved.notes)
    assert "--optimizer galore_adamw: implied by --gap and --rank" in notes
    assert "GaLore paper Table 2 (1B: rank 512)" in notes and "lr=0.01" in notes  # what, and from where
    assert resolved.warnings == []


def test_explicit_flags_win_over_what_is_implied() -> None:
    cfg = resolve("--model", "llama_1b", "--rank", "256", "--lr", "0.02", "--num-training-steps", "7").config
    assert (cfg.optimizer, cfg.rank, cfg.lr, cfg.num_training_steps, cfg.recipe) == ("galore_adamw", 256, 0.02, 7, None)
    tokens = resolve("--model", "llama_1b", "--max-train-tokens", "1M").config  # a budget: not the paper's run
    assert (tokens.optimizer, tokens.recipe, tokens.num_training_steps) == ("adamw", None, None)


def test_7b_8bit_layerwise_is_the_papers_one_gpu_run() -> None:
    cfg = resolve("--model", "llama_7b", "--8bit", "--layerwise").config
    assert resolve_optimizer_name(cfg.optimizer, cfg.eightbit) == "galore_adamw8bit"
    assert (cfg.rank, cfg.gap, cfg.scale, cfg.lr, cfg.num_training_steps) == (1024, 500, 0.25, 0.005, 150_000)
    assert (cfg.activation_checkpointing, cfg.batch_size, cfg.total_batch_size, cfg.grad_clipping) == (
        True,
        16,
        None,  # the micro-batch: accumulating under --layerwise would hold a whole gradient
        0.0,
    )
    peak = estimate_memory(
        load_model_config("llama_7b"),
        cfg.optimizer,
        cfg.rank,
        eightbit=True,
        layerwise=True,
        batch_size=cfg.batch_size,
        max_length=cfg.max_length,
        activation_checkpointing=True,
    ).peak
    assert peak < 24e9, f"{peak / 2**30:.1f} GiB does not fit a 24 GB card"
    sharded = resolve("--model", "llama_7b", "--8bit", "--layerwise", "--distributed", "fsdp").config
    assert (sharded.total_batch_size, sharded.proj_type) == (512, "right")  # 1/N gradient shards: the paper's batch


def readme_commands() -> list[list[str]]:
    """The `galore-train pretrain` lines of README.md's first code block, continuation lines joined."""
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL).group(1)
    lines = block.replace("\\\n", " ").splitlines()
    commands = [shlex.split(line.split("#")[0]) for line in lines if line.startswith("galore-train pretrain")]
    return [command[2:] for command in commands]


def test_the_readmes_example_lines_work_as_typed() -> None:
    commands = readme_commands()
    assert len(commands) >= 3
    for args in commands:
        cfg = resolve(*args).config
        assert cfg.num_training_steps, args
    one_b = resolve(*next(a for a in commands if "llama_1b" in a)).config
    assert (one_b.optimizer, one_b.rank, one_b.num_training_steps) == ("galore_adamw", 512, 100_000)
    seven_b = resolve(*next(a for a in commands if "llama_7b" in a)).config
    assert (seven_b.eightbit, seven_b.layerwise, seven_b.rank, seven_b.gap) == (True, True, 1024, 500)


def test_without_a_model_or_a_published_run_the_budget_is_still_asked_for() -> None:
    with pytest.raises(UserError, match="give --num-training-steps or --max-train-tokens"):
        resolve("--rank", "64")  # no --model: no paper's run to take
    with pytest.raises(UserError, match="give --num-training-steps or --max-train-tokens"):
        resolve("--model", "llama_9m")  # a size the paper did not train


@pytest.mark.parametrize(
    "args, warning",
    [
        (["--optimizer", "adamw", "--rank", "512", "--gap", "50"], "--gap and --rank mean nothing for adamw"),
        (["--optimizer", "apollo_mini", "--rank", "4", "--scale", "2"], "--rank and --scale mean nothing for apollo"),
        (["--optimizer", "adamw", "--8bit", "--fisher-history", "4"], "--fisher-history means nothing for adam8bit"),
        (["--optimizer", "adafactor", "--eps", "1e-6"], "--eps means nothing for adafactor"),
    ],
)
def test_a_flag_the_optimizer_does_not_read_is_one_warning(args: list[str], warning: str) -> None:
    resolved = resolve("--num-training-steps", "5", *args)
    assert len(resolved.warnings) == 1 and resolved.warnings[0].startswith(warning), resolved.warnings


@pytest.mark.parametrize(
    "args",
    [
        ["--optimizer", "galore_adamw", "--rank", "64", "--gap", "5", "--scale", "1", "--proj-type", "left"],
        ["--optimizer", "lora", "--rank", "8", "--lora-alpha", "16"],
        ["--optimizer", "adamw", "--seed", "3", "--lr", "0.01", "--eps", "1e-6"],  # --seed is the whole run's
        ["--optimizer", "apollo_adamw", "--rank", "4", "--apollo-scale", "2"],
    ],
)
def test_flags_the_optimizer_reads_are_not_warned_about(args: list[str]) -> None:
    assert resolve("--num-training-steps", "5", *args).warnings == []


def test_which_flags_an_optimizer_reads_comes_from_the_registry() -> None:
    """Traced from the registry's settings functions: GaLore's group keys, Fira's residual, APOLLO's own scale."""
    assert {"rank", "gap", "scale", "proj_type", "galore_targets"} <= fields_read("galore_adamw")
    assert not {"rank", "gap", "scale"} & fields_read("adamw")
    assert "scale" not in fields_read("apollo_adamw") and "apollo_scale" in fields_read("apollo_adamw")
    assert "rank" not in fields_read("apollo_mini")  # its own rank 1
    assert "seed" not in optimizer_only_fields() and "fira_residual" in optimizer_only_fields()
    assert all(fields_read(name) for name in OPTIMIZERS)


def test_fsdp_takes_the_working_projection_side_and_says_so() -> None:
    resolved = resolve("--optimizer", "galore_adamw", "--distributed", "fsdp", "--num-training-steps", "5")
    assert resolved.config.proj_type == "right"
    assert any(note.startswith("--proj-type right") for note in resolved.notes)
    plain = resolve("--optimizer", "adamw", "--distributed", "fsdp", "--num-training-steps", "5")
    assert plain.config.proj_type == "std" and plain.notes == []
    with pytest.raises(UserError, match="--proj-type right, not std"):
        resolve("--optimizer", "galore_adamw", "--distributed", "fsdp", "--proj-type", "std", "--num-training-steps=1")


def test_projected_accumulation_staggers_the_refreshes_unless_told() -> None:
    run = ("--optimizer", "galore_adamw", "--layerwise", "--accumulate-projected", "--num-training-steps", "5")
    resolved = resolve(*run)
    assert resolved.config.stagger_refresh
    assert any(note.startswith("--stagger-refresh: implied by --accumulate-projected") for note in resolved.notes)
    told = resolve(*run, "--no-stagger-refresh")
    assert not told.config.stagger_refresh and told.notes == []
    assert not resolve("--optimizer", "galore_adamw", "--layerwise", "--num-training-steps", "5").config.stagger_refresh


@pytest.mark.parametrize("rank, lines", [("0", 1), ("1", 0)])
def test_a_contradiction_is_one_line_printed_by_rank_0_only(rank: str, lines: int) -> None:
    """Every torchrun process parses the same command line: only the first says what is wrong."""
    result = subprocess.run(
        [sys.executable, "-m", "galore_train", "pretrain", "--optimizer", "galore_adamw", "--distributed", "fsdp"]
        + ["--proj-type", "std", "--num-training-steps", "5"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "RANK": rank},
        timeout=300,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.startswith("error:")]) == lines, result.stderr


def test_eval_alone_scores_the_newest_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import galore_train.evaluate as evaluate

    monkeypatch.chdir(tmp_path)
    missing = CliRunner().invoke(app, ["eval"])
    assert isinstance(missing.exception, UserError) and "pass --checkpoint DIR" in str(missing.exception)
    # The scripts put their runs one folder deeper (runs/mini_table2/<run>): those count too.
    for run, mtime in (("old", 1_000), ("mini/older", 500), ("mini/new", 2_000), ("empty", 3_000)):
        (tmp_path / "runs" / run / "checkpoints").mkdir(parents=True)
        if run != "empty":
            step = tmp_path / "runs" / run / "checkpoints" / "step_5"
            step.mkdir()
            os.utime(step, (mtime, mtime))
    scored = []
    monkeypatch.setattr(evaluate, "score_checkpoint", lambda path, **_: scored.append(path) or _RESULT)
    result = CliRunner().invoke(app, ["eval"])
    assert result.exit_code == 0, result.output
    assert scored == [Path("runs/mini/new/checkpoints/step_5")]


_RESULT = {"checkpoint": "x", "val_loss": 1.0, "val_perplexity": 2.7, "val_tokens": 10}
