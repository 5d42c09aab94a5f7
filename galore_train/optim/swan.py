"""SWAN (Ma, Gong, Scetbon, Meeds; ICML 2025, arXiv 2412.13148): SGD with gradient normalization and whitening.

Per hidden weight (m x n gradient G, rows = output channels) and step, with no state:

    GradNorm         G~ = (G - mean_row(G) 1^T) / std_row(G) 1^T          each row standardized over its n
                                                                          entries (population std)
    GradWhitening    D  = (G~ G~^T)^(-1/2) G~                             the orthogonal polar factor of G~,
                                                                          by coupled Newton-Schulz iterations
    rescale          D <- D ||G~|| / ||D||                                (Frobenius) so the step has G~'s
                                                                          size: RMS 1 per entry, like Adam's
    W <- (1 - lr wd) W - lr D

Embeddings, LM head and norms run AdamW (optim/stateless.py), as in the paper. Written from the paper's
equations; there is no official code. Choices stated: whitening on the smaller side (for m > n,
G~ (G~^T G~)^(-1/2), the same polar factor); the Gram matrix is divided by its Frobenius norm before the
iterations (they converge for eigenvalues in (0, 3)); NS_STEPS coupled iterations (Higham's
Y <- Y (3I - Z Y) / 2, Z <- (3I - Z Y) Z / 2, Z -> A^(-1/2)); a row with zero variance stays zero
(std 0 -> divisor 1); everything in float32 (the paper whitens in FP32).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from galore_train.optim.stateless import StatelessMatrixAdamW

NS_STEPS = 10  # coupled Newton-Schulz iterations for (G G^T)^(-1/2)


def grad_norm(grad: Tensor) -> Tensor:
    """Each row standardized over its entries (mean 0, population std 1); zero-variance rows become 0."""
    centered = grad - grad.mean(dim=1, keepdim=True)
    std = centered.square().mean(dim=1, keepdim=True).sqrt()
    return centered / torch.where(std > 0, std, torch.ones_like(std))


def inverse_sqrt(gram: Tensor, steps: int) -> Tensor:
    """gram^(-1/2) of a symmetric positive semi-definite matrix by coupled Newton-Schulz (on its null space:
    whatever the iterations leave, multiplied by G there it vanishes)."""
    scale = torch.linalg.matrix_norm(gram).clamp_min(torch.finfo(gram.dtype).tiny)  # G = 0: any Z gives 0
    identity = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    y, z = gram / scale, identity
    for _ in range(steps):
        t = 0.5 * (3.0 * identity - z @ y)
        y, z = y @ t, t @ z
    return z / scale.sqrt()


def grad_whitening(grad: Tensor, steps: int = NS_STEPS) -> Tensor:
    """(G G^T)^(-1/2) G, computed on the smaller side of G."""
    if grad.shape[0] <= grad.shape[1]:
        return inverse_sqrt(grad @ grad.T, steps) @ grad
    return grad @ inverse_sqrt(grad.T @ grad, steps)


def swan_direction(grad: Tensor, steps: int = NS_STEPS) -> Tensor:
    """GradNorm, GradWhitening, then the whitened matrix rescaled to the normalized gradient's norm."""
    normalized = grad_norm(grad)
    whitened = grad_whitening(normalized, steps)
    size = torch.linalg.matrix_norm(whitened)
    return whitened * torch.where(size > 0, torch.linalg.matrix_norm(normalized) / size, torch.zeros_like(size))


class SwanAdamW(StatelessMatrixAdamW):
    """SWAN on `"stateless": True` groups (2-D hidden weights), AdamW on the others."""

    NAME = "SWAN"

    def normalize(self, grad: Tensor, group: Mapping[str, Any]) -> Tensor:
        return swan_direction(grad, group.get("ns_steps", NS_STEPS))
