"""Bit-exact resume of INT8 runs after kill -9: a `python -m galore_train pretrain` process (plain and --layerwise)
and a 2-process torchrun DDP launch are SIGKILLed once a checkpoint is on disk, resumed with --resume, and their
final INT8 codes, scales and weights compared bit for bit with a straight run's.

torchrun starts its workers in sessions of their own, so killing its process group would leave them running: the
kill walks /proc for torchrun's descendants and SIGKILLs every one (the agent first, so it restarts nothing), as a
machine losing power would. No handler runs in any of them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file
from test_distributed import cli_flags, run_args

from galore_train.weights.export import INT8_FILE

STEPS = 8  # the kill lands after the step-2 checkpoint, while steps 3..8 are still to run
KILL_AFTER = "step_00000002"
POLL_S, WAIT_S = 0.02, 240


def _values(output: Path, config_file: str, **options) -> dict:
    values = dict(optimizer="galore_adamw", rank=16, gap=2, int8_weights=True, int8_group_size=32, warmup_steps=1)
    values.update(num_training_steps=STEPS, save_every=2, eval_every=100, **options)
    return run_args(output, config_file, **values)


def _command(nproc: int) -> list[str]:
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone"] if nproc > 1 else []
    return [sys.executable, *launcher, "-m", "galore_train", "pretrain"]


def _run(values: dict, nproc: int) -> None:
    result = subprocess.run(_command(nproc) + cli_flags(values), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


def _descendants(pid: int) -> list[int]:
    """`pid`'s children, grandchildren, ... (from /proc; workers in sessions of their own included)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue
        for child in children:
            found += [child, *_descendants(child)]
    return found


def _kill_after_checkpoint(values: dict, nproc: int) -> None:
    """Start the run, SIGKILL it and every process it started as soon as the step-2 checkpoint exists."""
    process = subprocess.Popen(
        _command(nproc) + cli_flags(values), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    checkpoint = Path(values["output_dir"]) / "checkpoints" / KILL_AFTER
    deadline = time.monotonic() + WAIT_S
    while not checkpoint.is_dir():  # the folder appears by an atomic rename, complete
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"no {KILL_AFTER} checkpoint (exit {process.poll()}): {process.communicate()[1][-4000:]}")
        time.sleep(POLL_S)
    for pid in [process.pid, *_descendants(process.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    final = Path(values["output_dir"]) / "checkpoints" / f"step_{STEPS:08d}"
    assert not final.exists(), "the run finished before the kill: nothing was resumed"


def _final_state(output: Path) -> dict[str, torch.Tensor]:
    folder = output / "checkpoints" / f"step_{STEPS:08d}"
    state = load_file(str(folder / INT8_FILE))
    assert state and any(key.endswith("weight_int8") for key in state)
    return {**state, **{f"dequantized.{k}": v for k, v in load_file(str(folder / "model.safetensors")).items()}}


def _assert_resume_is_bit_exact(work: Path, config_file: str, nproc: int, **options) -> None:
    _run(_values(work / "straight", config_file, **options), nproc)
    killed = _values(work / "killed", config_file, **options)
    _kill_after_checkpoint(killed, nproc)
    _run({**killed, "resume": True}, nproc)
    straight, resumed = _final_state(work / "straight"), _final_state(work / "killed")
    assert straight.keys() == resumed.keys()
    different = [key for key in straight if not torch.equal(straight[key], resumed[key])]
    assert not different, f"{len(different)} tensors differ after the resume, e.g. {different[:3]}"


@pytest.mark.slow
@pytest.mark.parametrize("layerwise", [False, True])
def test_int8_resume_after_kill_9_is_bit_exact(layerwise, tiny_config_file, tmp_path, shared_data) -> None:
    _assert_resume_is_bit_exact(tmp_path, tiny_config_file, nproc=1, layerwise=layerwise)


@pytest.mark.slow
def test_int8_ddp_resume_after_kill_9_of_every_process_is_bit_exact(tiny_config_file, tmp_path, shared_data) -> None:
    """2 processes under torchrun (gloo), global batch 8: kill -9 of the agent and both workers, then --resume."""
    _assert_resume_is_bit_exact(tmp_path, tiny_config_file, nproc=2)
