"""Group-wise symmetric INT8 / INT4 quantization of GaLore projection matrices (Q-GaLore, arXiv 2407.08296).

A projection matrix is read as one flat row-major vector cut into groups of `group_size` consecutive
values (the last group zero-padded). Each group keeps one fp32 scale, its absolute maximum divided by
the largest code, and each value the nearest integer code:

    scale = max|x_group| / qmax          q = round(x / scale) in [-qmax, qmax]          x' = q * scale

qmax = 127 for 8 bits and 7 for 4 bits (symmetric: the code -8 of a nibble is unused, so zero is exact
and no zero point has to be stored). Rounding to nearest gives |x - x'| <= scale / 2 for every value.
8-bit codes are stored as int8; 4-bit codes as uint8 with two codes per byte (code + 8 in each nibble,
low nibble first). Bytes per m x r matrix with N = m r values and G = ceil(N / group_size) groups:
N + 4 G (8 bits), ceil(N / 2) + 4 G (4 bits), against 4 N in fp32.

`QuantizedMatrix` is a plain pair of tensors (codes, scales): the projector keeps them as two entries of
the optimizer state, so checkpoints stay tensors-only (torch.load(weights_only=True)).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from galore_train.optim.layout import StateTensor

QUANT_BITS = (4, 8)
_QMAX = {8: 127, 4: 7}


class QuantizedMatrix(NamedTuple):
    codes: Tensor  # int8 (8 bits) or uint8 with two codes per byte (4 bits), flat
    scales: Tensor  # fp32, one per group


def quantize(matrix: Tensor, bits: int, group_size: int) -> QuantizedMatrix:
    """Group-wise symmetric quantization of `matrix` (any shape; read flat, row-major)."""
    _check(bits, group_size)
    groups = _grouped(matrix.detach().float().reshape(-1), group_size)
    qmax = _QMAX[bits]
    scales = groups.abs().amax(dim=1) / qmax
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))  # an all-zero group: codes 0, scale 0
    codes = torch.round(groups / safe[:, None]).clamp_(-qmax, qmax).reshape(-1)[: matrix.numel()].to(torch.int8)
    return QuantizedMatrix(_pack_int4(codes) if bits == 4 else codes, scales)


def dequantize(
    quantized: QuantizedMatrix, bits: int, group_size: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float32
) -> Tensor:
    """The matrix of `shape` that `quantize` encoded, in `dtype`."""
    _check(bits, group_size)
    numel = math.prod(shape)
    codes = _unpack_int4(quantized.codes, numel) if bits == 4 else quantized.codes
    groups = _grouped(codes.float(), group_size)
    return (groups * quantized.scales[:, None]).reshape(-1)[:numel].reshape(shape).to(dtype)


def quantized_layout(key: str, numel: int, bits: int, group_size: int) -> list[StateTensor]:
    """The state entries `key` (codes) and `<key>_scales` that `quantize` stores for `numel` values."""
    _check(bits, group_size)
    codes = -(-numel // 2) if bits == 4 else numel
    return [
        StateTensor(key, codes, 1, projection=True),
        StateTensor(f"{key}_scales", -(-numel // group_size), 4, projection=True),
    ]


def quantized_nbytes(numel: int, bits: int, group_size: int) -> int:
    """Bytes of the codes and scales `quantize` stores for `numel` values (see the module docstring)."""
    return sum(t.nbytes for t in quantized_layout("codes", numel, bits, group_size))


def _check(bits: int, group_size: int) -> None:
    if bits not in QUANT_BITS:
        raise ValueError(f"projection quantization supports {QUANT_BITS} bits, got {bits}")
    if not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"the quantization group size must be a positive integer, got {group_size!r}")


def _grouped(flat: Tensor, group_size: int) -> Tensor:
    """flat, zero-padded to a whole number of groups, as (groups, group_size)."""
    padding = (-flat.numel()) % group_size
    if padding:
        flat = torch.cat([flat, flat.new_zeros(padding)])
    return flat.view(-1, group_size)


def _pack_int4(codes: Tensor) -> Tensor:
    """int8 codes in [-7, 7] -> uint8, two per byte (low nibble = even index)."""
    nibbles = (codes + 8).to(torch.uint8)
    if nibbles.numel() % 2:
        nibbles = torch.cat([nibbles, nibbles.new_full((1,), 8)])  # pad with code 0
    pairs = nibbles.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def _unpack_int4(packed: Tensor, numel: int) -> Tensor:
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], dim=1).reshape(-1)[:numel].to(torch.int8) - 8
