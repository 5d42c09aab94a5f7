"""The command line as a user meets it: one-line errors with exit code 2, signals, eval, listings."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import EVAL_FILES, TOKENIZER, TRAIN_FILES

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "galore_train", *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout
    )


def tiny_args(config_file, output_dir, *extra):
    return [
        "pretrain",
        "--model",
        config_file,
        "--tokenizer",
        TOKENIZER,
        "--data-files",
        TRAIN_FILES,
        "--eval-data-files",
        EVAL_FILES,
        "--max-length",
        "64",
        "--batch-size",
        "4",
        "--eval-tokens",
        "1000",
        "--dtype",
        "fp32",
        "--wandb-mode",
        "disabled",
        "--output-dir",
        str(output_dir),
        *extra,
    ]


def assert_one_line_error(result, pattern):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and pattern in lines[0], result.stderr


def test_help_on_every_command():
    """Every command registered on the typer app (not a hand list, which falls behind) prints its help."""
    import typer

    from galore_train.cli import app

    commands = typer.main.get_command(app).commands
    assert {"pretrain", "eval", "models", "memory", "optimizers", "report", "recipes", "prepare-data"} <= set(commands)
    for command in ([], *([name] for name in commands)):
        result = cli(*command, "--help")
        assert result.returncode == 0 and "Usage" in result.stdout, (command, result.stderr)
    assert "--galore-targets" in cli("pretrain", "--help").stdout


def test_models_lists_configs_with_parameter_counts():
    result = cli("models")
    assert result.returncode == 0
    assert "llama_60m" in result.stdout and "llama_7b" in result.stdout and "M" in result.stdout


def test_optimizers_lists_every_name_with_its_state():
    from galore_train.registry import OPTIMIZERS

    result = cli("optimizers")
    assert result.returncode == 0, result.stderr
    rows = {line.split()[1]: line for line in result.stdout.splitlines() if line.startswith("│ ") and line[2] != " "}
    assert set(OPTIMIZERS) <= set(rows)
    assert "mr projection + 2nr moments" in rows["galore_adamw"] and "adam8bit" in rows["adamw"]


def test_memory_takes_pretrains_flags_and_defaults():
    """The estimator's keywords are exactly the TrainConfig fields `memory` declares; its defaults are pretrain's."""
    import inspect

    from galore_train.cli import MEMORY_FIELDS
    from galore_train.memory.estimate import estimate_memory

    keywords = [name for name, p in inspect.signature(estimate_memory).parameters.items() if p.kind is p.KEYWORD_ONLY]
    own = {"nproc", "gap"}  # --nproc: memory's own; --gap: read by its --comm view (memory/comm.py)
    assert set(MEMORY_FIELDS) | own == {"model", "optimizer", "rank", *keywords, *own}
    result = cli("memory")
    assert result.returncode == 0, result.stderr
    assert "adamw, bf16, batch 8x256" in result.stdout  # llama_60m, rank 128, --dtype auto as on a GPU
    bad = cli("memory", "--optimizer", "galore_adafactor", "--8bit")
    assert_one_line_error(bad, "--8bit has no variant of 'galore_adafactor'")


def test_memory_estimates_the_run_pretrain_would_start() -> None:
    """The users' 7B line, typed to `memory`: the 8-bit GaLore layer-wise run `pretrain` starts, not 8-bit Adam."""
    result = cli("memory", "--model", "llama_7b", "--8bit", "--layerwise")
    assert result.returncode == 0, result.stderr
    assert "galore_adamw8bit rank 1024" in result.stdout and "batch 16x256" in result.stdout
    assert "note: --optimizer galore_adamw: implied by the paper's run" in result.stderr


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model", "llama_2m"], "unknown model 'llama_2m'"),
        (["--data-files", "/nowhere/*.json.gz"], "--data-files '/nowhere/*.json.gz' matches no files"),
        (["--total-batch-size", "6"], "--total-batch-size 6 is not a multiple of --batch-size 4"),
        (["--scheduler", "step"], "--scheduler must be one of"),
        (["--optimizer", "sgd"], "sgd"),
        (["--max-train-tokens", "lots"], "cannot read token count"),
        (["--init-from", "./runs/no-such-run"], "--init-from ./runs/no-such-run: no such file or directory"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tiny_config_file, tmp_path, extra, message, shared_data):
    result = cli(*tiny_args(tiny_config_file, tmp_path / "run", "--num-training-steps", "2", *extra))
    assert_one_line_error(result, message)


def test_bad_json_config(tmp_path, shared_data):
    broken = tmp_path / "broken.json"
    broken.write_text("{hidden_size: 64}")
    result = cli(*tiny_args(str(broken), tmp_path / "run", "--num-training-steps", "2"))
    assert_one_line_error(result, "invalid JSON in model config")


