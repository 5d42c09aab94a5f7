"""Group-wise INT8 storage of a weight matrix, with rounding to nearest or stochastic rounding.

Each row of an m x n weight is cut into n / group_size groups of consecutive values (group_size must
divide n, so a group never crosses a row and a block of rows, e.g. an FSDP row shard, quantizes on its
own). A group keeps one fp32 scale, its absolute maximum over 127, and each value an int8 code:

    scale = max|w_group| / 127        q = R(w / scale) in [-127, 127]        w' = q * scale

R is rounding to nearest, or stochastic rounding: floor(x + u) with u ~ U[0, 1) from a torch.Generator,
so E[q] = x: an update smaller than half a code step survives in expectation instead of being rounded
away (Q-GaLore, arXiv 2407.08296, keeps its INT8 weights this way). The scale is recomputed from the
updated values at every requantization.

Quantization runs over blocks of rows (`ROW_BLOCK_ELEMENTS` values at a time), so its fp32 temporaries
stay small beside the matrix: what the memory estimator counts for an update is the dequantized matrix
(the run's dtype) and its gradient, not these blocks.

Bytes of an m x n matrix: m n (codes) + 4 m n / group_size (scales).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

QMAX = 127
ROW_BLOCK_ELEMENTS = 1 << 20  # values quantized at once: 4 MiB per fp32 temporary


def check_group_size(columns: int, group_size: int, name: str = "a weight") -> None:
    """ValueError unless `group_size` is a positive divisor of the row length."""
    if not isinstance(group_size, int) or group_size <= 0 or columns % group_size:
        raise ValueError(f"--int8-group-size {group_size} must divide the row length {columns} of {name}")


def int8_nbytes(shape: tuple[int, int], group_size: int) -> int:
    """Bytes of the codes and scales of an m x n matrix (module docstring)."""
    m, n = shape
    return m * n + 4 * m * (n // group_size)


def quantize_rows_(
    matrix: Tensor, codes: Tensor, scales: Tensor, group_size: int, generator: Optional[torch.Generator] = None
) -> None:
    """Write the INT8 codes (m x n, int8) and scales (m x n/group_size, fp32) of `matrix` in place;
    stochastic rounding when a generator is given, else to nearest."""
    m, n = matrix.shape
    check_group_size(n, group_size)
    rows = max(1, ROW_BLOCK_ELEMENTS // n)
    for start in range(0, m, rows):
        block = matrix[start : start + rows].detach().to(torch.float32, copy=True).view(-1, n // group_size, group_size)
        block_scales = block.abs().amax(dim=2).div_(QMAX)
        safe = torch.where(block_scales > 0, block_scales, torch.ones_like(block_scales))  # all-zero group: 0
        block.div_(safe.unsqueeze(2))
        if generator is None:
            block.round_()
        else:
            noise = torch.rand(block.shape, generator=generator, device=block.device, dtype=block.dtype)
            block.add_(noise).floor_()
        codes[start : start + rows].copy_(block.clamp_(-QMAX, QMAX).view(-1, n))
        scales[start : start + rows].copy_(block_scales)


def dequantize_rows(codes: Tensor, scales: Tensor, dtype: torch.dtype) -> Tensor:
    """The m x n matrix in `dtype` that `quantize_rows_` encoded."""
    m, n = codes.shape
    groups = scales.shape[1]
    values = codes.view(m, groups, n // groups).to(dtype)
    return values.mul_(scales.to(dtype).unsqueeze(2)).view(m, n)
