"""GaLore-Adafactor: Adafactor (Shazeer & Stern 2018) on the projected gradient.

Paper settings, as in the GaLore experiments and transformers' Adafactor with
relative_step=False, scale_parameter=False, warmup_init=False: an external learning rate, no
parameter-scale factor, the first moment only when beta1 is given. For a (low-rank) gradient R at step t:

    b2_t = 1 - t^decay_rate                                 (decay_rate = -0.8)
    row  <- b2_t row + (1 - b2_t) mean_cols(R^2 + eps)      col <- b2_t col + (1 - b2_t) mean_rows(R^2 + eps)
    U    = R / sqrt(row col^T / mean(row))                  (factored second moment; 1-D: unfactored)
    U    <- lr * U / max(1, RMS(U) / clip_threshold)
    U    <- b1 M + (1 - b1) U  -> M                         (only with beta1)
    W    <- (1 - lr wd) W - scale * back(U)

GaLore parameters keep row (r or m) and col (n or r) statistics of the low-rank R; the moments and
the update are computed in fp32 whatever the parameter dtype. Groups without "rank" are plain
Adafactor with the same settings (the `adafactor` baseline).

FSDP2 (row shards, row_shards.py): a rank holds its rows of R (right side, m x r) or of a plain weight. The
row statistics are per row (sharded like the rows); the column statistics, the mean of the row statistics
and RMS(U) reduce over all rows, so their sums are all-reduced (RowShard.sum: n + 2 values per matrix and
step, n = r for a GaLore matrix) and the column statistics are replicated. Same result as one process up to
the order of the sums.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Optional

import torch
from torch import Tensor

from galore_train.optim.base import GaLoreOptimizer
from galore_train.optim.layout import StateTensor
from galore_train.optim.row_shards import RowShard


def _rms(t: Tensor, shard: Optional[RowShard] = None) -> Tensor:
    if shard is None:
        return t.norm() / (t.numel() ** 0.5)
    return shard.sum(t.square().sum()).div_(shard.numel(t)).sqrt_()


def _mean_over_rows(t: Tensor, dim: int, shard: Optional[RowShard], keepdim: bool = False) -> Tensor:
    """The mean over `dim`, the rows: under FSDP `t` holds this rank's rows (2-D: dim -2; 1-D: -1) of the whole."""
    if shard is None:
        return t.mean(dim=dim, keepdim=keepdim)
    return shard.sum(t.sum(dim=dim, keepdim=keepdim)).div_(shard.rows)


class GaLoreAdafactor(GaLoreOptimizer):
    """Adafactor with GaLore param groups (see GaLoreOptimizer for the param-group convention)."""

    STATE_SHARDING = {"exp_avg_sq_col": None}  # FSDP2: the column statistics cover every row: replicated

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        beta1: Optional[float] = None,
        decay_rate: float = -0.8,
        clip_threshold: float = 1.0,
        eps: float = 1e-30,
        weight_decay: float = 0.0,
    ) -> None:
        if lr < 0.0:
            raise ValueError(f"invalid learning rate {lr}")
        if beta1 is not None and not 0.0 <= beta1 < 1.0:
            raise ValueError(f"invalid beta1 {beta1}")
        defaults = {
            "lr": lr,
            "beta1": beta1,
            "decay_rate": decay_rate,
            "clip_threshold": clip_threshold,
            "eps": eps,
            "weight_decay": weight_decay,
        }
        super().__init__(params, defaults)

    def _update(self, p: Tensor, grad: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        grad = grad.float()
        factored = grad.dim() >= 2
        if "exp_avg_sq_row" not in state and "exp_avg_sq" not in state:
            self._init_state(grad, group, state, factored)
        beta2t = 1.0 - state["step"] ** group["decay_rate"]
        squared = grad.square().add_(group["eps"])
        if factored:
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            row.lerp_(squared.mean(dim=-1), 1.0 - beta2t)
            col.lerp_(_mean_over_rows(squared, -2, self._shard), 1.0 - beta2t)
            row_factor = (row / _mean_over_rows(row, -1, self._shard, keepdim=True)).rsqrt_().unsqueeze(-1)
            update = col.rsqrt().unsqueeze(-2).mul(row_factor).mul_(grad)
        else:
            state["exp_avg_sq"].lerp_(squared, 1.0 - beta2t)
            update = state["exp_avg_sq"].rsqrt().mul_(grad)
        update.div_((_rms(update, self._shard) / group["clip_threshold"]).clamp_(min=1.0)).mul_(group["lr"])
        if group["beta1"] is not None:
            update = state["exp_avg"].lerp_(update, 1.0 - group["beta1"])
        self._apply(p, update, group, state, step_size=1.0)

    @staticmethod
    def _init_state(grad: Tensor, group: dict[str, Any], state: dict[str, Any], factored: bool) -> None:
        if group["beta1"] is not None:
            state["exp_avg"] = torch.zeros_like(grad)
        if factored:
            state["exp_avg_sq_row"] = grad.new_zeros(grad.shape[:-1])
            state["exp_avg_sq_col"] = grad.new_zeros(grad.shape[:-2] + grad.shape[-1:])
        else:
            state["exp_avg_sq"] = torch.zeros_like(grad)

    @classmethod
    def _moment_layout(cls, shape: tuple[int, ...], group: Mapping[str, Any], itemsize: int) -> list[StateTensor]:
        """fp32 whatever the gradient's dtype; the first moment only with beta1."""
        layout = [StateTensor("exp_avg", math.prod(shape), 4)] if group.get("beta1") is not None else []
        if len(shape) >= 2:
            return layout + [
                StateTensor("exp_avg_sq_row", math.prod(shape[:-1]), 4),
                StateTensor("exp_avg_sq_col", math.prod(shape[:-2] + shape[-1:]), 4),
            ]
        return layout + [StateTensor("exp_avg_sq", math.prod(shape), 4)]
