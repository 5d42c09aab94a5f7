"""What a run left behind, read into a `Run`: the rows and columns `galore-train report` is made of.

A run directory holds metrics.jsonl (step and eval records), summary.json (written when the run ends),
train_config.json (the full TrainConfig, written at every start) and checkpoints/step_*/ (galore_train.checkpoint).
A W&B runs-table CSV export can stand in for run directories (no curves then). Reading never fails on a run
that is missing, still going or half-written: such a run is marked, not raised.
"""

from __future__ import annotations

import csv as csv_module
import inspect
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from galore_train.checkpoint import latest_checkpoint
from galore_train.config import ABSENT_MEANS, TrainConfig
from galore_train.config import ESTIMATE_OPTIONS as CONFIG_ESTIMATE_OPTIONS  # the estimator's keywords
from galore_train.errors import UserError
from galore_train.metrics import parse_record
from galore_train.plan import plan_steps
from galore_train.registry import OPTIMIZERS, resolve_optimizer_name

GIB = 2**30
COMPONENTS = ("weights", "grads", "optimizer_state", "other")  # the measured parts in metrics.jsonl
# Every measured peak: allocated ("memory"), the CUDA allocator's reserved bytes (what must fit on the card; CUDA
# runs only, galore_train/memory/meter.py), and the parts.
MEASURED = ("memory", "reserved", *COMPONENTS)

# Row names of the paper, by the optimizer actually built (after --8bit).
# Row order: the paper's Table 2 methods first, then every other registry entry in registry order.
_PAPER_ROWS = ("adamw", "adam", "galore_adamw", "low_rank", "lora", "relora")
ROW_ORDER = [OPTIMIZERS[name].label for name in _PAPER_ROWS] + [
    spec.label for name, spec in OPTIMIZERS.items() if name not in _PAPER_ROWS
]

LOW_RANK_SECTION = "GaLore and low-rank methods"  # TrainConfig's options that only GaLore and LoRA-likes use
# Settings that make two runs of one method different experiments (rows), unlike the seed.
SETTING_FIELDS = (
    "lr",
    "rank",
    "gap",
    "scale",
    "proj_type",
    "max_length",
    "pack",
    "total_batch_size",
    "num_training_steps",
    "max_train_tokens",
    "weight_decay",
    "grad_clipping",
    "dtype",
    "activation_checkpointing",
    "lora_alpha",
    "relora_reset",
    "relora_warm_start",
    "svd",
    "fira_residual",
    "apollo_proj",
    "apollo_scale_type",
    "apollo_scale",
    "norm_growth_limit",
    "moments_dtype",
)
# Settings only some optimizers read (their registry entries' `options`): they matter for those optimizers' runs only.
OPTIMIZER_OPTIONS = frozenset(name for spec in OPTIMIZERS.values() for name in spec.options)


@dataclass
class Run:
    """What one run left behind; `status` is finished, unfinished or missing (or a W&B state)."""

    source: str
    status: str
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    steps_done: int = 0
    total_steps: Optional[int] = None
    tokens_done: Optional[int] = None  # from the last step record, for runs without a summary yet
    evals: list[tuple[int, float]] = field(default_factory=list)  # (tokens seen, val perplexity)
    peaks: dict[str, float] = field(default_factory=dict)  # GiB: each of MEASURED that was logged
    tokens_per_second: Optional[float] = None
    data_wait_share: Optional[float] = None  # of the logged steps' time, the part spent waiting for batches
    comm_bytes: Optional[float] = None  # gradient bytes each process sent per step, mean of the logged steps
    model_config_path: Optional[Path] = None  # the checkpoint's config.json, for the estimator
    estimate: Optional[dict[str, float]] = None  # GiB from galore_train.memory.estimate, filled by report()

    @property
    def model(self) -> str:
        name = str(self.config.get("model") or self.summary.get("model") or "?")
        return Path(name).stem if name.endswith(".json") else name

    @property
    def method(self) -> str:
        return method_label(self.config or self.summary)

    @property
    def uses_rank(self) -> bool:
        """GaLore and the low-rank methods (their section of TrainConfig matters only for them)."""
        spec = OPTIMIZERS.get(str(self.config.get("optimizer", "")))
        return spec is not None and (spec.galore or spec.is_method)

    @property
    def rank(self) -> Optional[int]:
        """The rank its target weights got (APOLLO-Mini's own 1 whatever --rank said); None where none applies."""
        rank = self.config.get("rank") if self.uses_rank else None
        return None if rank is None else OPTIMIZERS[str(self.config["optimizer"])].rank_used(rank)

    def settings(self) -> dict[str, Any]:
        """The SETTING_FIELDS that apply to this run's method (the rank as used)."""
        values = {name: self.config.get(name, ABSENT_MEANS.get(name)) for name in SETTING_FIELDS if self._applies(name)}
        return {**values, "rank": self.rank} if "rank" in values else values

    def _applies(self, name: str) -> bool:
        """An optimizer's own option only to its runs, the low-rank section only to GaLore and LoRA-likes."""
        if name in OPTIMIZER_OPTIONS:
            spec = OPTIMIZERS.get(str(self.config.get("optimizer", "")))
            return spec is not None and name in spec.options
        return self.uses_rank or TrainConfig.__dataclass_fields__[name].metadata["section"] != LOW_RANK_SECTION

    @property
    def val_perplexity(self) -> Optional[float]:
        value = _number(self.summary.get("val_perplexity"))
        if value is None and self.evals:
            value = self.evals[-1][1]
        return value

    @property
    def tokens_seen(self) -> Optional[int]:
        value = _number(self.summary.get("tokens_seen"))
        return int(value) if value is not None else self.tokens_done

    def estimated(self, part: str) -> Optional[float]:
        """GiB of one part of `estimate` (see estimated_memory), None without an estimate."""
        return self.estimate.get(part) if self.estimate else None

    def status_text(self) -> str:
        if self.status != "unfinished":
            return self.status
        of = f"/{self.total_steps}" if self.total_steps else ""
        return f"unfinished (step {self.steps_done}{of})"


