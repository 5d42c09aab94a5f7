"""Will this run fit on this GPU? Checked before the model is built: the memory estimate (memory/estimate.py) of the
configuration against the card's free memory (torch.cuda.mem_get_info), so a run that cannot fit stops in one
line, with the flags that would make it fit, instead of a CUDA out-of-memory traceback minutes later.

The estimate is the one `galore-train memory` prints for the same flags (docs/memory.md: within 0.5% of the
peaks measured on CPU; no GPU has measured it yet). `--skip-fit-check` starts anyway (e.g. a card shared with a
process about to exit).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from galore_train.config import ESTIMATE_OPTIONS, TrainConfig, flag
from galore_train.errors import UserError
from galore_train.memory.estimate import MemoryEstimate, estimate_memory
from galore_train.registry import EIGHTBIT_VARIANTS

GiB = 2**30

FULL_RANK_ADAM = ("adamw", "adam", "adam8bit")


def estimate_config(cfg: TrainConfig, model_config: Any, nproc: int) -> MemoryEstimate:
    """One GPU's estimated memory for `cfg` run by `nproc` processes."""
    options = {name: getattr(cfg, name) for name in ESTIMATE_OPTIONS}
    return estimate_memory(model_config, cfg.optimizer, cfg.rank, eightbit=cfg.eightbit, nproc=nproc, **options)


def _total(cfg: TrainConfig, nproc: int) -> int:
    """Sequences per optimizer step."""
    return cfg.total_batch_size or cfg.batch_size * nproc


def _moves(cfg: TrainConfig, nproc: int) -> list[Callable[[TrainConfig], Optional[TrainConfig]]]:
    """Changes that lower the memory, those that change the run least first; each returns None where it does not
    apply. Smaller micro-batches keep the total batch (more accumulation)."""
    total = _total(cfg, nproc)

    def halve(c: TrainConfig) -> Optional[TrainConfig]:
        return c.replace(batch_size=c.batch_size // 2, total_batch_size=total) if c.batch_size > 1 else None

    return [
        lambda c: None if c.activation_checkpointing else c.replace(activation_checkpointing=True),
        *[halve] * max(cfg.batch_size.bit_length() - 1, 0),
        lambda c: c.replace(optimizer="galore_adamw") if c.optimizer in FULL_RANK_ADAM else None,
        lambda c: c.replace(eightbit=True) if not c.eightbit and c.optimizer in EIGHTBIT_VARIANTS else None,
        lambda c: None if c.layerwise else c.replace(layerwise=True),
        # layer-wise updates that accumulate hold a whole gradient: update on every micro-batch (the paper's 4090 run)
        lambda c: c.replace(total_batch_size=c.batch_size * nproc) if c.layerwise else None,
    ]


def _changed_flags(before: TrainConfig, after: TrainConfig, nproc: int) -> str:
    parts = []
    for name, value in after.to_dict().items():
        if name == "total_batch_size" and _total(before, nproc) == _total(after, nproc):
            continue  # the same sequences per step, spelled out
        if value != getattr(before, name):
            parts.append(flag(name) if value is True else f"{flag(name)} {value}")
    return " ".join(parts)


def fitting_flags(cfg: TrainConfig, model_config: Any, nproc: int, budget: int) -> Optional[tuple[str, int]]:
    """(flags, estimated bytes) of a change of `cfg` that fits `budget` bytes, or None: the moves applied in
    order while the estimate is over, then each dropped again where the rest still fits. Only the last move
    (layer-wise without accumulation) changes the sequences per step."""
    current = cfg
    for move in _moves(cfg, nproc):
        if estimate_config(current, model_config, nproc).peak <= budget:
            break
        candidate = move(current)
        if candidate is not None:
            current = candidate
    if estimate_config(current, model_config, nproc).peak > budget:
        return None
    for name in list(current.to_dict()):
        if getattr(current, name) != getattr(cfg, name) and name != "total_batch_size":  # undone with the batch
            undone = current.replace(**{name: getattr(cfg, name)})
            if name == "batch_size":
                undone = undone.replace(total_batch_size=cfg.total_batch_size)
            if estimate_config(undone, model_config, nproc).peak <= budget:
                current = undone
    return _changed_flags(cfg, current, nproc), estimate_config(current, model_config, nproc).peak


def fit_problem(cfg: TrainConfig, model_config: Any, card: str, free: int, nproc: int) -> Optional[str]:
    """None when the estimate fits `free` bytes of the GPU described by `card`, else the one line saying so."""
    estimate = estimate_config(cfg, model_config, nproc).peak
    if estimate <= free:
        return None
    line = f"this run needs about {estimate / GiB:.1f} GiB per GPU (`galore-train memory`), more than {card}"
    fix = fitting_flags(cfg, model_config, nproc, free)
    if fix is None:
        return f"{line}; no flag change fits it there: a smaller --model, more GPUs, or --skip-fit-check to try anyway"
    flags, fitted = fix
    return f"{line}; it would fit with {flags} (about {fitted / GiB:.1f} GiB), or --skip-fit-check to try anyway"


def check_fits(cfg: TrainConfig, model_config: Any, env: Any, gather: Callable[[float, Any], list[float]]) -> None:
    """Before the model is built on a GPU: a one-line UserError, from the first process (the others exit quietly),
    when the estimate exceeds the free memory of the fullest process's GPU (`gather`: one number from every rank).
    Nothing on CPU, or with --skip-fit-check."""
    if env.device.type != "cuda" or cfg.skip_fit_check:
        return
    free, total = torch.cuda.mem_get_info(env.device)
    frees = gather(float(free), env)
    worst = min(range(len(frees)), key=frees.__getitem__)
    where = f"{env.device}" if len(frees) == 1 else f"rank {worst}'s GPU"
    name = torch.cuda.get_device_name(env.device)
    card = f"the {frees[worst] / GiB:.1f} GiB free of {total / GiB:.1f} GiB on {name} ({where})"
    problem = fit_problem(cfg, model_config, card, int(frees[worst]), env.world_size)
    if problem is not None:
        if env.is_main:
            raise UserError(problem)
        raise SystemExit(2)
