"""Atomic checkpoints holding everything a bit-exact resume needs.

Layout of OUTPUT_DIR/checkpoints/step_00001000/:
  config.json + model.safetensors   plain LLaMA weights (`AutoModelForCausalLM.from_pretrained` loads them)
  train_config.json                 the resolved TrainConfig
  trainer_state.pt                  optimizer, scheduler, RNG states, step, tokens, method state, and the
                                    wrapped model's weights when a method (LoRA, ...) changed the model
  data_state.json                   position of the training stream (one entry per rank)
  manifest.json                     every other file's size and CRC-32 (manifest.py), written last
A checkpoint is written into a temporary folder and renamed into place, so a save killed midway leaves
the previous checkpoint as it was; `latest` names the newest complete one. A save that fails (no space,
an I/O error, no permission) removes its temporary folder and raises SaveFailed, naming the cause.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

from galore_train import manifest
from galore_train.errors import UserError

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step_(\d+)$")
LATEST = "latest"
DAMAGED_PREFIX = "damaged-"  # a checkpoint a resume passed over, kept for inspection (never pruned, never resumed)
# How the writers report a full or failing disk: OSError from Python, a RuntimeError from torch.save's C++
# writer ("PytorchStreamWriter failed writing file ...: file write failed"), safetensors' "IoError(Os {...})".
STORAGE_ERROR = re.compile(r"write failed|IoError|No space|Input/output|Permission denied|Read-only|quota", re.I)


class SaveFailed(Exception):
    """A checkpoint could not be written for a reason of the storage; its temporary folder is removed."""


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
    try:
        tmp.mkdir()
        write(tmp)
        manifest.write_manifest(tmp)
        for file in tmp.iterdir():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
    except Exception as err:
        shutil.rmtree(tmp, ignore_errors=True)
        cause = storage_cause(err)
        if cause is None:
            raise  # not the storage: a bug, whose traceback is wanted
        raise SaveFailed(f"{cause}; {_free_space(root)}") from err
    if final.exists():  # re-saving the same step (e.g. after a resume): replace it whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_latest(root, final.name)
    _fsync_dir(root)
    prune_checkpoints(root, keep_last)
    return final


def storage_cause(err: BaseException) -> Optional[str]:
    """The first line of a storage failure's message (with its errno name), or None for other errors."""
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    if isinstance(err, OSError):
        name = errno.errorcode.get(err.errno or 0)
        return f"{name}: {os.strerror(err.errno)}" if name and err.errno else text
    return text if STORAGE_ERROR.search(str(err)) else None


def _free_space(root: Path) -> str:
    try:
        return f"{shutil.disk_usage(root).free / 2**20:,.0f} MiB free in {root}"
    except OSError:
        return f"free space in {root} unknown"


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
    """What users type for a checkpoint: the checkpoint folder itself (verified), or a run folder or its
    checkpoints/ folder, which mean their newest intact checkpoint. `path` unchanged when it is none of
    these (a hub id)."""
    if (path / "config.json").exists() or manifest.has_manifest(path):
        if (why := manifest.problem(path)) is not None:
            raise UserError(f"checkpoint {path} is damaged: {why}")
        return path
    for root in (path / "checkpoints", path):
        if list_checkpoints(root):
            return newest_intact(root)
    return path


def newest_intact(root: Path) -> Path:
    """The newest checkpoint under `root` that verifies (one warning per newer one passed over); UserError
    if none does. For one process (eval, --init-from); a resume decides with every rank (resume.py)."""
    skipped = []
    for candidate in reversed(list_checkpoints(root)):
        why = manifest.problem(candidate)
        if why is None:
            report_skipped(skipped, candidate)
            return candidate
        skipped.append(f"{candidate.name}: {why}")
    raise UserError(f"no intact checkpoint in {root} ({'; '.join(skipped)})")


def report_skipped(skipped: list[str], chosen: Path) -> None:
    """One line per checkpoint passed over, and a note when the chosen one predates manifests."""
    for reason in skipped:
        log.warning("skipping checkpoint %s; using %s", reason, chosen.name)
    if not manifest.has_manifest(chosen):
        log.warning("checkpoint %s has no manifest (written before checksums were kept): not verified", chosen)


def set_aside(damaged: Path) -> Path:
    """Rename a damaged checkpoint out of the step order (kept for inspection): otherwise it would count as
    one of the newest at pruning and be a candidate again at every resume."""
    target = damaged.with_name(DAMAGED_PREFIX + damaged.name)
    if not damaged.is_dir():  # listed by another rank only (a node-local folder)
        return target
    shutil.rmtree(target, ignore_errors=True)
    os.replace(damaged, target)
    return target


RUNS = Path("runs")  # where runs go without --output-dir, relative to the working directory


def newest_checkpoint(runs: Path) -> Optional[Path]:
    """The latest checkpoint of the most recently written run folder under `runs` (`galore-train eval` alone),
    at any depth: the scripts write runs/<script>/<run>."""
    found = [c for root in runs.rglob("checkpoints") if (c := latest_checkpoint(root))] if runs.is_dir() else []
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
