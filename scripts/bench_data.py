"""Tokens per second of each training-data path alone, next to a bare fast-tokenizer encode of the same documents.

Paths (single-threaded, no prefetch: what a producer thread can deliver):
  bare      the Rust tokenizer's `encode_batch` of whole documents (all documents in --data-files)
  bare_cut  the same on the cut texts the padded stream tokenizes, counting the kept tokens: the most the padded
            stream could make here
  padded    galore-train's paper-mode stream: shuffle, cut + tokenize, pad (positions/s and real tokens/s)
  packed    galore-train's --pack stream: shuffle, tokenize whole documents, concatenate
  prepared_ the same two streams reading --prepared DIR (tokens made by `galore-train prepare-data`), if given
  prepare_N `galore-train prepare-data --num-proc N` of --data-files into a temporary directory (reading and
            writing included; tokens written per second), for each N of --prepare-procs
Ratios are path / bare. "cpu" is tokens per second of this process's CPU time (its threads, and the worker
processes of prepare_N): on a shared machine it moves less with the load than wall time does. With
--baseline-src DIR the measurements (not prepare_N) also run in a subprocess against the galore_train package
under DIR (e.g. `git archive 9b0580b galore_train | tar -x -C DIR`), alternating rounds with this tree's, and
"speedup" is this tree's tokens/s over that tree's. Each number is the best of --rounds (the machine may be
shared). Times include epoch restarts of the small shared shards.

    python scripts/bench_data.py [--batch-size 64] [--max-length 256] [--batches 40] [--rounds 3] [--baseline-src DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("GALORE_TRAIN_SHARED_DATA", ROOT.parent / "shared" / "data"))


def timed(work: Callable[..., int], *arguments: Any) -> tuple[float, float]:
    """tokens/s of `work(*arguments)` (which returns its token count) per wall second and per CPU second (this process's
    threads and its finished child processes)."""
    usage = resource.RUSAGE_CHILDREN

    def cpu() -> float:
        return time.process_time() + resource.getrusage(usage).ru_utime + resource.getrusage(usage).ru_stime

    wall, start = time.perf_counter(), cpu()
    tokens = work(*arguments)
    return tokens / (time.perf_counter() - wall), tokens / max(cpu() - start, 1e-9)


def measure(args: argparse.Namespace) -> dict[str, float]:
    """tokens/s (and padded positions/s) of each path, with whichever galore_train is importable; "cpu_" keys
    per CPU second."""
    from galore_train.data import (
        PretrainingStream,
        Tokenize,
        document_source,
        expand_data_files,
        load_tokenizer,
        read_c4_lines,
    )

    tokenizer = load_tokenizer(args.tokenizer)
    backend = tokenizer.backend_tokenizer
    texts = [record["text"] for record in read_c4_lines(expand_data_files(args.data_files, "--data-files"))]
    tokenize = Tokenize(tokenizer, args.max_length, 32000)
    budget = getattr(tokenize, "cut_chars", None) or max(map(len, texts))  # the baseline tree does not cut
    cut = [text[:budget] for text in texts]

    def bare(texts: list[str], keep: int | None) -> int:
        tokens = 0
        for i in range(0, len(texts), args.batch_size):
            encodings = backend.encode_batch(texts[i : i + args.batch_size])
            tokens += sum(min(len(e.ids), keep or len(e.ids)) for e in encodings)
        return tokens

    results = {}
    results["bare"], results["cpu_bare"] = timed(bare, texts, None)
    results["bare_cut"], results["cpu_bare_cut"] = timed(bare, cut, args.max_length)
    sources = {"": (lambda: document_source(args.data_files, "--data-files", "", "", "train"), args.batches)}
    if args.prepared:
        sources["prepared_"] = (
            lambda: document_source(args.prepared, "--data-files", "", "", "train", tokenize),
            args.prepared_batches,
        )
    for prefix, (source, batches) in sources.items():
        for pack in (False, True):
            stream = PretrainingStream(
                source, tokenize, batch_size=args.batch_size, pack=pack, shuffle_buffer=args.shuffle_buffer, seed=0
            )
            stream.next_batch()  # fills the shuffle buffer
            name = prefix + ("packed" if pack else "padded")
            start = time.perf_counter()
            results[name], results["cpu_" + name] = timed(consume, stream, batches)
            if not pack:
                elapsed = time.perf_counter() - start
                results[prefix + "padded_positions"] = batches * args.batch_size * args.max_length / elapsed
    for procs in args.prepare_procs:  # in a fresh process: its workers fork from one that has not tokenized yet
        command = [sys.executable, __file__, "--time-prepare", str(procs)]
        command += ["--data-files", args.data_files, "--tokenizer", args.tokenizer]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        results.update(json.loads(output.strip().splitlines()[-1]))
    return results


def consume(stream: Any, batches: int) -> int:
    """Real (non-padding) tokens of the stream's next `batches` batches."""
    return sum(int(stream.next_batch()["attention_mask"].sum()) for _ in range(batches))


