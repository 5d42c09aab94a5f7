"""Host memory and CPU time of building a random-init LLaMA, the old way against the new (docs/distributed.md).

- host: transformers' own build on the host (`torch.manual_seed`, `LlamaForCausalLM._from_config`: storage and
  serial `_init_weights` in this process), what galore-train did before galore_train/initial_weights.py;
- meta -> cpu: `build_model(..., device="cpu")`, built on the meta device and filled in place where it trains,
  here the CPU (so the host holds the weights, as it must when it is the target);
- meta -> meta: the same, with the meta device standing in for a GPU target: every step runs except the writes
  to device memory, so what it adds to the host is what a GPU build adds to the host (a CPU-only machine cannot
  measure a real GPU build; nothing here does). The meta device has no random generator: each parameter's
  generator is a CPU one there (a few hundred bytes each, freed at once).

Each build runs in a fresh subprocess, which reports the growth of its peak resident set (ru_maxrss, after the
imports and the config) and the CPU time the build took; the table prints both beside the weights' own size,
and the CPU-time ratio host / meta -> cpu. CPU time, not wall time: the machine's cores are shared.

    PYTHONPATH=. python scripts/bench_model_init.py --models llama_60m llama_130m
    PYTHONPATH=. python scripts/bench_model_init.py --models llama_7b --dtype bfloat16 --variants "meta -> meta"
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("host", "meta -> cpu", "meta -> meta")
MiB = 2**20


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def measure(model_name: str, variant: str, dtype_name: str) -> dict[str, float]:
    """One build in this process: peak-RSS growth and CPU seconds."""
    import torch
    from transformers import LlamaForCausalLM

    from galore_train.model import build_model, load_model_config

    dtype = getattr(torch, dtype_name)
    config = load_model_config(model_name)
    config._attn_implementation = "sdpa"
    before = _peak_rss_bytes()
    start = time.process_time()
    if variant == "host":
        torch.manual_seed(0)
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    else:
        if variant.endswith("meta"):
            cpu_generator = torch.Generator
            torch.Generator = lambda device: cpu_generator()  # meta has none (see the docstring); this process only
        model = build_model(config, seed=0, dtype=dtype, device=variant.split(" -> ")[1])
    seconds = time.process_time() - start
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"rss_growth": _peak_rss_bytes() - before, "cpu_s": seconds, "weights": weights}


def run_child(model_name: str, variant: str, dtype_name: str) -> dict[str, float]:
    command = [sys.executable, __file__, "--child", model_name, variant, dtype_name]
    result = subprocess.run(command, capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1])
    return json.loads(result.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["llama_60m", "llama_130m"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS, help="(7B: meta -> meta)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child)))
        return
    print(f"Building a random-init LLaMA ({args.dtype}), one fresh process per build\n")
    print("| model | build | weights MiB | host peak-RSS growth MiB | build CPU s |")
    print("|---|---|---:|---:|---:|")
    for model_name in args.models:
        results = {variant: run_child(model_name, variant, args.dtype) for variant in args.variants}
        for variant, r in results.items():
            print(
                f"| {model_name} | {variant} | {r['weights'] / MiB:.0f} | {r['rss_growth'] / MiB:.0f} "
                f"| {r['cpu_s']:.2f} |"
            )
        if {"host", "meta -> cpu"} <= results.keys():
            ratio = results["host"]["cpu_s"] / results["meta -> cpu"]["cpu_s"]
            print(f"| {model_name} | CPU time host / meta -> cpu | | | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
