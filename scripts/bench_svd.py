"""Benchmark GaLore's projection refresh at LLaMA 7B shapes: exact SVD vs `--svd randomized`, time and quality.

    python scripts/bench_svd.py [--rank 1024] [--shapes 4096x4096 4096x11008 11008x4096] [--threads 1]

Why: the 7B recipe refreshes 224 matrices of these shapes every gap steps; whether the randomized range
finder may replace the exact SVD there depends on its time and on how much of the gradient its basis keeps.

Workload: no real 7B gradient fits this machine (and one of a few hundred tokens would have rank < 1024), so
each test matrix is G = U diag(s) V^T with seeded Haar-random orthonormal U, V and the singular-value profile
of a real LLaMA gradient of the same kind: block 0 of llama_60m (same aspect ratios as 7B: 512 x 512,
512 x 1376, 1376 x 512) after one forward/backward on 8 x 256 real C4 tokens, its normalized spectrum
stretched over min(m, n) indices, so rank 1024 of 4096 sits where the paper's 60M rank 128 of 512 does.
Square matrices take q_proj's profile (the flattest of the block), m x n wide ones down_proj's, tall ones
gate_proj's. A power-law spectrum s_i = i^-0.5 (flatter than any of them) stresses the range finder.

Prints per matrix: CPU seconds of svd_top and randomized_svd_top (one call each, one torch thread, so other
processes on a shared machine do not count), and the gradient energy each basis captures on the side the
projector uses ("std": U[:, :r] when m < n, Vh[:r] otherwise): ||P^T G||^2 / ||G||^2 or ||G Q^T||^2 / ||G||^2,
plus the subspace similarity of the two bases (svd.subspace_similarity, 1 = identical).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_optimizer import c4_tokens, cpu_seconds, real_block_gradients  # noqa: E402

from galore_train.optim.svd import randomized_svd_top, subspace_similarity, svd_top  # noqa: E402

PROFILE_MODEL = "llama_60m"
STRESS_EXPONENT = 0.5


def real_profiles() -> dict[str, Tensor]:
    """Normalized singular values (s / s_1) of llama_60m's block-0 gradients: square, wide and tall."""
    tokens = c4_tokens(8 * 256).view(8, 256)
    gradients = {name.split(".")[-1]: grad for name, _, grad in real_block_gradients(PROFILE_MODEL, tokens)}
    picks = {"square": "q_proj", "wide": "down_proj", "tall": "gate_proj"}
    profiles = {}
    for kind, name in picks.items():
        values = torch.linalg.svdvals(gradients[name])
        profiles[kind] = values / values[0]
    return profiles


def stretched(profile: Tensor, length: int) -> Tensor:
    """`profile` resampled to `length` values at the same relative positions, interpolated in log space."""
    positions = ((torch.arange(length, dtype=torch.float64) + 0.5) / length * len(profile) - 0.5).clamp(
        0, len(profile) - 1
    )
    low = positions.floor().long()
    high = (low + 1).clamp(max=len(profile) - 1)
    logs = profile.double().log()
    return (logs[low] + (positions - low) * (logs[high] - logs[low])).exp().float()


def test_matrix(shape: tuple[int, int], singular_values: Tensor, seed: int) -> Tensor:
    """G = U diag(s) V^T with Haar-random orthonormal U (m x k), V (n x k), k = min(m, n)."""
    m, n = shape
    k = len(singular_values)
    generator = torch.Generator().manual_seed(seed)
    left = torch.linalg.qr(torch.randn(m, k, generator=generator)).Q
    right = torch.linalg.qr(torch.randn(n, k, generator=generator)).Q
    return (left * singular_values) @ right.mT


def projected_side(top: tuple[Tensor, Tensor], shape: tuple[int, int]) -> Tensor:
    """The orthonormal basis "std" keeps, as columns: U[:, :r] when m < n, else Vh[:r]^T."""
    m, n = shape
    return top[0] if m < n else top[1].mT


