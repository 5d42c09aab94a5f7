"""Runs -> the paper's tables and plots: what `galore-train report RUN_DIR...` prints.

A run directory holds metrics.jsonl (step and eval records), summary.json (written when the run ends)
and checkpoints/step_*/train_config.json (the full TrainConfig). A W&B runs-table CSV export can stand
in for run directories (no curves then). Runs are grouped into rows by method (Full-Rank, GaLore,
LoRA, ...) and columns by model, as in the paper's Table 2; runs that differ only by seed share a cell
(mean and spread). A run directory that is missing or whose run did not finish is shown as such:
the report never fails on a run that is still going.
"""

from __future__ import annotations

import csv as csv_module
import inspect
import io
import json
import math
import os
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

from galore_train.config import TrainConfig, parse_token_count
from galore_train.errors import UserError

GIB = 2**30
COMPONENTS = ("weights", "grads", "optimizer_state", "other")  # the measured parts in metrics.jsonl

# Row names of the paper, by the optimizer actually built (after --8bit).
METHOD_LABELS = {
    "adamw": "Full-Rank", "adam": "Full-Rank (Adam)", "galore_adamw": "GaLore", "low_rank": "Low-Rank",
    "lora": "LoRA", "relora": "ReLoRA", "adafactor": "Adafactor", "adam8bit": "8-bit Adam",
    "galore_adafactor": "GaLore-Adafactor", "galore_adamw8bit": "8-bit GaLore", "natural_galore_adamw": "Natural GaLore",
}
ROW_ORDER = list(METHOD_LABELS.values())

LOW_RANK_SECTION = "GaLore and low-rank methods"  # TrainConfig's options that only GaLore and LoRA-likes use
# Settings that make two runs of one method different experiments (rows), unlike the seed.
SETTING_FIELDS = ("lr", "rank", "gap", "scale", "proj_type", "max_length", "pack", "total_batch_size",
                  "num_training_steps", "max_train_tokens", "weight_decay", "grad_clipping", "dtype",
                  "activation_checkpointing", "lora_alpha", "relora_reset", "relora_warm_start", "svd")

# GaLore paper (Zhao et al. 2024, arXiv 2403.03507), Table 2: validation perplexity on C4.
PAPER_TABLE2_PERPLEXITY = {
    "Full-Rank": {"llama_60m": 34.06, "llama_130m": 25.08, "llama_350m": 18.80, "llama_1b": 15.56},
    "GaLore": {"llama_60m": 34.88, "llama_130m": 25.36, "llama_350m": 18.95, "llama_1b": 15.64},
    "Low-Rank": {"llama_60m": 78.18, "llama_130m": 45.51, "llama_350m": 37.41, "llama_1b": 142.53},
    "LoRA": {"llama_60m": 34.99, "llama_130m": 33.92, "llama_350m": 25.58, "llama_1b": 19.21},
    "ReLoRA": {"llama_60m": 37.04, "llama_130m": 29.37, "llama_350m": 29.08, "llama_1b": 18.33},
}


# ---------------------------------------------------------------------------------------------
# Reading runs
# ---------------------------------------------------------------------------------------------

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
    peaks: dict[str, float] = field(default_factory=dict)  # GiB: "memory" and each of COMPONENTS
    tokens_per_second: Optional[float] = None
    model_config_path: Optional[Path] = None  # the checkpoint's config.json, for the estimator
    estimate: Optional[dict[str, float]] = None  # GiB from galore_train.memory, filled by report()

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
        from galore_train.methods import METHOD_NAMES

        optimizer = str(self.config.get("optimizer", ""))
        return "galore" in optimizer or optimizer in METHOD_NAMES

    def settings(self) -> dict[str, Any]:
        """The SETTING_FIELDS that apply to this run's method."""
        return {name: self.config.get(name) for name in SETTING_FIELDS
                if self.uses_rank or TrainConfig.__dataclass_fields__[name].metadata["section"] != LOW_RANK_SECTION}

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

    def status_text(self) -> str:
        if self.status != "unfinished":
            return self.status
        of = f"/{self.total_steps}" if self.total_steps else ""
        return f"unfinished (step {self.steps_done}{of})"


