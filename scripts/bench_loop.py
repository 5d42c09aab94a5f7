"""Overhead of galore-train's training step versus a bare PyTorch loop, measured side by side.

Both train the same HF LlamaForCausalLM (same init, fp32, CPU) with torch AdamW on the same batches of
real C4 (../shared/data). galore-train's step includes everything it does per step in a real run: the
data stream (tokenization), token-weighted loss, LR schedule, memory meter and bookkeeping. The bare
loop gets its batches pre-tokenized. Rounds alternate between the two to share any machine noise.

    python scripts/bench_loop.py [--model llama_9m] [--steps 10] [--rounds 3] [--compile]

With --compile a third row times galore-train's step with `--compile` (torch.compile of the model),
after a warm-up step that pays the compilation.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("GALORE_TRAIN_SHARED_DATA", ROOT.parent / "shared" / "data"))

from galore_train.config import TrainConfig  # noqa: E402
from galore_train.train import Trainer  # noqa: E402


def galore_train_trainer(args, output_dir: str, compile: bool = False) -> Trainer:
    cfg = TrainConfig(
        model=args.model,
        tokenizer=str(DATA / "t5-tokenizer"),
        data_files=str(DATA / "c4/train/*.json.gz"),
        eval_data_files=str(DATA / "c4/eval/*.json.gz"),
        eval_tokens=256,
        batch_size=args.batch_size,
        max_length=args.max_length,
        num_training_steps=10**6,
        dtype="fp32",
        lr=1e-3,
        pack=True,
        output_dir=output_dir,
        wandb_mode="disabled",
        seed=0,
        compile=compile,
    )
    return Trainer(cfg)


def time_steps(step, count: int) -> float:
    start = time.perf_counter()
    for _ in range(count):
        step()
    return (time.perf_counter() - start) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama_9m")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time galore-train with --compile")
    args = parser.parse_args()
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        trainer = galore_train_trainer(args, tmp)
        # --pack fills every position, so both loops see exactly batch x length tokens per step.
        batches = [trainer.train_stream.next_batch() for _ in range(args.steps)]
        bare_model = galore_train_trainer(args, tmp + "/bare").model  # same seed, same init
        bare_optimizer = torch.optim.AdamW(bare_model.parameters(), lr=1e-3, weight_decay=0.0)
        cursor = iter(range(10**9))

        def bare_step() -> None:
            batch = batches[next(cursor) % len(batches)]
            loss = bare_model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
            ).loss
            loss.backward()
            bare_optimizer.step()
            bare_optimizer.zero_grad(set_to_none=True)

        def galore_train_step(run: Trainer):
            def step() -> None:
                with run.memory.track():
                    run._train_step()
                run.memory.read_and_reset()

            return step

        loops = {"bare PyTorch": bare_step, "galore-train": galore_train_step(trainer)}
        if args.compile:
            loops["--compile"] = galore_train_step(galore_train_trainer(args, tmp + "/compiled", compile=True))
        for step in loops.values():
            step()  # warm-up: allocator, optimizer state, compilation
        times: dict[str, list[float]] = {name: [] for name in loops}
        for _ in range(args.rounds):
            for name, step in loops.items():
                times[name].append(time_steps(step, args.steps))

    tokens = args.batch_size * args.max_length
    median = {name: statistics.median(values) for name, values in times.items()}
    print(
        f"{args.model}, batch {args.batch_size} x {args.max_length} tokens, fp32, {torch.get_num_threads()} threads, "
        f"{args.rounds} rounds x {args.steps} steps (median)"
    )
    print(f"{'loop':<14}{'s/step':>10}{'tokens/s':>12}")
    for name, seconds in median.items():
        print(f"{name:<14}{seconds:>10.3f}{tokens / seconds:>12,.0f}")
    print(
        f"overhead of galore-train's step: {100 * (median['galore-train'] / median['bare PyTorch'] - 1):+.1f}%"
        " (target <= 5%)"
    )
    if args.compile:
        print(f"--compile speed-up over eager galore-train: {median['galore-train'] / median['--compile']:.2f}x")


if __name__ == "__main__":
    main()
