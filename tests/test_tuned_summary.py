"""scripts/tuned_summary.py, the tuned comparison's table and plot, on run folders written like real ones: run as
scripts/mini_tuned.sh runs it (a script path, another working directory), best lr found, an edge flagged, seeds
averaged, the optimizer-state bytes the estimator's, and the compute the runs took."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from galore_train.memory.estimate import estimate_memory
from galore_train.model import load_model_config

ROOT = Path(__file__).resolve().parents[1]


def fake_run(runs: Path, optimizer: str, method: str, lr: float, seed: int, perplexity: float) -> str:
    """A finished llama_9m run folder as `galore-train pretrain` leaves it (config, summary, metrics)."""
    run = runs / f"llama_9m-{method}-lr{lr:g}-s{seed}"
    run.mkdir(parents=True)
    config = {"model": "llama_9m", "optimizer": optimizer, "rank": 64, "lr": lr, "seed": seed, "dtype": "fp32"}
    (run / "train_config.json").write_text(json.dumps({**config, "num_training_steps": 200}))
    (run / "summary.json").write_text(json.dumps({"steps": 200, "dtype": "float32", "val_perplexity": perplexity}))
    (run / "metrics.jsonl").write_text(
        json.dumps({"step": 200, "loss": 7.0, "tokens_seen": 204800, "tokens_per_second": 512.0}) + "\n"
    )
    return str(run)


def test_table_and_plot_from_run_folders(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    sweep = [
        fake_run(runs, "adamw", "full", lr, 0, ppl) for lr, ppl in ((0.001, 1250.0), (0.003, 1180.0), (0.01, 1480.0))
    ] + [fake_run(runs, "swan", "swan", lr, 0, ppl) for lr, ppl in ((0.001, 1100.0), (0.003, 1000.0), (0.01, 900.0))]
    final = [sweep[1], fake_run(runs, "adamw", "full", 0.003, 1, 1240.0), sweep[5]]
    output, plot = tmp_path / "table.md", tmp_path / "plots" / "ppl_vs_state.png"
    output.write_text("# report\n")
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the script finds its checkout itself
    subprocess.run(
        [sys.executable, str(ROOT / "scripts/tuned_summary.py"), str(output), str(plot), *sweep, "--", *final],
        cwd=tmp_path,
        env=environment,
        check=True,
    )
    rows = {line.split(" | ")[1]: line for line in output.read_text().splitlines() if line.startswith("| llama_9m")}
    adamw_state = estimate_memory(load_model_config("llama_9m"), "adamw", 64, dtype="fp32")
    assert rows["full"] == (
        "| llama_9m | full | 0.001: 1250.0 / 0.003: 1180.0 / 0.01: 1480.0 | 0.003 | yes | 1180.0 (s0), "
        f"1240.0 (s1) | 1210.0 | {adamw_state.optimizer_states + adamw_state.projections} |"
    )
    assert " | 0.01 | NO (edge) | 900.0 (s0) | 900.0 | " in rows["swan"]  # best at the grid's top: said, not hidden
    assert "Compute (training steps, one thread per run): llama_9m 7 runs, 0.8 h." in output.read_text()  # 7 x 400 s
    assert plot.stat().st_size > 0