def method_label(config: dict[str, Any]) -> str:
    """Paper-style row name: the optimizer actually built, plus ' (layer-wise)'."""
    from galore_train.registry import OPTIMIZERS, resolve_optimizer_name

    name = str(config.get("optimizer", "?"))
    if config.get("eightbit"):
        try:
            name = resolve_optimizer_name(name, True)
        except UserError:
            pass  # a method (its 8-bit optimizer is no row of its own), an old or a foreign name: as it is
    label = OPTIMIZERS[name].label if name in OPTIMIZERS else name
    return label + " (layer-wise)" if config.get("layerwise") else label


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
    """Records of metrics.jsonl; a line being written right now (or damaged) is skipped."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _latest_checkpoint(run_dir: Path) -> Optional[Path]:
    steps = [(int(m.group(1)), p) for p in (run_dir / "checkpoints").glob("step_*")
             if (m := re.fullmatch(r"step_(\d+)", p.name)) and (p / "train_config.json").is_file()]
    return max(steps)[1] if steps else None


def planned_steps(config: dict[str, Any]) -> Optional[int]:
    """Optimizer steps the run was set up for (the token budget needs --total-batch-size to say)."""
    if config.get("num_training_steps"):
        return int(config["num_training_steps"])
    tokens, batch, length = config.get("max_train_tokens"), config.get("total_batch_size"), config.get("max_length")
    if tokens and batch and length:
        return math.ceil(parse_token_count(tokens) / (batch * length))
    return None


def load_run(run_dir: Path) -> Run:
    """Read one run directory; never raises for missing or half-written files."""
    checkpoint = _latest_checkpoint(run_dir)
    config = _read_json(checkpoint / "train_config.json") if checkpoint else _read_json(run_dir / "train_config.json")
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
    model_config = checkpoint / "config.json" if checkpoint and (checkpoint / "config.json").is_file() else None
    return Run(
        source=str(run_dir), status="finished" if finished else "unfinished", config=config, summary=summary,
        steps_done=steps_done, total_steps=total, tokens_done=max(tokens) if tokens else None,
        evals=[(int(r.get("tokens_seen", 0)), float(r["val_perplexity"])) for _, r in sorted(evals.items())],
        peaks=_peaks(steps), tokens_per_second=statistics.median(speeds) if speeds else None,
        model_config_path=model_config,
    )


def _peaks(step_records: list[dict[str, Any]]) -> dict[str, float]:
    """Highest reading of each measured part over the run (each log window resets the meter)."""
    peaks = {}
    for part in ("memory", *COMPONENTS):
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
        peaks = {part: v for part in ("memory", *COMPONENTS) if (v := _number(values.get(f"peak_{part}_gb"))) is not None}
        runs.append(Run(source=f"W&B: {values.get('Name', '?')}", status=status, config=config, summary=summary,
                        steps_done=steps, total_steps=total, peaks=peaks,
                        tokens_per_second=_number(values.get("tokens_per_second"))))
    return runs


# ---------------------------------------------------------------------------------------------
# Estimated memory (galore_train.memory), per run
# ---------------------------------------------------------------------------------------------

# The estimator's part that corresponds to each measured component.
ESTIMATE_PARTS = {"weights": "weights", "grads": "gradients", "optimizer_state": "optimizer_states", "other": "activations"}
# TrainConfig fields the estimator may take as keywords (it is asked only for those it declares).
ESTIMATE_OPTIONS = ("eightbit", "layerwise", "batch_size", "max_length", "activation_checkpointing", "galore_targets",
                    "proj_type", "beta1", "proj_bits", "proj_group_size", "fisher_history")


TRAIN_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "fp32": "fp32", "bf16": "bf16"}  # summary or config -> estimator


def estimated_memory(run: Run) -> Optional[dict[str, float]]:
    """GiB by part from galore_train.memory's estimator for the run's configuration, plus
    weights_and_states (the paper's Table 2 quantity, with GaLore's projections as in the measurement)
    and total; None when it cannot say (dtype 'auto' of a run without a summary, an unknown model,
    another estimator interface)."""
    # The summary records the dtype the run resolved (torch's name); 'auto' in the config depends on the device.
    dtype = TRAIN_DTYPES.get(str(run.summary.get("dtype"))) or TRAIN_DTYPES.get(str(run.config.get("dtype")))
    if dtype is None or not run.config.get("optimizer"):
        return None
    try:
        from galore_train.memory import estimate_memory
        from galore_train.model import load_model_config

        c = run.config
        accepted = inspect.signature(estimate_memory).parameters
        options = {name: c[name] for name in ESTIMATE_OPTIONS if name in c and name in accepted}
        model_config = load_model_config(str(run.model_config_path or c["model"]))
        estimate = estimate_memory(model_config, c["optimizer"], c.get("rank", 128), dtype=dtype, **options)
        # GaLore's projection matrices live in the optimizer's state, where the meter counts them too.
        states = estimate.optimizer_states + estimate.projections
        parts = {"weights": estimate.weights, "gradients": estimate.gradients, "optimizer_states": states,
                 "activations": estimate.activations, "weights_and_states": estimate.weights + states, "total": estimate.total}
    except (ImportError, TypeError, AttributeError, KeyError, UserError):
        return None
    return {name: nbytes / GIB for name, nbytes in parts.items()}


# ---------------------------------------------------------------------------------------------
# Grouping into the table's cells
# ---------------------------------------------------------------------------------------------

@dataclass
class Cell:
    """The runs of one row (method + distinguishing settings) and one model."""

    row: str
    model: str
    runs: list[Run]

    @property
    def finished(self) -> list[Run]:
        return [r for r in self.runs if r.status == "finished" and r.val_perplexity is not None]

    def perplexity(self) -> Optional[float]:
        values = [r.val_perplexity for r in self.finished]
        return statistics.fmean(values) if values else None

    def spread(self) -> Optional[float]:
        """Half the range of the finished runs' perplexities (for two seeds: the distance to the mean)."""
        values = [r.val_perplexity for r in self.finished]
        return (max(values) - min(values)) / 2 if len(values) > 1 else None


