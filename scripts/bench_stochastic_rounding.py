"""What --stochastic-rounding changes, shown where a CPU can show it: a linear regression trained with fp32 compute on
weights that are rounded to bf16 values after every step (to nearest, or stochastically with
galore_train.weights.bf16), beside the same run with fp32 weights. Labelled as such: this is not a bf16 run of
the trainer (bf16 matmuls are ~50x slower than fp32 on this CPU); the rounding of the weights is the same.

The weights sit near 1 (bf16 spacing 2^-7 there) and the learning rate is small, so most updates are below half
the spacing: rounded to nearest they vanish and the loss stalls; rounded stochastically they survive in
expectation and the loss follows the fp32 run.

    python scripts/bench_stochastic_rounding.py [--steps 3000] [--lr 0.02]
"""

from __future__ import annotations

import argparse

import torch

from galore_train.weights.bf16 import stochastic_round_to_bf16_


def train(rounding: str, steps: int, lr: float, seed: int = 0) -> list[float]:
    """Full-batch gradient descent on y = X w* + noise; the loss every steps // 6 steps."""
    data = torch.Generator().manual_seed(seed)
    features, dim = 2048, 256
    x = torch.randn(features, dim, generator=data)
    target = 1.0 + 0.05 * torch.randn(dim, generator=data)
    y = x @ target + 0.01 * torch.randn(features, generator=data)
    weight = torch.ones(dim)
    generator = torch.Generator().manual_seed(seed + 1)
    losses = []
    for step in range(steps + 1):
        residual = x @ weight - y
        if step % (steps // 6) == 0:
            losses.append(float(residual.square().mean()))
        weight = weight - lr * (2 / features) * (x.T @ residual)  # the optimizer's fp32 new value
        if rounding == "nearest":
            weight = weight.to(torch.bfloat16).float()
        elif rounding == "stochastic":
            weight = stochastic_round_to_bf16_(weight, torch.empty(dim, dtype=torch.bfloat16), generator).float()
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--lr", type=float, default=0.02)
    args = parser.parse_args()
    runs = {rounding: train(rounding, args.steps, args.lr) for rounding in ("fp32", "nearest", "stochastic")}
    print("fp32 compute; weights kept fp32, or rounded to bf16 values after each step (nearest / stochastic)")
    print(f"{'step':>6} {'fp32 weights':>14} {'bf16 nearest':>14} {'bf16 stochastic':>16}")
    for i, (a, b, c) in enumerate(zip(*runs.values())):
        print(f"{i * (args.steps // 6):>6} {a:>14.6f} {b:>14.6f} {c:>16.6f}")
    final = {name: losses[-1] for name, losses in runs.items()}
    print(
        f"final loss / fp32's: nearest {final['nearest'] / final['fp32']:.2f}x,"
        f" stochastic {final['stochastic'] / final['fp32']:.2f}x"
    )


if __name__ == "__main__":
    main()
