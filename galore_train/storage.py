"""What a run asks of its disk: room for its checkpoints, and what happens when a save fails.

A save writes the new checkpoint beside the kept ones before pruning, so a run needs room for
`keep_last + 1` checkpoints at its peak. At start, one estimated from the model and its optimizer state
(galore_train.memory.estimate's estimator, the numbers `galore-train memory` prints) is compared with the free space;
a folder too small gets a warning then, not a failed save after a day of training.

A save that fails stops the run (exit 74, EX_IOERR): the previous checkpoint and `latest` are untouched, so
at most one interval of work is lost, and that is the most any failure costs. Training on without a
checkpoint would make the next crash cost two or more intervals, and the usual causes (a full disk, a
quota, a read-only or failing volume) do not go away by themselves while the run waits.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from transformers import LlamaConfig

from galore_train import checkpoint
from galore_train.config import TrainConfig
from galore_train.distributed import DistEnv, any_rank
from galore_train.errors import TrainingStopped, UserError

log = logging.getLogger(__name__)

SAVE_FAILED_EXIT = 74  # sysexits.h EX_IOERR
ESTIMATE_OPTIONS = ("galore_targets", "proj_type", "proj_bits", "proj_group_size", "moments_dtype", "apollo_proj")


def checkpoint_bytes(cfg: TrainConfig, model_config: LlamaConfig, model: nn.Module, dtype: torch.dtype) -> int:
    """About what one checkpoint of this run takes on disk: the weights (twice when a method keeps wrapped
    weights beside the merged ones) and the optimizer state with GaLore's projections."""
    from galore_train.memory.estimate import estimate_memory

    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    try:
        estimate = estimate_memory(
            model_config,
            cfg.optimizer,
            cfg.rank,
            eightbit=cfg.eightbit,
            dtype="fp32" if dtype == torch.float32 else "bf16",
            **{name: getattr(cfg, name) for name in ESTIMATE_OPTIONS},
        )
        states = estimate.optimizer_states + estimate.projections
    except (UserError, KeyError, TypeError, ValueError):  # a method the estimator does not know: Adam's two moments
        states = 2 * weights
    return weights + states


def warn_if_too_small(
    root: Path, cfg: TrainConfig, model_config: LlamaConfig, model: nn.Module, dtype: torch.dtype
) -> None:
    """Warn when `root`'s filesystem cannot hold the checkpoints this run will keep plus the one being written."""
    one_checkpoint = checkpoint_bytes(cfg, model_config, model, dtype)
    keep_last, existing = cfg.keep_last, len(checkpoint.list_checkpoints(root))
    needed = max(max(keep_last, 1) + 1 - existing, 0) * one_checkpoint
    probe = next(p for p in (root, *root.parents) if p.exists())
    free = shutil.disk_usage(probe).free
    if free < needed:
        log.warning(
            "%s has %.2f GiB free; this run's checkpoints take about %.2f GiB each and a save needs room for"
            " %d more (keep-last %d, plus the one being written): saves will fail when the disk fills",
            probe,
            free / 2**30,
            one_checkpoint / 2**30,
            needed // max(one_checkpoint, 1),
            keep_last,
        )


def save_or_stop(root: Path, step: int, write: Callable[[Path], None], keep_last: int, env: DistEnv) -> Path:
    """Collective: rank 0 saves (checkpoint.save_checkpoint); when that fails, every rank ends the run, in one
    line naming the cause, the step and the checkpoint that is kept. Returns the saved folder (the
    checkpoint root on other ranks)."""
    saved, cause = root, None
    if env.is_main:
        try:
            saved = checkpoint.save_checkpoint(root, step, write, keep_last)
        except checkpoint.SaveFailed as err:
            cause = str(err)
    if not any_rank(cause is not None, env):
        return saved
    kept = checkpoint.latest_checkpoint(root)
    raise TrainingStopped(
        f"could not save the checkpoint of step {step} ({cause or 'rank 0 could not write it'}); its partial folder"
        f" was removed, {f'{kept} is kept' if kept else 'no earlier checkpoint exists'}"
        " (make room, then continue with --resume)",
        SAVE_FAILED_EXIT,
    )