def method_label(config: dict[str, Any]) -> str:
    """Paper-style row name: the optimizer actually built, plus what else changes the run's numbers in brackets
    (layer-wise, projected accumulation, INT8 weights and their rounding, bf16 stochastic rounding)."""
    name = str(config.get("optimizer", "?"))
    if config.get("eightbit"):
        try:
            name = resolve_optimizer_name(name, True)
        except UserError:
            pass  # a method (its 8-bit optimizer is no row of its own), an old or a foreign name: as it is
    label = OPTIMIZERS[name].label if name in OPTIMIZERS else name
    details = ["layer-wise"] if config.get("layerwise") else []
    details += ["projected accumulation"] if config.get("accumulate_projected") else []
    if config.get("int8_weights"):
        details.append("INT8 weights" + (", nearest" if config.get("int8_rounding") == "nearest" else ""))
    details += ["stochastic rounding"] if config.get("stochastic_rounding") else []
    return f"{label} ({', '.join(details)})" if details else label


def _number(value: Any) -> Optional[float]:
    """A finite float from JSON/CSV values ('nan' strings and blanks become None)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of metrics.jsonl; a line being written right now, or damaged (bad JSON, changed bytes, no
    numeric step), is skipped: one bad line never costs the report."""
    try:
        lines = path.read_bytes().splitlines()
    except OSError:
        return []
    return [record for line in lines if (record := parse_record(line)) is not None]


def planned_steps(config: dict[str, Any]) -> Optional[int]:
    """Optimizer steps the run was set up for, by the trainer's own plan; None when the config cannot say:
    a token budget without --total-batch-size divides by the process count, which no file of the run records."""
    cfg = TrainConfig.from_dict(config)
    if cfg.num_training_steps is None and not (cfg.max_train_tokens and cfg.total_batch_size):
        return None
    try:
        # How the total batch splits into micro-batches and processes does not change the step count.
        return int(plan_steps(cfg.replace(batch_size=1), world_size=1).total_steps)
    except (UserError, TypeError, ValueError, ZeroDivisionError):  # a hand-edited or foreign config
        return None


def load_run(run_dir: Path) -> Run:
    """Read one run directory; never raises for missing or half-written files."""
    checkpoint = latest_checkpoint(run_dir / "checkpoints")
    # Before its first checkpoint (or without a config in it), the run's own copy, written at every start.
    config = (_read_json(checkpoint / "train_config.json") if checkpoint else {}) or _read_json(
        run_dir / "train_config.json"
    )
    records = _read_jsonl(run_dir / "metrics.jsonl")
    summary = _read_json(run_dir / "summary.json")
    if not (config or records or summary):
        return Run(source=str(run_dir), status="missing")
    steps = [r for r in records if "loss" in r and "step" in r]
    evals = {int(r["step"]): r for r in records if _number(r.get("val_perplexity")) is not None}
    steps_done = max([int(r["step"]) for r in steps] + [int(_number(summary.get("steps")) or 0)])
    total = planned_steps(config)
    finished = bool(summary) and (total is None or steps_done >= total)
    tokens = [int(t) for r in steps if (t := _number(r.get("tokens_seen"))) is not None]
    speeds = [_number(r.get("tokens_per_second")) for r in steps]
    speeds = [s for s in speeds if s is not None]
    sent = [b for r in steps if (b := _number(r.get("comm_bytes"))) is not None]
    model_config = checkpoint / "config.json" if checkpoint and (checkpoint / "config.json").is_file() else None
    return Run(
        source=str(run_dir),
        status="finished" if finished else "unfinished",
        config=config,
        summary=summary,
        steps_done=steps_done,
        total_steps=total,
        tokens_done=max(tokens) if tokens else None,
        evals=[(int(_number(r.get("tokens_seen")) or 0), float(r["val_perplexity"])) for _, r in sorted(evals.items())],
        peaks=_peaks(steps),
        tokens_per_second=statistics.median(speeds) if speeds else None,
        data_wait_share=_data_wait_share(steps),
        comm_bytes=statistics.mean(sent) if sent else None,
        model_config_path=model_config,
    )


