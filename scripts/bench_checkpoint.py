"""Benchmark checkpoint verification: CRC-32 throughput, its cost next to the save itself, and the time it
adds at LLaMA 1B and 7B sizes.

    python scripts/bench_checkpoint.py [--megabytes 512] [--rounds 3]

Why: every checkpoint gets a manifest (galore_train/manifest.py) whose CRC-32s are computed right after
the files are written (one extra read, from the page cache) and checked before a resume or eval (one
extra read of the newest checkpoint). At 7B sizes that is tens of GB per save: the cost must be known.

Measured side by side in one process, in CPU seconds (process time: other processes on a shared machine do
not count): torch.save of a float32 tensor of --megabytes, and manifest.file_crc32 of the file it wrote
(page cache: what the save pays), the median of --rounds. The checkpoint sizes of the 1B and 7B rows come
from galore_train.memory.estimate's estimator (weights + optimizer state + GaLore projections); their seconds are
size / measured throughput, i.e. the CPU cost of one pass. On a resume from a cold cache the read is
bounded by the disk too: a disk slower than the CRC rate makes the read, not the check, the limit.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from galore_train.manifest import file_crc32  # noqa: E402
from galore_train.memory.estimate import estimate_memory  # noqa: E402
from galore_train.model import load_model_config  # noqa: E402

# (model, --optimizer, --rank, extra estimate_memory options): the paper's 1B and 7B settings.
SIZES = [
    ("llama_1b", "adamw", 512, {}),
    ("llama_1b", "galore_adamw", 512, {}),
    ("llama_7b", "adamw", 1024, {}),
    ("llama_7b", "galore_adamw", 1024, {"eightbit": True}),
]


def cpu_seconds(action) -> float:
    start = time.process_time()
    action()
    return time.process_time() - start


def measure(megabytes: int, rounds: int) -> tuple[float, float]:
    """(CRC-32 MB/s, torch.save MB/s), CPU time, medians over `rounds`."""
    tensor = torch.randn(megabytes * 10**6 // 4)  # MB = 10^6 bytes throughout
    crc, save = [], []
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "state.pt"
        for _ in range(rounds):
            save.append(cpu_seconds(lambda: torch.save({"t": tensor}, path)))
            crc.append(cpu_seconds(lambda: file_crc32(path)))
    return megabytes / statistics.median(crc), megabytes / statistics.median(save)


def checkpoint_gb(model: str, optimizer: str, rank: int, options: dict) -> float:
    estimate = estimate_memory(load_model_config(model), optimizer, rank, dtype="bf16", **options)
    return (estimate.weights + estimate.optimizer_states + estimate.projections) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    crc_rate, save_rate = measure(args.megabytes, args.rounds)
    print(f"CRC-32 (zlib, page cache): {crc_rate:,.0f} MB/s of CPU time on one core")
    print(f"torch.save of the same bytes: {save_rate:,.0f} MB/s of CPU time")
    print(f"checksum pass / torch.save (CPU time, side by side): {save_rate / crc_rate:.2f}")
    print()
    print("one CRC pass over a checkpoint, paid once at save and once at resume (the newest intact one):")
    print(f"{'model':10} {'optimizer':24} {'checkpoint GB':>13} {'CRC pass, CPU s':>16}")
    for model, optimizer, rank, options in SIZES:
        label = f"{optimizer}{' --8bit' if options.get('eightbit') else ''} r{rank}"
        size = checkpoint_gb(model, optimizer, rank, options)
        print(f"{model:10} {label:24} {size:13.1f} {size * 1e3 / crc_rate:16.1f}")


if __name__ == "__main__":
    main()
