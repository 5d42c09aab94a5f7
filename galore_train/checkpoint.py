"""Atomic checkpoints holding everything a bit-exact resume needs.

Layout of OUTPUT_DIR/checkpoints/step_00001000/:
  config.json + model.safetensors   plain LLaMA weights (`AutoModelForCausalLM.from_pretrained` loads them)
  train_config.json                 the resolved TrainConfig
  trainer_state.pt                  optimizer, scheduler, RNG states, step, tokens, method state, and the
                                    wrapped model's weights when a method (LoRA, ...) changed the model
  data_state.json                   position of the training stream (one entry per rank)
A checkpoint is written into a temporary folder and renamed into place, so a save killed midway leaves
the previous checkpoint as it was; `latest` names the newest complete one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

from galore_train.errors import UserError

STEP_DIR = re.compile(r"^step_(\d+)$")
LATEST = "latest"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(root: Path, step: int, write: Callable[[Path], None], keep_last: int) -> Path:
    """Call `write(tmp_dir)` to fill a temporary folder, then move it into place atomically."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write(tmp)
    for file in tmp.iterdir():
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
    if final.exists():  # re-saving the same step (e.g. after a resume): replace it whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_latest(root, final.name)
    _fsync_dir(root)
    prune_checkpoints(root, keep_last)
    return final


def _write_latest(root: Path, name: str) -> None:
    tmp = root / f".{LATEST}.tmp"
    tmp.write_text(name + "\n")
    os.replace(tmp, root / LATEST)


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders never match)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(root: Path) -> Optional[Path]:
    pointer = root / LATEST
    if pointer.exists():
        candidate = root / pointer.read_text().strip()
        if candidate.is_dir():
            return candidate
    checkpoints = list_checkpoints(root)
    return checkpoints[-1] if checkpoints else None


def resolve_checkpoint(path: Path) -> Path:
    """What users type for a checkpoint: the checkpoint folder itself, or a run folder or its checkpoints/
    folder, which mean their latest checkpoint. `path` unchanged when it is none of these."""
    if (path / "config.json").exists():
        return path
    return latest_checkpoint(path / "checkpoints") or latest_checkpoint(path) or path


RUNS = Path("runs")  # where runs go without --output-dir, relative to the working directory


def newest_checkpoint(runs: Path) -> Optional[Path]:
    """The latest checkpoint of the most recently written run folder under `runs` (`galore-train eval` alone)."""
    found = [c for run in runs.iterdir() if (c := latest_checkpoint(run / "checkpoints"))] if runs.is_dir() else []
    return max(found, key=lambda c: c.stat().st_mtime, default=None)


def prune_checkpoints(root: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` checkpoints (never fewer than one); remove stale temporary folders."""
    for stale in root.glob(".tmp-step_*"):
        if not stale.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(stale, ignore_errors=True)
    for old in list_checkpoints(root)[: -max(keep_last, 1)]:
        shutil.rmtree(old, ignore_errors=True)


def save_trainer_state(directory: Path, state: dict[str, Any], data_states: list[dict[str, Any]]) -> None:
    import torch  # here, not at the top: finding checkpoints (the report, the scripts) needs no torch

    torch.save(state, directory / "trainer_state.pt")
    with open(directory / "data_state.json", "w") as f:
        json.dump(data_states, f)


def load_trainer_state(directory: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Tensors and plain values only: loads with torch.load's default weights_only=True."""
    import torch

    try:
        # Memory-mapped: pages are read as tensors are copied into the optimizer, not all at once per rank.
        state = torch.load(directory / "trainer_state.pt", map_location="cpu", weights_only=True, mmap=True)
        with open(directory / "data_state.json") as f:
            data_states = json.load(f)
    except FileNotFoundError as err:
        raise UserError(
            f"{directory} is not a complete galore-train checkpoint (missing {Path(err.filename).name})"
        ) from None
    return state, data_states
