"""The optimizers of other libraries that --optimizer offers (torch.optim's Adam/AdamW, bitsandbytes'
AdamW8bit), described the way galore_train's own optimizers describe themselves: a constructor and the
state layout (see layout.py) the memory estimator asks for."""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import torch

from galore_train.optim.galore_adamw8bit import import_bitsandbytes
from galore_train.optim.layout import EIGHTBIT_MIN_SIZE, StateTensor, adam_moments, blockwise_8bit_moments

QUANTIZATION_MAP_SIZE = 256  # entries of each of bitsandbytes' dynamic 8-bit maps (fp32)
BNB_MOMENTS = ("state1", "state2")  # bitsandbytes' state keys


def torch_adam_state_layout(shape: tuple[int, ...], group: Mapping[str, Any], itemsize: int) -> list[StateTensor]:
    """torch.optim.Adam / AdamW: moments in the parameter's dtype, `step` as a float32 tensor."""
    return adam_moments(math.prod(shape), itemsize) + [StateTensor("step", 1, 4)]


def bitsandbytes_adamw8bit(params: Iterable[Any], **settings: Any) -> torch.optim.Optimizer:
    """bitsandbytes.optim.AdamW8bit, imported on first use."""
    return import_bitsandbytes().optim.AdamW8bit(params, **settings)


def bitsandbytes_adamw8bit_state_layout(
    shape: tuple[int, ...], group: Mapping[str, Any], itemsize: int
) -> list[StateTensor]:
    """AdamW8bit: fp32 moments below the size threshold, else block-wise 8-bit moments plus the two
    quantization maps every 8-bit parameter's state references (one shared tensor each)."""
    numel = math.prod(shape)
    if numel < EIGHTBIT_MIN_SIZE:
        return adam_moments(numel, 4, BNB_MOMENTS)
    maps = [StateTensor(key, QUANTIZATION_MAP_SIZE, 4, shared=True) for key in ("qmap1", "qmap2")]
    return blockwise_8bit_moments(numel, BNB_MOMENTS, ("absmax1", "absmax2")) + maps