def captured_energy(matrix: Tensor, basis: Tensor) -> float:
    """||B^T G||^2 / ||G||^2 on the projected side (B's columns orthonormal)."""
    m, n = matrix.shape
    projected = basis.mT @ matrix if m < n else matrix @ basis
    return float(projected.square().sum() / matrix.square().sum())


def compare(matrix: Tensor, rank: int, exact: bool) -> dict[str, float]:
    """Times and captured energies of both methods on one matrix (exact=False: randomized only)."""
    results: dict[str, float] = {}
    shape = tuple(matrix.shape)
    approx: list[tuple[Tensor, Tensor]] = []
    results["randomized s"] = cpu_seconds(lambda: approx.append(randomized_svd_top(matrix, rank, seed=0)))
    approx_basis = projected_side(approx[0], shape)
    results["randomized energy"] = captured_energy(matrix, approx_basis)
    if exact:
        top: list[tuple[Tensor, Tensor]] = []
        results["exact s"] = cpu_seconds(lambda: top.append(svd_top(matrix, rank)))
        exact_basis = projected_side(top[0], shape)
        results["exact energy"] = captured_energy(matrix, exact_basis)
        results["similarity"] = subspace_similarity(exact_basis, approx_basis)
    return results


def parse_shape(text: str) -> tuple[int, int]:
    m, n = text.lower().split("x")
    return int(m), int(n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=1024, help="the 7B recipe's rank")
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=[(4096, 4096), (4096, 11008), (11008, 4096)])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: CPU time is then comparable)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    print(f"torch {torch.__version__}, {args.threads} thread(s), load average {load}; rank {args.rank}")
    print(f"test matrices: Haar-random singular vectors, spectra of {PROFILE_MODEL}'s block-0 gradients stretched\n")
    profiles = real_profiles()
    print(
        f"{'matrix':<14}{'spectrum':<24}{'exact s':>9}{'rand s':>9}{'speed-up':>9}"
        f"{'exact energy':>14}{'rand energy':>13}{'rand/exact':>11}{'similarity':>12}"
    )
    for shape in args.shapes:
        m, n = shape
        kind = "square" if m == n else "wide" if m < n else "tall"
        spectra = {f"{PROFILE_MODEL} {kind}": stretched(profiles[kind], min(m, n))}
        if m == n:
            spectra[f"power law i^-{STRESS_EXPONENT}"] = torch.arange(1, m + 1).float() ** -STRESS_EXPONENT
        for index, (label, values) in enumerate(spectra.items()):
            matrix = test_matrix(shape, values, seed=index)
            timed = index == 0  # the exact SVD's time does not depend on the spectrum: time it once per shape
            r = compare(matrix, args.rank, exact=timed)
            if not timed:  # the exact top-r energy of a constructed matrix is known: sum of the top s_i^2
                energies = values.square()
                r["exact energy"] = float(energies[: args.rank].sum() / energies.sum())
            exact_s = f"{r['exact s']:9.1f}" if timed else f"{'-':>9}"
            speedup = f"{r['exact s'] / r['randomized s']:8.1f}x" if timed else f"{'-':>9}"
            similarity = f"{r['similarity']:12.4f}" if timed else f"{'-':>12}"
            print(
                f"{f'{m} x {n}':<14}{label:<24}{exact_s}{r['randomized s']:9.1f}{speedup}"
                f"{r['exact energy']:14.4f}{r['randomized energy']:13.4f}"
                f"{r['randomized energy'] / r['exact energy']:11.4f}{similarity}",
                flush=True,
            )
    print("\nenergy = ||P^T G||^2 / ||G||^2 on the side the projector keeps; similarity = mean squared cosine of the")
    print("principal angles between the exact and randomized top-r subspaces (1 = identical, r/min(m, n) = random)")


if __name__ == "__main__":
    main()