def _mean(values: Iterable[Optional[float]]) -> Optional[float]:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def group_cells(runs: list[Run]) -> list[Cell]:
    """Cells in table order. Runs of one method and model that differ in a setting other than the
    seed (an lr sweep, two ranks) get separate rows named by that setting, e.g. 'GaLore (lr 0.01)'."""
    by_method: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        by_method.setdefault((run.method, run.model), []).append(run)
    cells: dict[tuple[str, str], Cell] = {}
    for (method, model), members in by_method.items():
        varying = [f for f in SETTING_FIELDS if len({json.dumps(r.settings().get(f)) for r in members}) > 1]
        for run in members:
            suffix = ", ".join(f"{name.replace('_', ' ')} {run.settings().get(name)}" for name in varying)
            row = f"{method} ({suffix})" if suffix else method
            cells.setdefault((row, model), Cell(row, model, [])).runs.append(run)
    return sorted(cells.values(), key=lambda c: (_row_key(c.row), c.row, _model_key(c.model)))


def _row_key(row: str) -> int:
    base = row.split(" (")[0]
    return ROW_ORDER.index(base) if base in ROW_ORDER else len(ROW_ORDER)


def _model_key(model: str) -> tuple[float, str]:
    """Models by size when the name ends in a size (llama_60m < llama_1b), else by name."""
    match = re.search(r"(\d+(?:\.\d+)?)([mb])$", model.lower())
    size = float(match.group(1)) * (1e6 if match.group(2) == "m" else 1e9) if match else math.inf
    return size, model


# ---------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------

def _ppl(value: Optional[float], like: Optional[float] = None) -> str:
    """Perplexity with 2 decimals below 100, 1 above (as precise as `like`, for a spread)."""
    if value is None:
        return "—"
    return f"{value:.1f}" if (like or value) >= 100 else f"{value:.2f}"


def _gib(value: Optional[float]) -> str:
    if value is None:
        return "—"
    return f"{value:.2f} GiB" if value >= 1.0 else f"{value * 1024:.1f} MiB"


