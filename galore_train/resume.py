"""Resuming a run: find its checkpoint, check that this run can continue it, and put its state back.

A checkpoint folder (checkpoint.py writes it) holds the weights as Hugging Face safetensors, the run's
train_config.json, trainer_state.pt (optimizer, schedule, loss guard, RNG, method state) and
data_state.json (one stream position per process). Everything here is read-only on the checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import safe_open
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from transformers import LlamaConfig

from galore_train import checkpoint, distributed, fsdp, manifest
from galore_train.config import ABSENT_MEANS, TrainConfig, restart_warmup
from galore_train.errors import UserError
from galore_train.model import architecture_differences, dtype_name
from galore_train.registry import resolve_optimizer_name
from galore_train.weights import stepping
from galore_train.weights.export import int8_state_files

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"  # save_pretrained splits large models (transformers 4: > 5 GB)

# Settings that shape a checkpoint's model and optimizer state: a resumed run must keep them.
RESUME_FIXED = frozenset(
    "model optimizer eightbit layerwise rank proj_type galore_targets proj_bits proj_group_size"
    " fisher_history relora_warm_start moments_dtype apollo_proj int8_weights int8_group_size"
    " stochastic_rounding".split()
)
# Settings of run control and logging that a resumed run may change freely.
RESUME_FREE = frozenset(
    "eval_every eval_batch_size eval_tokens eval_data_files save_every keep_last output_dir resume"
    " resume_from log_every wandb_project run_name tags wandb_mode skip_nonfinite spike_threshold"
    " max_spikes recipe compile activation_checkpointing distributed dist_timeout allow_data_change"
    " lowrank_sync skip_fit_check".split()
)
# Settings that define the training stream: a checkpoint's data position is a position in this data, read
# this way; a resume that changes one is refused unless --allow-data-change (resume.check_compatible).
RESUME_DATA = ("data_files", "dataset", "dataset_config", "tokenizer", "max_length", "pack")


def config_differences(cfg: TrainConfig, saved: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(fatal, changed): settings of `cfg` that differ from the checkpoint's `saved` config, as "name: old -> new".

    Fatal ones lay out the saved state (a different rank cannot load the saved moments; a different
    group size would misread quantized projections). Changed ones take effect and make the continuation
    differ from an uninterrupted run (lr, gap, data, ...): allowed, and worth a warning. Settings of
    logging, saving, evaluation and parallelism (FSDP and DDP checkpoints are interchangeable) are neither.
    `--8bit` with adamw is the same run as adam8bit: compare resolved names before calling this. The
    trainer compares the model and dtype as built (the checkpoint's config.json) when it can.
    """
    fatal, changed = [], []
    ours, theirs = cfg.to_dict(), {**cfg.to_dict(), **ABSENT_MEANS, **saved}
    for values in (ours, theirs):  # a derived default compares as the value it stands for
        values["restart_warmup_steps"] = restart_warmup(values["restart_warmup_steps"], values["relora_reset"])
    for name, new in ours.items():
        old = theirs[name]
        if name in RESUME_FREE or old == new or (name == "galore_targets" and sorted(old) == sorted(new)):
            continue
        (fatal if name in RESUME_FIXED else changed).append(f"{name}: {old!r} -> {new!r}")
    return fatal, changed


def find_checkpoint(cfg: TrainConfig, output_dir: Path, env: distributed.DistEnv) -> Optional[Path]:
    """The checkpoint to continue (--resume-from, or the run's newest intact one with --resume), or None to
    start fresh. Collective: every rank verifies, and all take the same decision (see `_agreed_problem`)."""
    if cfg.resume_from:
        path = Path(cfg.resume_from)
        if not (path / "trainer_state.pt").is_file() and not manifest.has_manifest(path):
            raise UserError(f"--resume-from {path} is not a galore-train checkpoint")
        if (why := _agreed_problem(path, env)) is not None:
            raise UserError(f"--resume-from {path} is damaged: {why}")
        checkpoint.report_skipped([], path)
        return path
    root = output_dir / "checkpoints"
    if cfg.resume:
        return _newest_intact_everywhere(root, env)
    if (output_dir / "metrics.jsonl").exists() or checkpoint.list_checkpoints(root):
        raise UserError(
            f"{output_dir} already holds a run: pass --resume to continue it, or choose another --output-dir"
        )
    return None


