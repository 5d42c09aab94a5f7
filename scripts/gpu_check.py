"""The steps of scripts/gpu_check.sh: the CUDA test tier, then measurements, each guarded (a failing step is
recorded with its error and the next one runs), written as results/gpu_<card>.json and .md.

GPU_CHECK_DRY_RUN=1 runs every step on the CPU with the tests' tiny LLaMA and a few steps (gloo instead of NCCL),
so CI proves the script itself (tests/test_gpu_check.py); RESULTS_DIR chooses where the files go.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import typer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tiny LLaMA of the test suite, for the dry run
from conftest import EVAL_FILES, TINY_LLAMA, TOKENIZER, TRAIN_FILES  # noqa: E402

from galore_train.cli import app  # noqa: E402
from galore_train.memory.estimate import estimate_memory  # noqa: E402
from galore_train.memory.meter import GIB  # noqa: E402
from galore_train.model import build_model, load_model_config, target_linear_modules  # noqa: E402

DRY_RUN = os.environ.get("GPU_CHECK_DRY_RUN") == "1"
RESULTS = Path(os.environ.get("RESULTS_DIR", ROOT / "results"))
WORK = Path(os.environ.get("GPU_CHECK_WORK", "/tmp/gpu_check"))
# Real sizes on a GPU; the dry run: the tiny LLaMA everywhere, a few steps.
STEPS = 3 if DRY_RUN else 30  # throughput: the median of the windows after the first WARMUP
WARMUP = 1 if DRY_RUN else 5
BATCH = 2 if DRY_RUN else 32  # sequences of LENGTH tokens per step, the same for every loop compared
LENGTH = 64 if DRY_RUN else 256
RANKS = {"llama_60m": 128, "llama_130m": 256, "llama_7b": 1024, "tiny": 8}


def run(command: list[str], timeout: float, **env: str) -> subprocess.CompletedProcess:
    """A subprocess; a non-zero exit raises with the last line it printed."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    environment.pop("GALORE_TRAIN_DEVICE", None)  # the GPU, as a user's runs pick it
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=environment)
    if result.returncode != 0:
        last = (result.stderr.strip() or result.stdout.strip() or "no output").splitlines()[-1]
        raise RuntimeError(f"exit {result.returncode}: {last}")
    return result


def model_names() -> dict[str, str]:
    """Model label -> --model value: the tiny LLaMA as a config file in the dry run."""
    if not DRY_RUN:
        return {"llama_60m": "llama_60m", "llama_130m": "llama_130m"}
    path = WORK / "tiny_llama.json"
    path.write_text(json.dumps(TINY_LLAMA))
    return {"tiny": str(path)}


def pretrain(model: str, output: Path, *flags: str, steps: int = STEPS, launcher: list[str] | None = None) -> list:
    """`galore-train pretrain` on the real C4 shards; the metrics records it wrote."""
    data = ["--data-files", TRAIN_FILES, "--eval-data-files", EVAL_FILES, "--tokenizer", TOKENIZER]
    common = ["--model", model, "--max-length", str(LENGTH), "--num-training-steps", str(steps), "--log-every", "1"]
    common += ["--eval-every", "100000", "--eval-tokens", "2000", "--save-every", "100000", "--lr", "1e-3"]
    common += ["--dtype", "fp32" if DRY_RUN else "bf16", "--output-dir", str(output), "--wandb-mode", "disabled"]
    arguments = ["pretrain", *data, *common, *flags]
    if DRY_RUN and launcher is None:  # in this process: the CI budget has no room for an interpreter per run
        typer.main.get_command(app).main(arguments, standalone_mode=False)
    else:  # on a GPU each run in its own process: its own allocator, so its peaks are its own
        run([*(launcher or [sys.executable]), "-m", "galore_train", *arguments], timeout=600)
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def loop_numbers(records: list[dict[str, Any]]) -> dict[str, float]:
    steps = [r for r in records if "loss" in r]
    speeds = [r["tokens_per_second"] for r in steps[WARMUP:]] or [steps[-1]["tokens_per_second"]]
    peak = lambda key: max((r[key] for r in steps if key in r), default=None)  # noqa: E731
    return {
        "tokens_per_second": round(statistics.median(speeds)),
        "peak_allocated_gib": peak("peak_memory_gb"),
        "peak_reserved_gib": peak("peak_reserved_gb"),
        "final_loss": steps[-1]["loss"],
    }


