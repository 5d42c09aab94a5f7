"""Tokens per second of each training-data path alone, next to a bare fast-tokenizer encode of the same documents.

Paths (single-threaded, no prefetch: what a producer thread can deliver):
  bare      the Rust tokenizer's `encode_batch` of whole documents (all documents in --data-files)
  padded    galore-train's paper-mode stream: shuffle, cut + tokenize, pad (positions/s and real tokens/s)
  packed    galore-train's --pack stream: shuffle, tokenize whole documents, concatenate
  prepared_ the same two streams reading --prepared DIR (tokens made by `galore-train prepare-data`), if given
Ratios are stream / bare. With --baseline-src DIR the same measurements also run in a subprocess against the
galore_train package under DIR (e.g. `git archive 9b0580b galore_train | tar -x -C DIR`), alternating rounds
with this tree's, and "speedup" is this tree's tokens/s over that tree's. Each number is the best of --rounds
(the machine may be shared). Times include epoch restarts of the small shared shards.

    python scripts/bench_data.py [--batch-size 64] [--max-length 256] [--batches 40] [--rounds 3] [--baseline-src DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("GALORE_TRAIN_SHARED_DATA", ROOT.parent / "shared" / "data"))


def measure(args: argparse.Namespace) -> dict[str, float]:
    """tokens/s (and padded positions/s) of each path, with whichever galore_train is importable."""
    from galore_train.data import (
        PretrainingStream,
        Tokenize,
        document_source,
        expand_data_files,
        load_tokenizer,
        read_c4_lines,
    )

    tokenizer = load_tokenizer(args.tokenizer)
    texts = [record["text"] for record in read_c4_lines(expand_data_files(args.data_files, "--data-files"))]
    start = time.perf_counter()
    tokens = 0
    for i in range(0, len(texts), args.batch_size):
        tokens += sum(len(e.ids) for e in tokenizer.backend_tokenizer.encode_batch(texts[i : i + args.batch_size]))
    results = {"bare": tokens / (time.perf_counter() - start)}
    sources = {"": lambda: document_source(args.data_files, "--data-files", "", "", "train")}
    tokenize = Tokenize(tokenizer, args.max_length, 32000)
    if args.prepared:
        sources["prepared_"] = lambda: document_source(args.prepared, "--data-files", "", "", "train", tokenize)
    for prefix, source in sources.items():
        for pack in (False, True):
            stream = PretrainingStream(
                source, tokenize, batch_size=args.batch_size, pack=pack, shuffle_buffer=args.shuffle_buffer, seed=0
            )
            stream.next_batch()  # fills the shuffle buffer
            start = time.perf_counter()
            real = sum(int(stream.next_batch()["attention_mask"].sum()) for _ in range(args.batches))
            elapsed = time.perf_counter() - start
            results[prefix + ("packed" if pack else "padded")] = real / elapsed
            if not pack:
                results[prefix + "padded_positions"] = args.batches * args.batch_size * args.max_length / elapsed
    return results


def measure_elsewhere(args: argparse.Namespace) -> dict[str, float]:
    """One round of `measure` in a subprocess that imports galore_train from --baseline-src."""
    command = [
        sys.executable,
        __file__,
        "--json",
        "--data-files",
        args.data_files,
        "--tokenizer",
        args.tokenizer,
        "--batch-size",
        str(args.batch_size),
        "--max-length",
        str(args.max_length),
        "--batches",
        str(args.batches),
        "--shuffle-buffer",
        str(args.shuffle_buffer),
    ]
    env = {**os.environ, "PYTHONPATH": str(Path(args.baseline_src).resolve())}
    output = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def best(rounds: list[dict[str, float]]) -> dict[str, float]:
    return {name: max(r[name] for r in rounds) for name in rounds[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-files", default=str(DATA / "c4/train/*.json.gz"))
    parser.add_argument("--tokenizer", default=str(DATA / "t5-tokenizer"))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batches", type=int, default=40, help="timed batches per stream")
    parser.add_argument("--shuffle-buffer", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3, help="each number is the best of this many rounds")
    parser.add_argument("--prepared", help="also time a directory made by `galore-train prepare-data` of --data-files")
    parser.add_argument("--baseline-src", help="a directory holding another galore_train package to compare with")
    parser.add_argument("--json", action="store_true", help="print the measurements as JSON only")
    args = parser.parse_args()

    if args.json:
        print(json.dumps(measure(args)))
        return
    rounds, baseline_rounds = [], []
    for _ in range(args.rounds):
        if args.baseline_src:
            baseline_rounds.append(measure_elsewhere(args))
        rounds.append(measure(args))
    results = best(rounds)
    baseline = best(baseline_rounds) if baseline_rounds else None
    print(
        f"{args.batch_size} x {args.max_length} tokens per batch, {args.batches} timed batches, best of {args.rounds} "
        f"rounds, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
    )
    header = f"{'path':<27}{'tokens/s':>12}{'/ bare':>9}"
    print(header + (f"{'baseline':>12}{'/ bare':>9}{'speedup':>9}" if baseline else ""))
    for name, value in results.items():
        row = f"{name:<27}{value:>12,.0f}{value / results['bare']:>9.2f}"
        if baseline and name in baseline:
            row += f"{baseline[name]:>12,.0f}{baseline[name] / baseline['bare']:>9.2f}{value / baseline[name]:>9.2f}"
        print(row)


if __name__ == "__main__":
    main()