def _agreed_problem(path: Path, env: distributed.DistEnv) -> Optional[str]:
    """What is wrong with `path` on any rank (the same answer on every rank), or None if all find it intact.
    Each rank checks what it sees: with a node-local output folder one node's copy may be damaged alone."""
    why = manifest.problem(path, required=manifest.RESUME_FILES) if path.is_dir() else "missing"
    seen = distributed.gather_objects(why, env)
    problems = [f"rank {rank}: {why}" if env.enabled else why for rank, why in enumerate(seen) if why is not None]
    return "; ".join(problems) or None


def _newest_intact_everywhere(root: Path, env: distributed.DistEnv) -> Optional[Path]:
    """Newest first, the first checkpoint every rank verifies; None when there is none at all (a fresh
    start), UserError when every one is damaged. Passed-over ones are set aside by rank 0."""
    names = {
        name
        for listing in distributed.gather_objects([p.name for p in checkpoint.list_checkpoints(root)], env)
        for name in listing
    }
    candidates = sorted(names, key=lambda name: int(checkpoint.STEP_DIR.match(name).group(1)), reverse=True)
    skipped: list[str] = []
    for index, name in enumerate(candidates):
        why = _agreed_problem(root / name, env)
        if why is None:
            checkpoint.report_skipped(skipped, root / name)
            if env.is_main:
                for damaged in candidates[:index]:
                    checkpoint.set_aside(root / damaged)
            return root / name
        skipped.append(f"{name}: {why}")
    if skipped:
        raise UserError(f"no intact checkpoint to resume in {root} ({'; '.join(skipped)})")
    return None


def fingerprint(path: Optional[Path]) -> tuple:
    """What a rank is about to resume, cheaply: the step folder, its sizes, and a hash of its data positions."""
    if path is None:
        return ("a fresh start",)
    files = [path / "trainer_state.pt", *weight_files(path)]
    data = path / "data_state.json"
    digest = hashlib.sha256(data.read_bytes()).hexdigest()[:16] if data.is_file() else None
    return (path.name, tuple(f.stat().st_size if f.is_file() else None for f in files), digest)


def check_ranks_agree(path: Optional[Path], env: distributed.DistEnv) -> None:
    """Every rank must continue the same checkpoint (collective). Without a shared output folder some ranks
    would resume at step N and others start fresh: replicas that silently diverge, then hang."""
    if not env.enabled:
        return
    seen = distributed.gather_objects(fingerprint(path), env)
    if len(set(seen)) > 1:
        found = "; ".join(f"rank {rank}: {view[0]}" for rank, view in enumerate(seen))
        raise UserError(
            f"the processes would not resume the same checkpoint ({found}); "
            "put --output-dir on a filesystem every node sees, or pass --resume-from"
        )


def _built_optimizer(name: str, eightbit: bool) -> str:
    """What --optimizer NAME [--8bit] builds, so that two spellings of one optimizer compare equal."""
    try:
        return resolve_optimizer_name(name, eightbit)
    except UserError:  # a method (lora, relora, low_rank): its name and flag as given
        return f"{name} --8bit" if eightbit else name