def _count(value: Optional[float]) -> str:
    if value is None:
        return "—"
    for limit, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if value >= limit:
            return f"{value / limit:.1f}{suffix}"
    return f"{value:.0f}"


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _perplexity_cell(cell: Optional[Cell]) -> str:
    if cell is None:
        return "missing"
    mean = cell.perplexity()
    if mean is None:
        run = cell.runs[0]
        last = f", ppl {_ppl(run.val_perplexity)}" if run.val_perplexity is not None else ""
        return f"{run.status_text()}{last}"
    text = _ppl(mean)
    if cell.spread() is not None:
        text += f" ±{_ppl(cell.spread(), like=mean)}"
    pending = len(cell.runs) - len(cell.finished)
    text += f" (n={len(cell.finished)}" + (f", +{pending} unfinished)" if pending else ")")
    paper = PAPER_TABLE2_PERPLEXITY.get(cell.row, {}).get(cell.model)
    return text + (f" [paper {paper:.2f}]" if paper else "")


def _weights_and_states(run: Run) -> Optional[float]:
    if "weights" in run.peaks and "optimizer_state" in run.peaks:
        return run.peaks["weights"] + run.peaks["optimizer_state"]
    return None


def _estimated(run: Run, part: str) -> Optional[float]:
    return run.estimate.get(part) if run.estimate else None


def _memory_cell(cell: Optional[Cell]) -> str:
    if cell is None:
        return "missing"
    measured = _mean(_weights_and_states(r) for r in cell.runs)
    peak = _mean(r.peaks.get("memory") for r in cell.runs)
    estimate = _mean(_estimated(r, "weights_and_states") for r in cell.runs)
    return f"{_gib(measured)} · est {_gib(estimate)} · peak {_gib(peak)}"


def _full_rank_reference(cells: list[Cell]) -> dict[str, float]:
    """model -> the best finished Full-Rank perplexity (the lr sweep's best, if there is one)."""
    reference: dict[str, float] = {}
    for cell in cells:
        mean = cell.perplexity()
        if cell.row.split(" (")[0] == "Full-Rank" and mean is not None:
            reference[cell.model] = min(mean, reference.get(cell.model, math.inf))
    return reference


def _relative_rows(cells: list[Cell], rows: list[str], models: list[str], reference: dict[str, float]) -> list[list[str]]:
    """Each row's perplexity relative to the Full-Rank reference of the same model, with the paper's."""
    table = []
    for row in rows:
        values = []
        for model in models:
            cell = next((c for c in cells if c.row == row and c.model == model), None)
            mean = cell.perplexity() if cell else None
            values.append(f"{mean / reference[model] - 1:+.1%}" if mean is not None and model in reference else "—")
        table.append([row, *values, _paper_relative(row.split(" (")[0])])
    return table


def _paper_relative(method: str) -> str:
    """The paper's perplexity of `method` relative to Full-Rank at 60M / 130M / 350M / 1B."""
    full = PAPER_TABLE2_PERPLEXITY["Full-Rank"]
    if method == "Full-Rank":
        return "reference"
    if method not in PAPER_TABLE2_PERPLEXITY:
        return "—"
    return " / ".join(f"{PAPER_TABLE2_PERPLEXITY[method][m] / full[m] - 1:+.1%}" for m in full)


def _runs_table(runs: list[Run]) -> str:
    def row(r: Run) -> list[str]:
        known = r.status != "missing"
        return [r.source, r.status_text(), r.model if known else "—", r.method if known else "—",
                str(r.config.get("seed", "—")), str(r.config.get("lr", "—")), str(r.config.get("rank", "—")) if r.uses_rank else "—",
                str(r.steps_done), _count(r.tokens_seen), str(r.summary.get("epochs", "—")), _ppl(r.val_perplexity),
                *(_gib(r.peaks.get(p)) for p in ("memory", *COMPONENTS)), _count(r.tokens_per_second)]

    header = ["Run", "Status", "Model", "Method", "Seed", "LR", "Rank", "Steps", "Tokens", "Epochs", "Val ppl",
              "Peak", "Weights", "Grads", "Opt. state", "Other", "Tokens/s"]
    return _markdown_table(header, [row(r) for r in runs])