# --- the steps -----------------------------------------------------------------------------------------


def cuda_tier() -> dict[str, Any]:
    result = run([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rs", "tests/test_cuda.py"], timeout=300)
    summary = result.stdout.strip().splitlines()[-1]
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|error)", summary)}
    return {"summary": summary.strip("= "), **counts}


def throughput(label: str, model: str) -> dict[str, Any]:
    """Our loop with AdamW and GaLore, and a bare galore-torch loop, on the same model, batch and length."""
    rank = RANKS[label]
    flags = ["--batch-size", str(BATCH), "--total-batch-size", str(BATCH)]
    folder = WORK / f"throughput-{label}"
    numbers = {"adamw": loop_numbers(pretrain(model, folder / "adamw", *flags))}
    galore = [*flags, "--optimizer", "galore_adamw", "--rank", str(rank), "--gap", "200", "--scale", "0.25"]
    numbers["galore_adamw"] = loop_numbers(pretrain(model, folder / "galore", *galore))
    numbers["galore_torch_bare_loop"] = bare_galore_torch(model, rank)
    return numbers


def bare_galore_torch(model_name: str, rank: int) -> dict[str, Any]:
    """galore-torch's GaLoreAdamW in a bare loop (random tokens, no data stream, no logging): its own speed."""
    from galore_torch import GaLoreAdamW

    device = torch.device("cpu" if DRY_RUN else "cuda")
    dtype = torch.float32 if DRY_RUN else torch.bfloat16
    config = load_model_config(model_name)
    model = build_model(config, seed=0, dtype=dtype, device=device)  # the weights galore-train starts from there
    targets = {module.weight for module in target_linear_modules(model, ["attn", "mlp"]).values()}
    groups = [
        {"params": [p for p in model.parameters() if p not in targets]},
        {"params": list(targets), "rank": rank, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"},
    ]
    optimizer = GaLoreAdamW(groups, lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(STEPS):
        ids = torch.randint(0, config.vocab_size, (BATCH, LENGTH), generator=generator).to(device)
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    numbers = {"tokens_per_second": round(BATCH * LENGTH / statistics.median(times[WARMUP:] or times))}
    if device.type == "cuda":
        numbers["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / GIB
        numbers["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / GIB
    del model, optimizer
    return numbers


def layerwise_8bit(model: str) -> dict[str, Any]:
    """The paper's one-GPU 7B run (8-bit GaLore, layer-wise, activation checkpointing, micro-batch 1): two steps and
    a checkpoint, then a third step resumed from it; measured peaks against `galore-train memory`."""
    rank = "8" if DRY_RUN else "1024"
    flags = ["--optimizer", "galore_adamw", "--8bit", "--layerwise", "--rank", rank, "--gap", "200"]
    flags += ["--activation-checkpointing", "--batch-size", "1", "--total-batch-size", "1"]
    output = WORK / "layerwise-8bit"
    pretrain(model, output, *flags, steps=2)
    records = pretrain(model, output, *flags, "--resume", steps=3)
    steps = [r for r in records if "loss" in r]
    (restore,) = [r for r in records if "restore_peak_memory_gb" in r]
    estimate = estimate_memory(
        load_model_config(model), "galore_adamw", int(rank), eightbit=True, layerwise=True,
        activation_checkpointing=True, batch_size=1, max_length=LENGTH, dtype="fp32" if DRY_RUN else "bf16",
    )  # fmt: skip
    return {
        "steps": len(steps),
        "final_loss": steps[-1]["loss"],
        "peak_allocated_gib": max(r.get("peak_memory_gb", 0.0) for r in steps),
        "peak_reserved_gib": max((r["peak_reserved_gb"] for r in steps if "peak_reserved_gb" in r), default=None),
        "restore_peak_allocated_gib": restore["restore_peak_memory_gb"],
        "restore_peak_reserved_gib": restore.get("restore_peak_reserved_gb"),
        "estimated_peak_gib": estimate.peak / GIB,
    }


def process_group_smoke(model: str) -> dict[str, Any]:
    """`torchrun --nproc_per_node 1`: a one-process NCCL group (gloo in the dry run) under DDP, FSDP2 and FSDP2 with
    layer-wise updates, GaLore with right-side projections."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    galore = ["--optimizer", "galore_adamw", "--rank", str(RANKS["tiny" if DRY_RUN else "llama_60m"])]
    galore += ["--proj-type", "right", "--batch-size", "4"]
    modes = {
        "ddp": ["--distributed", "ddp", "--batch-size", "4"],
        "fsdp": ["--distributed", "fsdp", *galore],
        "fsdp_layerwise": ["--distributed", "fsdp", "--layerwise", *galore],
    }
    found = {}
    for mode, flags in modes.items():
        records = pretrain(model, WORK / f"smoke-{mode}", *flags, steps=3, launcher=launcher)
        loss = [r["loss"] for r in records if "loss" in r][-1]
        if not math.isfinite(loss):
            raise RuntimeError(f"{mode}: loss {loss}")
        found[mode] = {"final_loss": loss}
    return found


# --- the record ----------------------------------------------------------------------------------------


def guarded(name: str, step: Callable[[], dict[str, Any]], results: dict[str, Any]) -> None:
    start = time.perf_counter()
    try:
        outcome = {"status": "ok", **step()}
    except Exception as err:  # every step runs, whatever failed before it
        outcome = {"status": "failed", "error": f"{type(err).__name__}: {str(err).strip()[:500]}"}
    outcome["seconds"] = round(time.perf_counter() - start, 1)
    results["steps"][name] = outcome
    print(f"gpu_check: {name}: {outcome['status']} ({outcome['seconds']} s)", flush=True)


def card() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() and not DRY_RUN else "dry run on the CPU"


def markdown(results: dict[str, Any]) -> str:
    lines = [f"# GPU check: {results['card']}", "", f"torch {results['torch']}, {results['when']}; "
             "written by scripts/gpu_check.sh (the JSON beside this file holds every number).", ""]  # fmt: skip
    lines += ["| step | status | seconds | result |", "| --- | --- | --- | --- |"]
    for name, outcome in results["steps"].items():
        shown = {k: v for k, v in outcome.items() if k not in ("status", "seconds")}
        lines.append(f"| {name} | {outcome['status']} | {outcome['seconds']} | `{json.dumps(shown)}` |")
    return "\n".join(lines) + "\n"


def main() -> int:
    shutil.rmtree(WORK, ignore_errors=True)  # the runs start fresh (a leftover run folder would need --resume)
    WORK.mkdir(parents=True)
    results: dict[str, Any] = {"card": card(), "torch": torch.__version__, "when": time.strftime("%Y-%m-%d %H:%M")}
    results["dry_run"], results["steps"] = DRY_RUN, {}
    models = model_names()
    guarded("cuda_tier", cuda_tier, results)
    for label, model in models.items():
        guarded(f"throughput_{label}", lambda label=label, model=model: throughput(label, model), results)
    smoke_model = next(iter(models.values()))
    guarded("process_groups", lambda: process_group_smoke(smoke_model), results)
    big = smoke_model if DRY_RUN else "llama_7b"
    guarded("llama_7b_8bit_layerwise" if not DRY_RUN else "layerwise_8bit_tiny", lambda: layerwise_8bit(big), results)
    slug = re.sub(r"[^a-z0-9]+", "_", results["card"].lower()).strip("_")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"gpu_{slug}.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / f"gpu_{slug}.md").write_text(markdown(results))
    print(f"gpu_check: wrote {RESULTS / f'gpu_{slug}.md'}")
    return 0 if all(step["status"] == "ok" for step in results["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
