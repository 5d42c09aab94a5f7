"""The subspaces a GaLore refresh computes: top singular vectors (exact or randomized), a random fallback,
and how similar two subspaces are. Pure functions of a float32 matrix."""

from __future__ import annotations

import torch
from torch import Tensor

OVERSAMPLE = 8  # extra columns of the randomized range finder
POWER_ITERATIONS = 2


def svd_top(matrix: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Top-`rank` left (m x r) and right (r x n) singular vectors from a full (thin) SVD."""
    u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :rank], vh[:rank]


def randomized_svd_top(matrix: Tensor, rank: int, seed: int) -> tuple[Tensor, Tensor]:
    """Top-`rank` singular vectors from a randomized range finder (Halko et al. 2011, Alg. 4.4).

    Sketch the column space with rank + OVERSAMPLE Gaussian test vectors, sharpen it with
    POWER_ITERATIONS re-orthonormalized power iterations, then take an exact SVD of the small
    projected matrix. Seeded, so a resumed run draws the same test vectors.
    """
    m, n = matrix.shape
    width = min(rank + OVERSAMPLE, m, n)
    generator = torch.Generator(device=matrix.device).manual_seed(seed)
    sketch = torch.randn(n, width, generator=generator, device=matrix.device, dtype=matrix.dtype)
    basis = torch.linalg.qr(matrix @ sketch).Q
    for _ in range(POWER_ITERATIONS):
        basis = torch.linalg.qr(matrix.mT @ basis).Q
        basis = torch.linalg.qr(matrix @ basis).Q
    u_small, _, vh = torch.linalg.svd(basis.mT @ matrix, full_matrices=False)
    return basis @ u_small[:, :rank], vh[:rank]


def random_orthonormal_top(matrix: Tensor, rank: int, seed: int) -> tuple[Tensor, Tensor]:
    """A seeded random orthonormal basis for each side: the last resort when no SVD can be had."""
    m, n = matrix.shape
    generator = torch.Generator(device=matrix.device).manual_seed(seed)
    left = torch.randn(m, rank, generator=generator, device=matrix.device, dtype=matrix.dtype)
    right = torch.randn(n, rank, generator=generator, device=matrix.device, dtype=matrix.dtype)
    return torch.linalg.qr(left).Q, torch.linalg.qr(right).Q.mT


def subspace_similarity(a: Tensor, b: Tensor) -> float:
    """Mean squared cosine of the principal angles between the column spaces of two orthonormal
    m x r bases: 1 = same subspace, r/m = unrelated random subspaces."""
    return float((a.mT @ b).square().sum() / a.shape[1])
