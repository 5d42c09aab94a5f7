"""What a `pretrain` command line means beyond its flags: the rules that let users type the paper's runs as the
paper names them, each stated once here and reported at start (docs/cli.md, "What a command line implies").

1. **The optimizer.** Without `--optimizer`, a flag that only the GaLore family reads (`--rank`, `--gap`,
   `--scale`, `--proj-type`, ...: galore_adamw's fields that adamw does not read, from the registry) implies
   `galore_adamw`; so does rule 2 (the paper's runs are GaLore's). Otherwise the default, adamw.
2. **The paper's run.** `--model` given, a model the paper trained, no `--num-training-steps` and no
   `--max-train-tokens` (and no `--recipe`): `--recipe paper` for that model and optimizer. Explicit flags win.
   With `--layerwise` (not under FSDP), GaLore at 7B is the paper's one-GPU run: micro-batch 16 (the total
   batch), activation checkpointing; so `--model llama_7b --8bit --layerwise` is 8-bit GaLore, rank 1024, gap
   500, on 24 GB.
3. **FSDP's projection side.** GaLore under `--distributed fsdp` needs `--proj-type right`: unset, it becomes
   right; given as anything else, a one-line error.
4. **Flags that mean nothing** for the optimizer that will be built (`--rank` with adamw): one warning line.
5. **Projected accumulation refreshes a few matrices at a time.** `--accumulate-projected` holds the full gradient
   of the matrices whose projection a step refreshes (optim/layerwise.py): all of them at once without staggering,
   which is the memory the option removes. So it implies `--stagger-refresh` unless that flag is given either way.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from galore_train.config import TrainConfig, flag
from galore_train.errors import UserError
from galore_train.recipes import apply_recipe, recipe_for
from galore_train.registry import FSDP_NAMES, OPTIMIZERS, OptimizerSpec, listing

IMPLIED_OPTIMIZER = "galore_adamw"  # the paper's method
DEFAULT_OPTIMIZER = next(f.default for f in dataclasses.fields(TrainConfig) if f.name == "optimizer")
RUN_WIDE = frozenset({"seed"})  # read by the whole run (init, data order) even where an optimizer reads it too
BUDGET = ("num_training_steps", "max_train_tokens")


@dataclass
class Resolved:
    """The configuration a command line resolves to, with what was filled in (notes) and what is ignored."""

    config: TrainConfig
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def fields_read(name: str) -> frozenset[str]:
    """The TrainConfig fields the optimizer or method `name` reads (the registry's, traced)."""
    return OPTIMIZERS[name].fields_read(TrainConfig())


def optimizer_only_fields() -> frozenset[str]:
    """Fields that only optimizers (and methods) read: their union over the registry, less run-wide ones."""
    return frozenset().union(*(fields_read(name) for name in OPTIMIZERS)) - RUN_WIDE


def _built(cfg: TrainConfig) -> OptimizerSpec | None:
    """The registry entry `--optimizer` and `--8bit` build (None for an unknown name: validation reports it)."""
    spec = OPTIMIZERS.get(cfg.optimizer)
    if spec is not None and cfg.eightbit and spec.eightbit:
        spec = OPTIMIZERS[spec.eightbit]
    return spec


def _flags(names: set[str] | list[str]) -> str:
    return listing([flag(name) for name in sorted(names)])


def _paper_run(cfg: TrainConfig, explicit: set[str], optimizer: str) -> str | None:
    """The recipe's source when rule 2 applies to `optimizer`, else None."""
    if cfg.recipe is not None or "model" not in explicit or any(getattr(cfg, name) is not None for name in BUDGET):
        return None
    try:
        return recipe_for(cfg.replace(optimizer=optimizer)).source
    except UserError:  # no published run: the budget stays the user's to give
        return None


def resolve_command(values: dict[str, Any], explicit: set[str]) -> Resolved:
    """The TrainConfig of `pretrain` with these flag `values`, `explicit` naming those typed on the command line."""
    resolved = Resolved(TrainConfig(**values))
    cfg = resolved.config
    if "optimizer" not in explicit:
        galore_flags = explicit & (fields_read(IMPLIED_OPTIMIZER) - fields_read(DEFAULT_OPTIMIZER))
        if galore_flags or _paper_run(cfg, explicit, IMPLIED_OPTIMIZER):
            why = f"{_flags(galore_flags)} (GaLore-only flags)" if galore_flags else "the paper's run (its method)"
            resolved.notes.append(f"--optimizer {IMPLIED_OPTIMIZER}: implied by {why}; --optimizer chooses another")
            cfg = cfg.replace(optimizer=IMPLIED_OPTIMIZER)
    source = _paper_run(cfg, explicit, cfg.optimizer)
    if source is not None:
        resolved.notes.append(
            f"--recipe paper: --model {cfg.model} without --num-training-steps or --max-train-tokens is the paper's run"
        )
        cfg = cfg.replace(recipe="paper")
    if cfg.recipe:
        filled = apply_recipe(cfg, explicit)
        changed = {k: v for k, v in filled.to_dict().items() if v != getattr(cfg, k)}
        source = recipe_for(cfg).source
        shown = ", ".join(f"{k}={v}" for k, v in changed.items())
        resolved.notes.append(f"filled in from {source}: {shown or 'nothing your flags did not set'}")
        cfg = filled
    spec = _built(cfg)
    if spec is not None and cfg.distributed == "fsdp" and spec.galore and spec.name in FSDP_NAMES:
        if "proj_type" in explicit and cfg.proj_type != "right":
            raise UserError(
                f"GaLore under --distributed fsdp projects each rank's rows of the gradient: --proj-type right, not "
                f"{cfg.proj_type} (or leave it out: fsdp sets it; see docs/distributed.md)"
            )
        if cfg.proj_type != "right":
            resolved.notes.append("--proj-type right: GaLore under --distributed fsdp projects gradient rows")
            cfg = cfg.replace(proj_type="right")
    if cfg.accumulate_projected and not cfg.stagger_refresh and "stagger_refresh" not in explicit:
        resolved.notes.append(
            "--stagger-refresh: implied by --accumulate-projected (a refreshing matrix holds its full gradient for "
            "that step; staggered, a few at a time); --no-stagger-refresh refreshes all together"
        )
        cfg = cfg.replace(stagger_refresh=True)
    if spec is not None:
        ignored = (explicit & optimizer_only_fields()) - spec.fields_read(cfg)
        if ignored:
            verb = "means" if len(ignored) == 1 else "mean"
            resolved.warnings.append(f"{_flags(ignored)} {verb} nothing for {spec.name}: ignored")
    resolved.config = cfg
    return resolved
