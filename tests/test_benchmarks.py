"""The scripts behind the measured numbers in the docs (bench_loop.py, bench_memory.py, bench_svd.py,
bench_checkpoint.py, bench_model_init.py) still run: each once, at a tiny size, exiting 0 and printing its table.
Their timings are not checked (CPU timing is noise)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def bench(script: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.slow
def test_bench_loop_prints_its_table() -> None:
    out = bench("bench_loop.py", "--steps", "1", "--rounds", "1", "--batch-size", "2", "--max-length", "32")
    assert "loop" in out and "s/step" in out and "tokens/s" in out
    assert any(line.startswith("bare PyTorch ") for line in out.splitlines())
    assert any(line.startswith("galore-train ") for line in out.splitlines())
    assert "overhead of galore-train's step:" in out


@pytest.mark.slow
def test_bench_memory_prints_its_table() -> None:
    out = bench(
        "bench_memory.py",
        "--models",
        "llama_9m",
        "--optimizers",
        "galore_adamw",
        "--batch-size",
        "2",
        "--max-length",
        "32",
    )
    rows = [line for line in out.splitlines() if line.startswith("| llama_9m | galore_adamw |")]
    assert [row.split(" | ")[2] for row in rows] == ["no", "yes"]  # without and with --layerwise
    assert all(row.count(" / ") == 5 for row in rows)  # measured / estimated for every part
    assert "Tracking cost (llama_9m, adamw" in out


@pytest.mark.slow
def test_bench_svd_prints_its_table() -> None:
    out = bench("bench_svd.py", "--rank", "16", "--shapes", "64x64", "64x160", "160x64")
    rows = [line for line in out.splitlines() if line[:1].isdigit()]
    assert [row.split()[:3] for row in rows] == [
        ["64", "x", "64"],
        ["64", "x", "64"],
        ["64", "x", "160"],
        ["160", "x", "64"],
    ]
    for row in rows:  # columns from the end: similarity, rand/exact, rand energy, exact energy
        exact, randomized = float(row.split()[-4]), float(row.split()[-3])
        assert 0 < randomized <= exact + 1e-5 <= 1 + 1e-5, row


def test_bench_checkpoint_prints_its_table() -> None:
    out = bench("bench_checkpoint.py", "--megabytes", "8", "--rounds", "1")
    assert "CRC-32 (zlib, page cache):" in out and "checksum pass / torch.save" in out
    rows = [line.split() for line in out.splitlines() if line.startswith(("llama_1b", "llama_7b"))]
    assert [row[0] for row in rows] == ["llama_1b", "llama_1b", "llama_7b", "llama_7b"]
    assert all(float(row[-2]) > 0 and float(row[-1]) > 0 for row in rows)  # GB, CPU seconds


@pytest.mark.slow
def test_bench_model_init_prints_its_table() -> None:
    out = bench("bench_model_init.py", "--models", "llama_9m")
    rows = {row.split(" | ")[1]: row.split(" | ") for row in out.splitlines() if row.startswith("| llama_9m |")}
    assert list(rows) == ["host", "meta -> cpu", "meta -> meta", "CPU time host / meta -> cpu"]
    host_growth, gpu_target_growth = float(rows["host"][3]), float(rows["meta -> meta"][3])
    assert gpu_target_growth < host_growth  # weights off the host: the host holds less than the model
