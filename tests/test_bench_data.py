"""scripts/bench_data.py, behind docs/data.md's tokens/s, still runs: once, at a tiny size, printing a row per data
path. Its timings are not checked (CPU timing is noise here)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TOKENIZER, TRAIN_FILES

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_data_prints_a_row_per_path(shared_data: Path) -> None:
    tiny = ["--batches", "2", "--prepared-batches", "2", "--rounds", "1", "--batch-size", "2", "--max-length", "32"]
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_data.py"), "--data-files", TRAIN_FILES, "--tokenizer", TOKENIZER]
        + [*tiny, "--shuffle-buffer", "4", "--prepare-procs", "1"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=900,
    )
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0] for line in result.stdout.splitlines()[2:] if line.strip()}
    assert {"bare", "bare_cut", "padded", "packed", "prepare_1"} <= rows, result.stdout
