"""Runs -> the paper's tables: what `galore-train report RUN_DIR...` prints (markdown, or CSV per run).

The runs are read by runs.py and grouped into Table 2's cells by cells.py (runs that differ only by seed share a
cell: mean and spread); plots.py draws the plots the report links (all three in galore_train/reporting/).
A run directory that is missing or whose run did not finish is shown as such: the report never fails
on a run that is still going.
"""

from __future__ import annotations

import csv as csv_module
import io
import math
import os
from pathlib import Path
from typing import Optional

from galore_train.errors import UserError
from galore_train.reporting.cells import Cell, group_cells, known_mean, model_key
from galore_train.reporting.plots import plot_memory, plot_perplexity
from galore_train.reporting.runs import MEASURED, Run, estimated_memory, load_run, load_wandb_csv

# GaLore paper (Zhao et al. 2024, arXiv 2403.03507), Table 2: validation perplexity on C4.
PAPER_TABLE2_PERPLEXITY = {
    "Full-Rank": {"llama_60m": 34.06, "llama_130m": 25.08, "llama_350m": 18.80, "llama_1b": 15.56},
    "GaLore": {"llama_60m": 34.88, "llama_130m": 25.36, "llama_350m": 18.95, "llama_1b": 15.64},
    "Low-Rank": {"llama_60m": 78.18, "llama_130m": 45.51, "llama_350m": 37.41, "llama_1b": 142.53},
    "LoRA": {"llama_60m": 34.99, "llama_130m": 33.92, "llama_350m": 25.58, "llama_1b": 19.21},
    "ReLoRA": {"llama_60m": 37.04, "llama_130m": 29.37, "llama_350m": 29.08, "llama_1b": 18.33},
}


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


def _memory_cell(cell: Optional[Cell]) -> str:
    if cell is None:
        return "missing"
    measured = known_mean(_weights_and_states(r) for r in cell.runs)
    peak = known_mean(r.peaks.get("memory") for r in cell.runs)
    estimate = known_mean(r.estimated("weights_and_states") for r in cell.runs)
    return f"{_gib(measured)} · est {_gib(estimate)} · peak {_gib(peak)}"


def _full_rank_reference(cells: list[Cell]) -> dict[str, float]:
    """model -> the best finished Full-Rank perplexity (the lr sweep's best, if there is one)."""
    reference: dict[str, float] = {}
    for cell in cells:
        mean = cell.perplexity()
        if cell.row.split(" (")[0] == "Full-Rank" and mean is not None:
            reference[cell.model] = min(mean, reference.get(cell.model, math.inf))
    return reference


def _relative_rows(
    cells: list[Cell], rows: list[str], models: list[str], reference: dict[str, float]
) -> list[list[str]]:
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
        return [
            r.source,
            r.status_text(),
            r.model if known else "—",
            r.method if known else "—",
            str(r.config.get("seed", "—")),
            str(r.config.get("lr", "—")),
            "—" if r.rank is None else str(r.rank),
            str(r.steps_done),
            _count(r.tokens_seen),
            str(r.summary.get("epochs", "—")),
            _ppl(r.val_perplexity),
            *(_gib(r.peaks.get(p)) for p in MEASURED),
            _count(r.tokens_per_second),
            _gib(None if r.comm_bytes is None else r.comm_bytes / 2**30),
            f"{r.data_wait_share:.2%}" if r.data_wait_share is not None else "—",
        ]

    header = [
        "Run",
        "Status",
        "Model",
        "Method",
        "Seed",
        "LR",
        "Rank",
        "Steps",
        "Tokens",
        "Epochs",
        "Val ppl",
        "Peak",
        "Reserved",
        "Weights",
        "Grads",
        "Opt. state",
        "Other",
        "Tokens/s",
        "Sent/step",
        "Data wait",
    ]
    return _markdown_table(header, [row(r) for r in runs])