def _built_differently(path: Path, model_config: LlamaConfig, dtype: torch.dtype) -> Optional[list[str]]:
    """How the checkpoint's model (its config.json) differs from the one this run builds: architecture
    and dtype (`--dtype auto` resolves per device: a bf16 GPU checkpoint resumed on a CPU would be fp32).
    None if the checkpoint has no config.json to tell."""
    if not (path / "config.json").is_file():
        return None
    saved = LlamaConfig.from_pretrained(path)
    differences = [f"model: {name} {old} -> {new}" for name, old, new in architecture_differences(saved, model_config)]
    if saved.dtype != dtype:
        differences.append(f"dtype: {dtype_name(saved.dtype)} -> {dtype_name(dtype)}")
    return differences


def check_compatible(path: Path, cfg: TrainConfig, model_config: LlamaConfig, dtype: torch.dtype) -> bool:
    """Refuse settings the checkpoint's state cannot be loaded with; warn about ones that change the run.
    True when the training data changed by request (--allow-data-change): its saved position is then void."""
    saved_file = path / "train_config.json"
    if not saved_file.is_file():
        return False
    saved = json.loads(saved_file.read_text())
    if _built_optimizer(saved["optimizer"], saved["eightbit"]) == _built_optimizer(cfg.optimizer, cfg.eightbit):
        saved.update(optimizer=cfg.optimizer, eightbit=cfg.eightbit)  # e.g. adamw --8bit == adam8bit
    built_differently = _built_differently(path, model_config, dtype)
    if built_differently is not None:  # compared as built, not as spelled: llama_9m == configs/llama_9m.json
        saved.update(model=cfg.model, dtype=cfg.dtype)
    fatal, changed = config_differences(cfg, saved)
    fatal = (built_differently or []) + fatal
    if fatal:
        recipe = (
            f"; it was trained with --recipe {saved['recipe']}: pass it again"
            if saved.get("recipe") != cfg.recipe
            else ""
        )
        raise UserError(
            f"cannot resume {path} with a different {'; '.join(fatal)} "
            f"(its saved state was built for the old value{recipe}; or start a new run, with --init-from for the"
            " weights)"
        )
    data_changes = [entry for entry in changed if entry.split(":")[0] in RESUME_DATA]
    if data_changes and not cfg.allow_data_change:
        raise UserError(
            f"cannot resume {path} with different training data ({'; '.join(data_changes)}): its saved position is"
            " one in the old data; pass --allow-data-change to continue on the new data from its beginning"
        )
    if changed:
        log.warning(
            "resuming with settings changed since the checkpoint, so the run will differ from an uninterrupted one: %s",
            "; ".join(changed),
        )
    if data_changes:
        log.warning("--allow-data-change: the training data is read from its beginning (seed %d)", cfg.seed)
    return bool(data_changes)