def wait_for_step(output_dir: Path, process, deadline=240):
    metrics = output_dir / "metrics.jsonl"
    start = time.time()
    while time.time() - start < deadline and process.poll() is None:
        if metrics.exists() and any('"loss"' in line for line in metrics.read_text().splitlines()):
            return
        time.sleep(0.2)
    raise AssertionError(f"training did not log a step: {process.stderr.read() if process.poll() is not None else ''}")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_a_checkpoint_and_exits(tiny_config_file, tmp_path, signum, shared_data):
    output_dir = tmp_path / "run"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "galore_train",
            *tiny_args(
                tiny_config_file,
                output_dir,
                "--num-training-steps",
                "1000",
                "--eval-every",
                "1000",
                "--save-every",
                "1000",
            ),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_step(output_dir, process)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, stderr
    assert "Traceback" not in stderr
    assert f"{signal.Signals(signum).name}: stopped after step" in stderr and "--resume" in stderr
    saved = list((output_dir / "checkpoints").glob("step_*"))
    assert len(saved) == 1 and (saved[0] / "model.safetensors").exists()


def test_eval_scores_a_checkpoint_as_json(tiny_config_file, tmp_path, shared_data):
    run = cli(*tiny_args(tiny_config_file, tmp_path / "run", "--num-training-steps", "2"))
    assert run.returncode == 0, run.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    result = cli("eval", "--checkpoint", str(tmp_path / "run"), "--json")
    assert result.returncode == 0, result.stderr
    scored = json.loads(result.stdout.strip().splitlines()[-1])
    assert scored["val_tokens"] == summary["val_tokens"]
    assert scored["val_loss"] == pytest.approx(summary["val_loss"], rel=1e-5)
    missing = cli("eval", "--checkpoint", str(tmp_path / "nothing"))
    assert_one_line_error(missing, "is not a galore-train checkpoint")


def parse_pretrain(*args):
    """The TrainConfig `galore-train pretrain ARGS` builds (in-process, nothing runs)."""
    import typer

    from galore_train.cli import app, config_from_cli

    with typer.main.get_command(app).commands["pretrain"].make_context("pretrain", list(args)) as ctx:
        return config_from_cli(dict(ctx.params), ctx)


def test_paper_recipe_fills_in_what_the_command_line_does_not_set():
    """Through the real command line: typer's own copy of click once made this a RuntimeError."""
    cfg = parse_pretrain("--model", "llama_60m", "--optimizer", "galore_adamw", "--recipe", "paper", "--lr", "0.02")
    assert (cfg.lr, cfg.rank, cfg.gap, cfg.total_batch_size, cfg.num_training_steps) == (0.02, 128, 200, 512, 10_000)


@pytest.mark.parametrize("extra", [[], ["--recipe", "paper"]])
def test_relora_reset_alone_needs_no_warmup_flag(extra):
    """`--optimizer relora --relora-reset 10` once stopped on the never-set default warm-up of 100."""
    from galore_train.methods import build_method, scheduler_kwargs

    cfg = parse_pretrain(
        "--model", "llama_60m", "--optimizer", "relora", "--relora-reset", "10", "--num-training-steps", "100", *extra
    )
    build_method(cfg)
    assert scheduler_kwargs(cfg)["restart_warmup"] == 1 and cfg.restart_warmup_steps is None


@pytest.mark.slow
def test_pretrain_on_prepared_data_trains_exactly_as_on_the_shards(tiny_config_file, tmp_path, shared_data):
    prepared = tmp_path / "prepared"
    result = cli("prepare-data", "--data-files", TRAIN_FILES, "--tokenizer", TOKENIZER, "--output", str(prepared))
    assert result.returncode == 0 and "1,820 documents" in result.stdout, result.stderr
    runs = {}
    for name, files in (("shards", TRAIN_FILES), ("prepared", str(prepared))):
        args = tiny_args(tiny_config_file, tmp_path / name, "--num-training-steps", "3", "--eval-every", "3")
        args[args.index("--data-files") + 1] = files
        assert cli(*args).returncode == 0
        runs[name] = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("loss") for r in runs["shards"]] == [r.get("loss") for r in runs["prepared"]]
    assert_one_line_error(
        cli(
            "prepare-data",
            "--data-files",
            str(tmp_path / "none*.json"),
            "--tokenizer",
            TOKENIZER,
            "--output",
            str(tmp_path / "x"),
        ),
        "matches no files",
    )
    manifest = json.loads((prepared / "manifest.json").read_text())
    manifest["tokenizer"]["fingerprint"] = "0" * 64  # as if prepared with another tokenizer
    (prepared / "manifest.json").write_text(json.dumps(manifest))
    args = tiny_args(tiny_config_file, tmp_path / "refused", "--num-training-steps", "1")
    args[args.index("--data-files") + 1] = str(prepared)
    assert_one_line_error(cli(*args), "was prepared with tokenizer")
