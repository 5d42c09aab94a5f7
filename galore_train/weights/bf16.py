"""Stochastic rounding of fp32 values to bf16 (--stochastic-rounding).

bf16 keeps fp32's exponent and the top 7 of its 23 mantissa bits: a bf16 number is an fp32 whose low 16
bits are zero. Rounding x to nearest moves it to the closer of its two bf16 neighbours, so an update smaller
than half their spacing (2^-8 of the weight's magnitude) vanishes, step after step. Stochastic rounding moves
it to the neighbour away from zero with probability equal to the fraction of the spacing x has covered, and
to the one toward zero otherwise:

    bits(x) + u, u ~ U{0, ..., 2^16 - 1}, then the low 16 bits cleared

carries into bit 16 exactly when u >= 2^16 - low16(x), which has probability low16(x) / 2^16: the distance
fraction. So E[round(x)] = x, and tiny updates accumulate in expectation instead of being rounded away
(Gupta et al. 2015, arXiv 1502.02551; Zamirai et al. 2020, arXiv 2010.06192, for bf16 weights).

The noise comes from a torch.Generator (weights/stepping.py owns it and saves it in checkpoints). Values are
rounded in place in blocks of `ROW_BLOCK_ELEMENTS` values (as int8.py): the only temporaries are a block's int32
noise and NaN mask (5 bytes a value, at most 5 MiB), step temporaries like the optimizer's own, which the
estimator does not count (it counts the fp32 copy: weights/stepping.py). Infinities stay themselves (their low
bits are zero) and NaNs stay NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor

from galore_train.weights.int8 import ROW_BLOCK_ELEMENTS

LOW_BITS = 16  # the fp32 mantissa bits that bf16 drops
HIGH_MASK = -(1 << LOW_BITS)  # 0xFFFF0000 as an int32


def stochastic_round_to_bf16_(source: Tensor, target: Tensor, generator: torch.Generator) -> Tensor:
    """Write `source` (fp32; used as scratch: its values are destroyed) into `target` (bf16, same shape),
    rounded stochastically with noise from `generator`; returns `target`."""
    if source.dtype != torch.float32 or target.dtype != torch.bfloat16 or source.shape != target.shape:
        raise ValueError(f"stochastic rounding writes fp32 into bf16 of one shape; got {source.dtype}, {target.dtype}")
    flat, out = source.view(-1), target.view(-1)
    for start in range(0, flat.numel(), ROW_BLOCK_ELEMENTS):
        block = flat[start : start + ROW_BLOCK_ELEMENTS]
        nan = torch.isnan(block)  # a NaN's payload could round to inf; infinities stay themselves
        bits = block.view(torch.int32)
        noise = torch.randint(0, 1 << LOW_BITS, bits.shape, generator=generator, device=bits.device, dtype=torch.int32)
        bits.add_(noise).bitwise_and_(HIGH_MASK)
        out[start : start + ROW_BLOCK_ELEMENTS].copy_(block.masked_fill_(nan, float("nan")))
    return target
