"""Measured peak memory of real CPU training steps next to the estimator's figures.

For llama_20m and llama_60m (fp32, batch 8 x 256 random tokens) and adamw, galore_adamw, adam8bit,
galore_adamw8bit, each with and without --layerwise: build the model and the registry's optimizer, run
two tracked optimizer steps (the first creates the optimizer state and GaLore's projections, the
second runs with them in place) and print the MemoryMeter's peaks next to `estimate_memory`, as a
markdown table in MiB. Measured "state" includes the projection matrices (they live in the optimizer
state), so it is compared with estimated states + projections. Then the meter's own cost: the best
of three tracked steps against the best of three untracked ones.

    python scripts/bench_memory.py            # ~9 minutes of CPU time on 2 cores
    python scripts/bench_memory.py --models llama_9m --optimizers adamw --batch-size 2 --max-length 32  # seconds

Any --models work: the rank is a quarter of the hidden size, as in the paper's 60M run (llama_20m: 64,
llama_60m: 128).
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch

from galore_train.config import TrainConfig
from galore_train.memory.estimate import estimate_memory
from galore_train.memory.meter import GIB, MemoryMeter
from galore_train.model import build_model, load_model_config
from galore_train.optim.layerwise import LayerwiseUpdater
from galore_train.optimizers import build_optimizer

MODELS = ("llama_20m", "llama_60m")
OPTIMIZERS = ("adamw", "galore_adamw", "adam8bit", "galore_adamw8bit")
BATCH, LENGTH = 8, 256
MIB = 2**20


def rank_of(model_name: str) -> int:
    return load_model_config(model_name).hidden_size // 4


def training_step(
    model_name: str, optimizer_name: str, layerwise: bool, batch: int, length: int
) -> tuple[MemoryMeter, Callable[[], float]]:
    """A meter and a function running one timed optimizer step on random tokens."""
    config = load_model_config(model_name)
    model = build_model(config, seed=0).train()
    cfg = TrainConfig(optimizer=optimizer_name, rank=rank_of(model_name), gap=200, num_training_steps=2)
    optimizer = build_optimizer(model, cfg)
    updater = LayerwiseUpdater(model, optimizer) if layerwise else None
    generator = torch.Generator().manual_seed(0)

    def step() -> float:
        ids = torch.randint(0, config.vocab_size, (batch, length), generator=generator)
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        if updater is None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    return MemoryMeter(model, optimizer, "cpu"), step


def memory_row(model_name: str, optimizer_name: str, layerwise: bool, batch: int, length: int) -> str:
    meter, step = training_step(model_name, optimizer_name, layerwise, batch, length)
    for _ in range(2):
        with meter.track():
            step()
    measured = {key: value * GIB / MIB for key, value in meter.read_and_reset().items()}
    est = estimate_memory(
        load_model_config(model_name),
        optimizer_name,
        rank_of(model_name),
        layerwise=layerwise,
        dtype="fp32",
        batch_size=batch,
        max_length=length,
    )
    pairs = [
        (measured["peak_memory_gb"], est.peak),
        (measured["peak_weights_gb"], est.weights),
        (measured["peak_grads_gb"], est.gradients),
        (measured["peak_optimizer_state_gb"], est.optimizer_states + est.projections),
        (measured["peak_other_gb"], est.activations),
    ]
    cells = [model_name, optimizer_name, "yes" if layerwise else "no"]
    cells += [f"{m:.1f} / {e / MIB:.1f}" for m, e in pairs]
    return "| " + " | ".join(cells) + " |"


def tracking_overhead(model_name: str, batch: int, length: int, repeats: int = 3) -> tuple[float, float]:
    """Best-of-`repeats` seconds of a tracked and an untracked adamw step (alternating)."""
    meter, step = training_step(model_name, "adamw", False, batch, length)
    step()  # create the optimizer state first
    tracked, untracked = [], []
    for _ in range(repeats):
        with meter.track():
            tracked.append(step())
        untracked.append(step())
    return min(tracked), min(untracked)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS))
    parser.add_argument("--batch-size", type=int, default=BATCH)
    parser.add_argument("--max-length", type=int, default=LENGTH)
    args = parser.parse_args()
    batch, length = args.batch_size, args.max_length
    print(f"Peak memory of two CPU training steps, fp32, batch {batch}x{length}, MiB, measured / estimated\n")
    print("| model | optimizer | layer-wise | peak | weights | grads | state + projections | other / activations |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for model_name in args.models:
        for optimizer_name in args.optimizers:
            for layerwise in (False, True):
                print(memory_row(model_name, optimizer_name, layerwise, batch, length), flush=True)
    tracked, untracked = tracking_overhead(args.models[0], batch, length)
    print(
        f"\nTracking cost ({args.models[0]}, adamw, best of 3): {tracked:.2f} s tracked vs {untracked:.2f} s "
        f"untracked per step ({tracked / untracked - 1:+.0%})"
    )


if __name__ == "__main__":
    main()
