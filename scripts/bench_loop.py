"""Overhead of galore-train's training step versus a bare PyTorch loop, measured side by side.

Both train the same HF LlamaForCausalLM (same init, fp32, CPU) with torch AdamW on the same batches of
real C4 (../shared/data). galore-train's step includes everything it does per step in a real run: the
data stream (tokenization), token-weighted loss, LR schedule, memory meter and bookkeeping. The bare
loop gets its batches pre-tokenized. Rounds alternate between the two to share any machine noise.

    python scripts/bench_loop.py [--model llama_9m] [--steps 10] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
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


def galore_train_trainer(args, output_dir: str) -> Trainer:
    cfg = TrainConfig(model=args.model, tokenizer=str(DATA / "t5-tokenizer"), data_files=str(DATA / "c4/train/*.json.gz"),
                      eval_data_files=str(DATA / "c4/eval/*.json.gz"), eval_tokens=256, batch_size=args.batch_size,
                      max_length=args.max_length, num_training_steps=10**6, dtype="fp32", lr=1e-3, pack=True,
                      output_dir=output_dir, wandb_mode="disabled", seed=0)
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
            loss = bare_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
            loss.backward()
            bare_optimizer.step()
            bare_optimizer.zero_grad(set_to_none=True)

        def ours_step() -> None:
            with trainer.memory.track():
                trainer._train_step()
            trainer.memory.read_and_reset()

        bare_step(), ours_step()  # warm-up: allocator, optimizer state
        bare_times, our_times = [], []
        for _ in range(args.rounds):
            bare_times.append(time_steps(bare_step, args.steps))
            our_times.append(time_steps(ours_step, args.steps))

    tokens = args.batch_size * args.max_length
    bare, ours = statistics.median(bare_times), statistics.median(our_times)
    print(f"{args.model}, batch {args.batch_size} x {args.max_length} tokens, fp32, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds x {args.steps} steps (median)")
    print(f"{'loop':<14}{'s/step':>10}{'tokens/s':>12}")
    print(f"{'bare PyTorch':<14}{bare:>10.3f}{tokens / bare:>12,.0f}")
    print(f"{'galore-train':<14}{ours:>10.3f}{tokens / ours:>12,.0f}")
    print(f"overhead: {100 * (ours / bare - 1):+.1f}% (target <= 5%)")
    sys.exit(0)


if __name__ == "__main__":
    main()
