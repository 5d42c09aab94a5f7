"""SinkGD (Scetbon, Ma, Gong, Meeds; NeurIPS 2025, arXiv 2502.06742): SGD on a Sinkhorn-normalized gradient.

Per hidden weight (m x n gradient G) and step, with no state, L alternating passes (SR-Sinkhorn):

    X <- sqrt(n) Q(X)^(-1) X        every row to l2 norm sqrt(n)        (Q: diagonal of the row norms)
    X <- sqrt(m) X R(X)^(-1)        every column to l2 norm sqrt(m)     (R: diagonal of the column norms)
    W <- (1 - lr wd) W - lr X_L

The fixed point has every row of norm sqrt(n) and every column of norm sqrt(m) at once (RMS 1 per entry,
like Adam's early updates); the paper's "multi-normalization" of G under the row and column norms.
Embeddings, LM head and norms run AdamW (optim/stateless.py), as in the paper. Written from the paper's
equations; there is no official code. Choices stated: SINKHORN_STEPS passes; a row or column of norm 0 stays
0 (divisor 1); float32 throughout.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import Tensor

from galore_train.optim.stateless import StatelessMatrixAdamW

SINKHORN_STEPS = 5  # L, the alternating row/column passes


def _scale_to(x: Tensor, dim: int, target: float) -> Tensor:
    norms = torch.linalg.vector_norm(x, dim=dim, keepdim=True)
    return x * (target / torch.where(norms > 0, norms, torch.ones_like(norms)))


def sinkhorn_direction(grad: Tensor, steps: int = SINKHORN_STEPS) -> Tensor:
    """`steps` passes of row then column normalization (rows to norm sqrt(n), columns to sqrt(m))."""
    m, n = grad.shape
    x = grad
    for _ in range(steps):
        x = _scale_to(_scale_to(x, 1, math.sqrt(n)), 0, math.sqrt(m))
    return x


class SinkGDAdamW(StatelessMatrixAdamW):
    """SinkGD on `"stateless": True` groups (2-D hidden weights), AdamW on the others."""

    NAME = "SinkGD"

    def normalize(self, grad: Tensor, group: Mapping[str, Any]) -> Tensor:
        return sinkhorn_direction(grad, group.get("sinkhorn_steps", SINKHORN_STEPS))
