"""The tuned comparison's table and plot (scripts/mini_tuned.sh): per model and method, the lr grid it was
given and its seed-0 perplexities, the best lr and whether it lies strictly inside the grid, the perplexity of
each seed at the best lr, and the optimizer-state bytes (galore_train.memory.estimate's estimator, which equals the
measured state: tests/test_memory.py) beside it; plus perplexity against optimizer-state memory as a plot.

    python scripts/tuned_summary.py OUTPUT.md PLOT.png SWEEP_DIR... -- FINAL_DIR...

Appends to OUTPUT.md (the `galore-train report` the script wrote first).
"""

from __future__ import annotations

import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's galore_train, as `python scripts/...` puts scripts/ first

from galore_train.reporting.runs import GIB, Run, estimated_memory, load_run  # noqa: E402

NAME = re.compile(r"(?P<model>llama_\w+?)-(?P<method>\w+)-lr(?P<lr>[\d.e-]+)-s(?P<seed>\d+)")


def _parse(path: str) -> tuple[tuple[str, str], float, int, Run]:
    match = NAME.fullmatch(Path(path).name)
    if match is None:
        raise SystemExit(f"error: {path}: not a mini_tuned run directory (MODEL-METHOD-lrLR-sSEED)")
    return (match["model"], match["method"]), float(match["lr"]), int(match["seed"]), load_run(Path(path))


def main(output: Path, plot: Path, sweep: list[str], final: list[str]) -> None:
    parsed = {path: _parse(path) for path in dict.fromkeys(sweep + final)}  # the best lr's seed-0 run is in both
    grids: dict[tuple[str, str], dict[float, float | None]] = {}
    for key, lr, _, run in (parsed[path] for path in sweep):
        grids.setdefault(key, {})[lr] = run.val_perplexity
    finals: dict[tuple[str, str], list[tuple[float, int, Run]]] = {}
    for key, lr, seed, run in (parsed[path] for path in final):
        finals.setdefault(key, []).append((lr, seed, run))
    rows, points = [], []
    for key in sorted(grids, key=lambda k: (k[0], list(grids).index(k))):
        grid = grids[key]
        lrs = sorted(grid)
        done = {lr: ppl for lr, ppl in grid.items() if ppl is not None}
        best = min(done, key=done.get) if done else None
        inside = best is not None and lrs[0] < best < lrs[-1]
        seeds = [(s, r.val_perplexity) for lr, s, r in finals.get(key, []) if lr == best and r.val_perplexity]
        mean = statistics.fmean(p for _, p in seeds) if seeds else None
        estimate = next((estimated_memory(r) for lr, s, r in finals.get(key, []) if lr == best), None)
        state = round(estimate["optimizer_states"] * GIB) if estimate else None
        sweep_text = " / ".join(f"{lr:g}: {grid[lr]:.1f}" if grid[lr] else f"{lr:g}: —" for lr in lrs)
        seeds_text = ", ".join(f"{p:.1f} (s{s})" for s, p in sorted(seeds)) or "—"
        rows.append(
            f"| {key[0]} | {key[1]} | {sweep_text} | {best if best is not None else '—'} | "
            f"{'yes' if inside else 'NO (edge)'} | {seeds_text} | {f'{mean:.1f}' if mean else '—'} | "
            f"{state if state is not None else '—'} |"
        )
        if mean and state:
            points.append((key, state, mean))
    with output.open("a") as out:
        out.write("\n## Tuned comparison (scripts/mini_tuned.sh)\n\n")
        out.write(
            "| Model | Method | lr: val ppl (seed 0) | best lr | inside the grid | val ppl at best | mean | "
            "optimizer state (bytes) |\n|---|---|---|---|---|---|---|---|\n"
        )
        out.write("\n".join(rows) + "\n")
        out.write(_compute(list(parsed.values())))
    _plot(points, plot)


def _compute(runs: list[tuple[tuple[str, str], float, int, Run]]) -> str:
    """Per model, how many runs and how long their training steps took: a run's tokens over its median logged
    speed (evaluation and start-up are not in it), each run on one CPU thread."""
    seconds: dict[str, list[float]] = {}
    for (model, _), _, _, run in runs:
        if run.tokens_done and run.tokens_per_second:
            seconds.setdefault(model, []).append(run.tokens_done / run.tokens_per_second)
    parts = [f"{model} {len(s)} runs, {sum(s) / 3600:.1f} h" for model, s in sorted(seconds.items())]
    return f"\nCompute (training steps, one thread per run): {'; '.join(parts)}.\n" if parts else ""


def _plot(points: list[tuple[tuple[str, str], int, float]], path: Path) -> None:
    """Mean perplexity at the best lr against optimizer-state bytes, one marker per method, one colour per model."""
    if not points:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    models = sorted({key[0] for key, _, _ in points})
    for index, model in enumerate(models):
        mine = [(key[1], state, ppl) for key, state, ppl in points if key[0] == model]
        ax.scatter([s / 2**20 for _, s, _ in mine], [p for _, _, p in mine], color=f"C{index}", label=model)
        for method, state, ppl in mine:
            ax.annotate(method, (state / 2**20, ppl), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("optimizer state (MiB)")
    ax.set_ylabel("validation perplexity (mean of seeds at the best lr)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title("Tuned: perplexity against optimizer-state memory")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    args = sys.argv[1:]
    if len(args) < 3 or "--" not in args:
        raise SystemExit(__doc__)
    split = args.index("--")
    main(Path(args[0]), Path(args[1]), args[2:split], args[split + 1 :])