def prepare(args: argparse.Namespace, procs: int) -> int:
    """`prepare-data --num-proc procs` into a temporary directory; the tokens written. (The Rust tokenizer stops
    using threads in processes forked after it did, so this runs in a process that has not tokenized.)"""
    from galore_train.data.prepared import prepare_data

    with tempfile.TemporaryDirectory() as output:
        manifest, _ = prepare_data(args.data_files, args.tokenizer, Path(output), num_proc=procs)
        return manifest["tokens"]


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
        "--prepare-procs",
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
    parser.add_argument("--prepared-batches", type=int, default=2000, help="timed batches per prepared stream")
    parser.add_argument("--shuffle-buffer", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3, help="each number is the best of this many rounds")
    parser.add_argument("--prepared", help="also time a directory made by `galore-train prepare-data` of --data-files")
    parser.add_argument(
        "--prepare-procs", type=int, nargs="*", default=[1, 2], help="time prepare-data with these --num-proc"
    )
    parser.add_argument("--baseline-src", help="a directory holding another galore_train package to compare with")
    parser.add_argument("--json", action="store_true", help="print the measurements as JSON only")
    parser.add_argument("--time-prepare", type=int, help=argparse.SUPPRESS)  # one prepare_N measurement, as JSON
    args = parser.parse_args()

    if args.time_prepare:
        import galore_train.data.prepared  # noqa: F401 (imported before the clock starts, as for the other paths)

        wall, cpu = timed(prepare, args, args.time_prepare)
        print(json.dumps({f"prepare_{args.time_prepare}": wall, f"cpu_prepare_{args.time_prepare}": cpu}))
        return
    if args.json:
        print(json.dumps(measure(args)))
        return
    load = os.getloadavg()
    rounds, baseline_rounds = [], []
    for _ in range(args.rounds):
        if args.baseline_src:
            baseline_rounds.append(measure_elsewhere(args))
        rounds.append(measure(args))
    results = best(rounds)
    baseline = best(baseline_rounds) if baseline_rounds else None
    print(
        f"{args.batch_size} x {args.max_length} tokens per batch, {args.batches} timed batches "
        f"({args.prepared_batches} prepared), best of {args.rounds} rounds, {os.cpu_count()} CPUs, load average "
        f"{' '.join(f'{x:.1f}' for x in load)} at the start, {' '.join(f'{x:.1f}' for x in os.getloadavg())} at the end"
    )
    header = f"{'path':<27}{'tokens/s':>12}{'/ bare':>9}{'cpu':>12}{'/ bare':>9}"
    print(header + (f"{'baseline':>12}{'/ bare':>9}{'speedup':>9}" if baseline else ""))
    for name, value in results.items():
        if name.startswith("cpu_"):
            continue
        row = f"{name:<27}{value:>12,.0f}{value / results['bare']:>9.2f}"
        cpu = results.get("cpu_" + name)
        row += f"{cpu:>12,.0f}{cpu / results['cpu_bare']:>9.2f}" if cpu else " " * 21
        if baseline and name in baseline:
            row += f"{baseline[name]:>12,.0f}{baseline[name] / baseline['bare']:>9.2f}{value / baseline[name]:>9.2f}"
        print(row)


if __name__ == "__main__":
    main()
