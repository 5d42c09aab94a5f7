"""The report's plots (matplotlib, imported only when plotting): validation perplexity over training tokens,
and memory by component, measured next to estimated."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from galore_train.reporting.cells import group_cells, known_mean
from galore_train.reporting.runs import COMPONENTS, ESTIMATE_PARTS, Run


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
            ax.plot(
                tokens,
                ppl,
                marker="o",
                markersize=3,
                color=colors(index % 10),
                linestyle=styles[number % len(styles)],
                label=f"{cell.row} · {cell.model} · seed {run.config.get('seed', '?')}",
            )
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
    names = {
        "weights": "weights",
        "grads": "gradients",
        "optimizer_state": "optimizer states",
        "other": "activations and other",
    }
    fig, ax = plt.subplots(figsize=(max(8, 3 + 1.4 * len(cells)), 4.5))
    for x, cell in enumerate(cells):
        for offset, source, hatch in ((-0.2, "measured", None), (0.2, "estimated", "//")):
            bottom = 0.0
            for part in COMPONENTS:
                values = [
                    r.peaks.get(part) if source == "measured" else r.estimated(ESTIMATE_PARTS[part]) for r in cell.runs
                ]
                height = known_mean(values)
                if height is None:
                    continue
                ax.bar(
                    x + offset,
                    height * 1024,
                    0.38,
                    bottom=bottom,
                    color=colors[part],
                    hatch=hatch,
                    edgecolor="black" if hatch else None,
                    linewidth=0.3,
                )
                bottom += height * 1024
        peak = known_mean(r.peaks.get("memory") for r in cell.runs)
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
