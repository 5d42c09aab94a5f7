"""Optimizer state layouts: the tensors an optimizer keeps for one parameter, described without allocating.

Each optimizer answers `state_layout(shape, group, itemsize)` -- the entries its state dict will hold for a
parameter of `shape` in a param group with these settings, when gradients have `itemsize` bytes per element
-- so the memory estimator adds up what the optimizers say instead of re-deriving their internals. Tests
compare every layout with the state of a real optimizer after a step, tensor for tensor.

The block-wise 8-bit moments (bitsandbytes' layout, also GaLoreAdamW8bit's) are described here once.
"""

from __future__ import annotations

from dataclasses import dataclass

EIGHTBIT_MIN_SIZE = 4096  # bitsandbytes and GaLoreAdamW8bit keep smaller tensors' moments unquantized
EIGHTBIT_BLOCK = 256  # values per fp32 absmax of the 8-bit block-wise moments


@dataclass(frozen=True)
class StateTensor:
    """One state entry: `numel` elements of `itemsize` bytes. `shared` entries (one tensor referenced by
    every parameter's state, e.g. bitsandbytes' quantization maps) count once per optimizer; `projection`
    marks GaLore's projection matrices, which the estimate reports as their own part."""

    key: str
    numel: int
    itemsize: int
    shared: bool = False
    projection: bool = False

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


MOMENTS = ("exp_avg", "exp_avg_sq")  # the state keys of torch's and our Adam moments


def blockwise_8bit_moments(
    numel: int,
    keys: tuple[str, ...] = MOMENTS,
    absmax_keys: tuple[str, ...] = tuple(f"{key}_absmax" for key in MOMENTS),
) -> list[StateTensor]:
    """Two Adam moments as uint8 codes with one fp32 absmax per block of EIGHTBIT_BLOCK values."""
    blocks = -(-numel // EIGHTBIT_BLOCK)
    return [StateTensor(key, numel, 1) for key in keys] + [StateTensor(key, blocks, 4) for key in absmax_keys]


def adam_moments(numel: int, itemsize: int, keys: tuple[str, ...] = MOMENTS) -> list[StateTensor]:
    """Two Adam moments at full precision."""
    return [StateTensor(key, numel, itemsize) for key in keys]