def weight_files(path: Path) -> list[Path]:
    """The safetensors file(s) of a checkpoint: one, or the shards its index names."""
    index = path / WEIGHTS_INDEX
    if index.is_file():
        return [path / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return [path / WEIGHTS_FILE]


def load_weights(model: nn.Module, path: Path) -> None:
    """Copy a checkpoint's weights into `model` in place, one tensor at a time.

    Resuming 7B on a 24 GB GPU leaves no room for a second copy of the weights beside the model (2 x
    13.5 GB in bf16): each tensor is read from the memory-mapped file to the CPU and copied into its
    parameter, so the device holds the model plus nothing. Under FSDP only rank 0 reads the files and
    each tensor is broadcast and sharded in turn (fsdp.load_full_weights): no rank materialises
    the full model on its device.
    """
    files = weight_files(path) + int8_state_files(path)  # INT8 runs: the exact codes after the dequantized copy
    if distributed.is_sharded(model):
        fsdp.load_full_weights(model, lambda: _read_all(files))
        return
    targets = model.state_dict()
    found: set[str] = set()
    with torch.no_grad():
        for file in files:
            with safe_open(str(file), framework="pt", device="cpu") as reader:
                for name in reader.keys():
                    if name in targets:
                        targets[name].copy_(reader.get_tensor(name))
                        found.add(name)
    if found != set(targets):
        missing = sorted(set(targets) - found)
        raise UserError(
            f"{path} does not hold the weights of this model (missing {', '.join(missing[:3])}"
            f"{' ...' if len(missing) > 3 else ''})"
        )


def _read_all(files: list[Path]) -> dict[str, torch.Tensor]:
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as reader:
            weights.update({name: reader.get_tensor(name) for name in reader.keys()})
    return weights


def restore_optimizer(
    model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: LambdaLR, state: dict[str, Any]
) -> None:
    """Load the optimizer and schedule state, keeping this run's hyperparameters.

    Loading also loads the checkpoint's hyperparameters (peak lr, betas, weight decay, GaLore's gap and
    scale, ...); this run's are put back, so that a flag changed on resume (and warned about) takes
    effect. Unchanged flags give back the same values bit for bit.
    """
    current = [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]
    fsdp.load_optimizer_state_dict(model, optimizer, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    for group, settings in zip(optimizer.param_groups, current):
        group.update({key: value for key, value in settings.items() if key != "lr"})
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)  # what LambdaLR.step() computes


def restore_data_position(stream: Any, state: dict[str, Any], path: Path) -> None:
    """Put the training stream back where the checkpoint left it. A position that does not fit the data (the
    files behind an unchanged --data-files glob changed) is a one-line error, not an IndexError."""
    try:
        stream.load_state_dict(state)
    except (IndexError, KeyError, TypeError, ValueError) as err:
        raise UserError(
            f"the data position saved in {path} does not fit the training data ({type(err).__name__}: {err}); if the"
            " data changed on purpose, resume with --allow-data-change"
        ) from None


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's random state: the CPU generator and, on a GPU, its own GPU's (not every visible GPU's;
    none for a run kept on the CPU where CUDA is available)."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {"torch": torch.get_rng_state(), "cuda": cuda}


def restore_rng(states: dict[str, Any], rank: int, device: torch.device) -> None:
    """Put back rank `rank`'s random state. `states["by_rank"]` holds every rank's (rank_state()); older
    checkpoints kept rank 0's CPU state only, and their CUDA states (all of rank 0's visible GPUs) are not
    another rank's: they are not restored."""
    if "by_rank" not in states:
        torch.set_rng_state(states["torch"])
        return
    mine = states["by_rank"][rank]
    torch.set_rng_state(mine["torch"])
    if device.type == "cuda" and mine["cuda"] is not None:
        torch.cuda.set_rng_state(mine["cuda"], device)


def restore_trainer(trainer: Any, state: dict[str, Any], data_states: list[dict[str, Any]]) -> dict[str, Any]:
    """Put the checkpoint's state back into `trainer` (a train.Trainer): weights (or a method's wrapped model),
    optimizer and schedule, random and rounding state, loss guard, token count and data position (unless
    --allow-data-change restarts it). Returns the restore's memory peaks: a restore can peak above a step."""
    t = trainer
    if len(data_states) != t.env.world_size:
        raise UserError(
            f"checkpoint {t.resume_dir} was written by {len(data_states)} process(es); resume with the same number"
        )
    with t.memory.track():
        if t.method.changes_model:
            t.model.load_state_dict(state["model"])
            t.method.load_state_dict(state["method"])
        else:
            load_weights(t.model, t.resume_dir)
        restore_optimizer(t.model, t.optimizer, t.scheduler, state)
        restore_rng(state["rng"], t.env.rank, t.device)
        stepping.restore_rounding(t.rounded, state.get("rounding", state.get("int8")))  # "int8": older INT8 runs
        t.tokens_seen = state["tokens_seen"]
        t.guard.load_state_dict(state["guard"])
        if not t.data_restarts:
            restore_data_position(t.train_stream, data_states[t.env.rank], t.resume_dir)
    peaks = t.memory.read_and_reset()
    return {f"restore_{key}": value for key, value in {**peaks, **distributed.rank_metrics(peaks, t.env)}.items()}