def _data_wait_share(step_records: list[dict[str, Any]]) -> Optional[float]:
    """Waited / step time over the logged steps (a logged step's time is its tokens over its window's speed)."""
    waited, took = 0.0, 0.0
    for record in step_records:
        wait, tokens, speed = (
            _number(record.get(k)) for k in ("data_wait_seconds", "step_tokens", "tokens_per_second")
        )
        if wait is not None and tokens and speed:
            waited, took = waited + wait, took + tokens / speed
    return waited / took if took else None


def _peaks(step_records: list[dict[str, Any]]) -> dict[str, float]:
    """Highest reading of each measured part over the run (each log window resets the meter)."""
    peaks = {}
    for part in MEASURED:
        values = [v for r in step_records if (v := _number(r.get(f"peak_{part}_gb"))) is not None]
        if values:
            peaks[part] = max(values)
    return peaks


def _csv_value(text: str) -> Any:
    if text in ("True", "False"):
        return text == "True"
    try:
        return json.loads(text)
    except ValueError:
        return text


def load_wandb_csv(path: Path) -> list[Run]:
    """Runs from a W&B runs-table export (project page -> Runs -> Export CSV): config and summary
    columns by their names; the run's state (finished, running, crashed, ...) is its status."""
    try:
        with open(path, newline="") as f:
            rows = list(csv_module.DictReader(f))
    except OSError as err:
        raise UserError(f"cannot read W&B export {path}: {err.strerror}") from None
    config_fields = set(TrainConfig.__dataclass_fields__)
    runs = []
    for row in rows:
        values = {key: _csv_value(text) for key, text in row.items() if key and text not in (None, "")}
        config = {k: v for k, v in values.items() if k in config_fields}
        summary = {k: values[k] for k in ("val_perplexity", "val_loss", "tokens_seen", "steps") if k in values}
        state = str(values.get("State", "finished"))
        steps = int(_number(values.get("steps", values.get("_step"))) or 0)
        total = planned_steps(config)
        status = "unfinished" if state == "running" else state
        peaks = {part: v for part in MEASURED if (v := _number(values.get(f"peak_{part}_gb"))) is not None}
        runs.append(
            Run(
                source=f"W&B: {values.get('Name', '?')}",
                status=status,
                config=config,
                summary=summary,
                steps_done=steps,
                total_steps=total,
                peaks=peaks,
                tokens_per_second=_number(values.get("tokens_per_second")),
                comm_bytes=_number(values.get("comm_bytes")),
            )
        )
    return runs


# ---------------------------------------------------------------------------------------------
# Estimated memory (galore_train.memory.estimate), per run
# ---------------------------------------------------------------------------------------------

# The estimator's part that corresponds to each measured component.
ESTIMATE_PARTS = {
    "weights": "weights",
    "grads": "gradients",
    "optimizer_state": "optimizer_states",
    "other": "activations",
}
# TrainConfig fields the estimator takes as keywords; not dtype (the run's resolved one is passed on its own), nor
# the batch split over processes (a run's folder does not record how many it had).
ESTIMATE_OPTIONS = (
    "eightbit",
    *(name for name in CONFIG_ESTIMATE_OPTIONS if name not in ("dtype", "total_batch_size", "distributed")),
)


TRAIN_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "fp32": "fp32", "bf16": "bf16"}  # summary or config -> estimator


def estimated_memory(run: Run) -> Optional[dict[str, float]]:
    """GiB by part from galore_train.memory.estimate's estimator for the run's configuration, plus
    weights_and_states (the paper's Table 2 quantity, with GaLore's projections as in the measurement)
    and total; None when it cannot say (dtype 'auto' of a run without a summary, an unknown model,
    another estimator interface)."""
    # The summary records the dtype the run resolved (torch's name); 'auto' in the config depends on the device.
    dtype = TRAIN_DTYPES.get(str(run.summary.get("dtype"))) or TRAIN_DTYPES.get(str(run.config.get("dtype")))
    if dtype is None or not run.config.get("optimizer"):
        return None
    try:
        from galore_train.memory.estimate import estimate_memory
        from galore_train.model import load_model_config

        c = run.config
        accepted = inspect.signature(estimate_memory).parameters
        options = {name: c[name] for name in ESTIMATE_OPTIONS if name in c and name in accepted}
        model_config = load_model_config(str(run.model_config_path or c["model"]))
        estimate = estimate_memory(model_config, c["optimizer"], c.get("rank", 128), dtype=dtype, **options)
        # GaLore's projection matrices live in the optimizer's state, where the meter counts them too.
        states = estimate.optimizer_states + estimate.projections
        parts = {
            "weights": estimate.weights,
            "gradients": estimate.gradients,
            "optimizer_states": states,
            "activations": estimate.activations,
            "weights_and_states": estimate.weights + states,
            "total": estimate.total,
        }
    except (ImportError, TypeError, AttributeError, KeyError, UserError):
        return None
    return {name: nbytes / GIB for name, nbytes in parts.items()}