def markdown_report(runs: list[Run], plots: list[Path], output: Optional[Path], title: Optional[str] = None) -> str:
    """The Table-2-style tables, the per-run details and links to the plots."""
    present = [r for r in runs if r.status != "missing"]
    cells = group_cells(present)
    models = sorted({c.model for c in cells}, key=_model_key)
    rows = list(dict.fromkeys(c.row for c in cells))
    find = {(c.row, c.model): c for c in cells}

    parts = [f"# {title or 'Training runs'}"]
    if cells:
        tokens = [_count(_mean(r.tokens_seen for r in present if r.model == m)) for m in models]
        parts += ["## Validation perplexity", _markdown_table(
            ["Method", *models], [[row, *(_perplexity_cell(find.get((row, m))) for m in models)] for row in rows]
            + [["Training tokens", *tokens]]),
            "Mean over finished runs (seeds); ± is half the range of the runs"
            + ("; [paper] is the GaLore paper's Table 2." if any(PAPER_TABLE2_PERPLEXITY.get(r, {}).get(m) for r in rows for m in models) else ".")]
        parts += ["## Memory", _markdown_table(
            ["Method", *models], [[row, *(_memory_cell(find.get((row, m))) for m in models)] for row in rows]),
            "Weights + optimizer states (the paper's Table 2 memory; GaLore's projection matrices count as optimizer state) "
            "measured (highest reading of each in metrics.jsonl), `est` the same from galore_train.memory's estimator, "
            "`peak` the measured peak of all live tensors. MiB = 2^20 bytes, GiB = 2^30 bytes."]
    reference = _full_rank_reference(cells)
    if reference:
        parts += ["## Relative to Full-Rank", _markdown_table(
            ["Method", *models, "paper: 60M / 130M / 350M / 1B"], _relative_rows(cells, rows, models, reference)),
            "Perplexity relative to the best Full-Rank row of the same model (negative = better)."]
    parts += ["## Runs", _runs_table(runs)]
    if plots:
        base = output.parent if output else Path.cwd()
        parts += ["## Plots", "\n".join(f"![{p.stem}]({os.path.relpath(p, base)})" for p in plots)]
    return "\n\n".join(parts) + "\n"


CSV_FIELDS = ("source", "status", "model", "method", "row", "seed", "lr", "rank", "steps", "total_steps", "tokens_seen",
              "epochs", "val_loss", "val_perplexity", "peak_memory_gb", *(f"peak_{c}_gb" for c in COMPONENTS),
              "est_weights_and_states_gb", "est_total_gb", "tokens_per_second")