def markdown_report(runs: list[Run], plots: list[Path], output: Optional[Path], title: Optional[str] = None) -> str:
    """The Table-2-style tables, the per-run details and links to the plots."""
    present = [r for r in runs if r.status != "missing"]
    cells = group_cells(present)
    models = sorted({c.model for c in cells}, key=model_key)
    rows = list(dict.fromkeys(c.row for c in cells))
    find = {(c.row, c.model): c for c in cells}

    parts = [f"# {title or 'Training runs'}"]
    if cells:
        tokens = [_count(known_mean(r.tokens_seen for r in present if r.model == m)) for m in models]
        parts += [
            "## Validation perplexity",
            _markdown_table(
                ["Method", *models],
                [[row, *(_perplexity_cell(find.get((row, m))) for m in models)] for row in rows]
                + [["Training tokens", *tokens]],
            ),
            "Mean over finished runs (seeds); ± is half the range of the runs"
            + (
                "; [paper] is the GaLore paper's Table 2."
                if any(PAPER_TABLE2_PERPLEXITY.get(r, {}).get(m) for r in rows for m in models)
                else "."
            ),
        ]
        parts += [
            "## Memory",
            _markdown_table(
                ["Method", *models], [[row, *(_memory_cell(find.get((row, m))) for m in models)] for row in rows]
            ),
            "Weights + optimizer states (the paper's Table 2 memory; GaLore's projection matrices count as optimizer"
            " state) "
            "measured (highest reading of each in metrics.jsonl), `est` the same from galore_train.memory's estimator, "
            "`peak` the measured peak of all live tensors. MiB = 2^20 bytes, GiB = 2^30 bytes.",
        ]
    reference = _full_rank_reference(cells)
    if reference:
        parts += [
            "## Relative to Full-Rank",
            _markdown_table(
                ["Method", *models, "paper: 60M / 130M / 350M / 1B"], _relative_rows(cells, rows, models, reference)
            ),
            "Perplexity relative to the best Full-Rank row of the same model (negative = better).",
        ]
    parts += ["## Runs", _runs_table(runs)]
    if plots:
        base = output.parent if output else Path.cwd()
        parts += ["## Plots", "\n".join(f"![{p.stem}]({os.path.relpath(p, base)})" for p in plots)]
    return "\n\n".join(parts) + "\n"


CSV_FIELDS = (
    "source",
    "status",
    "model",
    "method",
    "row",
    "seed",
    "lr",
    "rank",
    "steps",
    "total_steps",
    "tokens_seen",
    "epochs",
    "val_loss",
    "val_perplexity",
    *(f"peak_{c}_gb" for c in MEASURED),
    "est_weights_and_states_gb",
    "est_total_gb",
    "tokens_per_second",
    "data_wait_share",
    "comm_bytes",
)


def csv_report(runs: list[Run]) -> str:
    """One line per run with raw numbers (GiB, tokens), for spreadsheets."""
    rows = {id(r): c.row for c in group_cells([r for r in runs if r.status != "missing"]) for r in c.runs}
    out = io.StringIO()
    writer = csv_module.DictWriter(out, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for run in runs:
        writer.writerow(
            {
                "source": run.source,
                "status": run.status,
                "model": run.model if run.status != "missing" else "",
                "method": run.method if run.status != "missing" else "",
                "row": rows.get(id(run), ""),
                "seed": run.config.get("seed", ""),
                "lr": run.config.get("lr", ""),
                "rank": "" if run.rank is None else run.rank,
                "steps": run.steps_done,
                "total_steps": run.total_steps or "",
                "tokens_seen": run.tokens_seen or "",
                "epochs": run.summary.get("epochs", ""),
                "val_loss": run.summary.get("val_loss", ""),
                "val_perplexity": run.val_perplexity or "",
                **{f"peak_{c}_gb": run.peaks.get(c, "") for c in MEASURED},
                "est_weights_and_states_gb": run.estimated("weights_and_states") or "",
                "est_total_gb": run.estimated("total") or "",
                "tokens_per_second": run.tokens_per_second or "",
                "data_wait_share": "" if run.data_wait_share is None else run.data_wait_share,
                "comm_bytes": "" if run.comm_bytes is None else run.comm_bytes,
            }
        )
    return out.getvalue()


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def report(
    run_dirs: list[Path],
    *,
    output: Optional[Path] = None,
    csv: bool = False,
    plots_dir: Optional[Path] = None,
    wandb_csv: Optional[Path] = None,
    title: Optional[str] = None,
) -> str:
    """Build the report. Writes `output` (markdown; with `csv` also the .csv beside it) and the plots
    into `plots_dir`. Returns the text to show: the markdown, or the CSV when `csv` has no `output`."""
    if not run_dirs and wandb_csv is None:
        raise UserError("give at least one run directory (or --wandb-csv)")
    runs = [load_run(Path(d)) for d in run_dirs] + (load_wandb_csv(wandb_csv) if wandb_csv else [])
    for run in runs:
        run.estimate = estimated_memory(run) if run.status != "missing" else None
    plots = []
    if plots_dir is not None:
        plots = [
            p
            for p in (
                plot_perplexity(runs, plots_dir / "val_perplexity.png"),
                plot_memory(runs, plots_dir / "memory.png"),
            )
            if p is not None
        ]
    markdown = markdown_report(runs, plots, output, title)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(markdown)
        if csv:
            output.with_suffix(".csv").write_text(csv_report(runs))
    return csv_report(runs) if csv and output is None else markdown
