"""GaLore-AdamW-8bit: GaLore-AdamW whose Adam moments are stored in 8 bits (bitsandbytes).

The moments are block-wise quantized with bitsandbytes' dynamic maps (signed for the first moment,
unsigned for the second; blocks of 256 values, one fp32 absmax each), and the update is bitsandbytes'
own 8-bit block-wise Adam kernel (`bitsandbytes.functional.optimizer_update_8bit_blockwise`: fused on
GPU, dequantize -> fp32 update -> requantize on CPU), called on tensors we own:

  * GaLore parameters: the kernel updates a zero-initialized low-rank buffer with lr = 1 and no weight
    decay, which leaves -N_t (the bias-corrected Adam direction of R_t) in it; we then apply
    W <- (1 - lr wd) W - lr * scale * back(N_t) like GaLore-AdamW. The parameter itself is never
    swapped or reshaped (galore-torch instead swaps p.data for a zero low-rank tensor each step).
  * full-rank parameters: the kernel updates the parameter in place (decoupled weight decay), as
    bitsandbytes' AdamW8bit does.

Like bitsandbytes, tensors with fewer than `min_8bit_size` (layout.EIGHTBIT_MIN_SIZE, 4096) elements --
counted on the low-rank gradient for GaLore parameters -- keep their moments in the gradient's dtype (or the
group's moment_dtype) and use the GaLore-AdamW update. The 8-bit moments need no float32 option: each block's
fp32 absmax carries a uniform decay that the codes cannot.

State per 8-bit parameter: exp_avg / exp_avg_sq (uint8, shape of the (low-rank) gradient),
exp_avg_absmax / exp_avg_sq_absmax (fp32, one per block of 256), step; GaLore adds the projection.

FSDP2 (row shards, row_shards.py): each rank runs the kernel on its own rows. The blocks are those of the
whole flattened matrix when every rank's rows start a block (checked at construction), so the state is
one process's, sharded; `min_8bit_size` is compared with the whole (low-rank) matrix, not the shard.
"""

from __future__ import annotations

import logging
import math
from functools import lru_cache
from types import ModuleType
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor

from galore_train.optim.base import GaLoreOptimizer, group_names
from galore_train.optim.galore_adamw import GaLoreAdamW, adam_defaults
from galore_train.optim.layout import EIGHTBIT_BLOCK, EIGHTBIT_MIN_SIZE, StateTensor, blockwise_8bit_moments
from galore_train.optim.projector import GaLoreProjector
from galore_train.optim.row_shards import follows_rows, is_row_sharded


def import_bitsandbytes() -> ModuleType:
    """bitsandbytes, imported on first use: the import takes seconds, and its CPU backend warns about
    an optional 4-bit kernel package that 8-bit optimizer states do not use."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import bitsandbytes
    import bitsandbytes.functional

    return bitsandbytes


@lru_cache(maxsize=None)
def _quantization_maps(device: torch.device) -> tuple[Tensor, Tensor]:
    """bitsandbytes' dynamic 8-bit maps: signed (first moment) and unsigned (second moment)."""
    functional = import_bitsandbytes().functional
    return functional.create_dynamic_map(signed=True).to(device), functional.create_dynamic_map(signed=False).to(device)


def _check_blocks_follow_rows(name: str, shape: tuple[int, ...], world: int) -> None:
    """FSDP2: each rank quantizes the moments of its own rows, so its first row must start a block of 256 values
    and the absmax blocks must shard like torch.chunk; otherwise a block would straddle two ranks and the
    state (and the checkpoint) would differ from one process's. ValueError (a UserError at start) if not."""
    width = math.prod(shape[1:])
    aligned = all(start * width % EIGHTBIT_BLOCK == 0 for start in range(0, shape[0], -(-shape[0] // world)))
    if not (aligned and follows_rows(shape[0], world, lambda rows: -(-rows * width // EIGHTBIT_BLOCK))):
        raise ValueError(
            f"8-bit moments of {name} ({shape[0]} x {width} values) cannot be split over {world} processes: under "
            f"--distributed fsdp each rank's rows must hold whole blocks of {EIGHTBIT_BLOCK} values, split like the "
            "rows (torch.chunk); change --rank or the process count, or use --distributed ddp"
        )


class GaLoreAdamW8bit(GaLoreAdamW):
    """GaLoreAdamW with 8-bit block-wise quantized moments (same param-group convention)."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        min_8bit_size: int = EIGHTBIT_MIN_SIZE,
    ) -> None:
        GaLoreOptimizer.__init__(
            self, params, {**adam_defaults(lr, betas, eps, weight_decay), "min_8bit_size": min_8bit_size}
        )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        projector = GaLoreProjector.from_group(group) if "rank" in group else None
        for name, p in zip(group_names(group), group["params"]):
            shape = projector.low_rank_shape(p.shape) if projector else tuple(p.shape)
            if is_row_sharded(p) and math.prod(shape) >= group["min_8bit_size"]:
                _check_blocks_follow_rows(name, shape, p.device_mesh.size())

    def _update(self, p: Tensor, grad: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        numel = grad.numel() if self._shard is None else self._shard.numel(grad)  # FSDP: the whole matrix's
        if numel < group["min_8bit_size"]:
            super()._update(p, grad, group, state)
            return
        if "exp_avg" not in state:
            blocks = -(-grad.numel() // EIGHTBIT_BLOCK)
            for key in ("exp_avg", "exp_avg_sq"):
                state[key] = torch.zeros(grad.shape, dtype=torch.uint8, device=grad.device)
                state[f"{key}_absmax"] = torch.zeros(blocks, dtype=torch.float32, device=grad.device)
        galore = "rank" in group
        target = torch.zeros_like(grad, memory_format=torch.contiguous_format) if galore else p
        signed_map, unsigned_map = _quantization_maps(grad.device)
        beta1, beta2 = group["betas"]
        import_bitsandbytes().functional.optimizer_update_8bit_blockwise(
            "adam",
            grad.contiguous(),
            target,
            state["exp_avg"],
            state["exp_avg_sq"],
            beta1,
            beta2,
            0.0,
            0.0,
            group["eps"],
            state["step"],
            1.0 if galore else group["lr"],
            signed_map,
            unsigned_map,
            state["exp_avg_absmax"],
            state["exp_avg_sq_absmax"],
            weight_decay=0.0 if galore else group["weight_decay"],
        )
        if galore:
            self._apply(p, target.neg_(), group, state, step_size=group["lr"])

    @classmethod
    def _moment_layout(cls, shape: tuple[int, ...], group: Mapping[str, Any], itemsize: int) -> list[StateTensor]:
        numel = math.prod(shape)
        if numel < group.get("min_8bit_size", EIGHTBIT_MIN_SIZE):
            return super()._moment_layout(shape, group, itemsize)  # GaLoreAdamW's update and moments
        return blockwise_8bit_moments(numel)