def csv_report(runs: list[Run]) -> str:
    """One line per run with raw numbers (GiB, tokens), for spreadsheets."""
    rows = {id(r): c.row for c in group_cells([r for r in runs if r.status != "missing"]) for r in c.runs}
    out = io.StringIO()
    writer = csv_module.DictWriter(out, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for run in runs:
        writer.writerow({
            "source": run.source, "status": run.status, "model": run.model if run.status != "missing" else "",
            "method": run.method if run.status != "missing" else "", "row": rows.get(id(run), ""),
            "seed": run.config.get("seed", ""), "lr": run.config.get("lr", ""), "rank": run.config.get("rank", "") if run.uses_rank else "",
            "steps": run.steps_done, "total_steps": run.total_steps or "", "tokens_seen": run.tokens_seen or "",
            "epochs": run.summary.get("epochs", ""), "val_loss": run.summary.get("val_loss", ""),
            "val_perplexity": run.val_perplexity or "", "peak_memory_gb": run.peaks.get("memory", ""),
            **{f"peak_{c}_gb": run.peaks.get(c, "") for c in COMPONENTS},
            "est_weights_and_states_gb": _estimated(run, "weights_and_states") or "",
            "est_total_gb": _estimated(run, "total") or "", "tokens_per_second": run.tokens_per_second or "",
        })
    return out.getvalue()


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------

def plot_perplexity(runs: list[Run], path: Path) -> Optional[Path]:
    """Validation perplexity against training tokens, every run on one chart (log scale)."""
    curves = [r for r in runs if r.evals]
    if not curves:
        return None
    plt = _pyplot()
    colors = plt.get_cmap("tab10")
    styles = ("-", "--", ":", "-.")  # the runs (seeds) of one cell share a colour
    fig, ax = plt.subplots(figsize=(8, 5))
    for index, cell in enumerate(group_cells(curves)):
        for number, run in enumerate(cell.runs):
            tokens, ppl = zip(*run.evals)
            ax.plot(tokens, ppl, marker="o", markersize=3, color=colors(index % 10), linestyle=styles[number % len(styles)],
                    label=f"{cell.row} · {cell.model} · seed {run.config.get('seed', '?')}")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation perplexity")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("Validation perplexity")
    return _save(fig, path)


def plot_memory(runs: list[Run], path: Path) -> Optional[Path]:
    """Memory by component per row and model: a stacked bar of the measured peaks (each part's own
    peak, so the stack can exceed the measured total, drawn as a tick) and, where the estimator
    applies, a hatched stacked bar of its estimate."""
    measured = [r for r in runs if r.peaks or r.estimate]
    if not measured:
        return None
    plt = _pyplot()
    cells = group_cells(measured)
    colors = dict(zip(COMPONENTS, ("tab:blue", "tab:orange", "tab:green", "tab:red")))
    names = {"weights": "weights", "grads": "gradients", "optimizer_state": "optimizer states", "other": "activations and other"}
    fig, ax = plt.subplots(figsize=(max(8, 3 + 1.4 * len(cells)), 4.5))
    for x, cell in enumerate(cells):
        for offset, source, hatch in ((-0.2, "measured", None), (0.2, "estimated", "//")):
            bottom = 0.0
            for part in COMPONENTS:
                values = [r.peaks.get(part) if source == "measured" else _estimated(r, ESTIMATE_PARTS[part]) for r in cell.runs]
                height = _mean(values)
                if height is None:
                    continue
                ax.bar(x + offset, height * 1024, 0.38, bottom=bottom, color=colors[part], hatch=hatch,
                       edgecolor="black" if hatch else None, linewidth=0.3)
                bottom += height * 1024
        peak = _mean(r.peaks.get("memory") for r in cell.runs)
        if peak is not None:
            ax.plot([x - 0.39, x - 0.01], [peak * 1024] * 2, color="black", linewidth=2)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[p]) for p in COMPONENTS]
    handles += [plt.Rectangle((0, 0), 1, 1, fill=False, hatch="//"), plt.Line2D([0], [0], color="black", linewidth=2)]
    labels = [names[p] for p in COMPONENTS] + ["estimate (right bar, hatched)", "measured peak of all live tensors"]
    ax.legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.set_xticks(range(len(cells)), [f"{c.row}\n{c.model}" for c in cells], fontsize=7)
    ax.set_ylabel("MiB")
    ax.set_title("Memory by component: measured peak of each part (left), estimate (right)", fontsize=10)
    return _save(fig, path)


def _pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend (no display on servers), imported when plotting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------

def report(run_dirs: list[Path], *, output: Optional[Path] = None, csv: bool = False, plots_dir: Optional[Path] = None,
           wandb_csv: Optional[Path] = None, title: Optional[str] = None) -> str:
    """Build the report. Writes `output` (markdown; with `csv` also the .csv beside it) and the plots
    into `plots_dir`. Returns the text to show: the markdown, or the CSV when `csv` has no `output`."""
    if not run_dirs and wandb_csv is None:
        raise UserError("give at least one run directory (or --wandb-csv)")
    runs = [load_run(Path(d)) for d in run_dirs] + (load_wandb_csv(wandb_csv) if wandb_csv else [])
    for run in runs:
        run.estimate = estimated_memory(run) if run.status != "missing" else None
    plots = []
    if plots_dir is not None:
        plots = [p for p in (plot_perplexity(runs, plots_dir / "val_perplexity.png"),
                             plot_memory(runs, plots_dir / "memory.png")) if p is not None]
    markdown = markdown_report(runs, plots, output, title)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(markdown)
        if csv:
            output.with_suffix(".csv").write_text(csv_report(runs))
    return csv_report(runs) if csv and output is None else markdown
