"""The norm-growth limiter (Fira, Chen et al. 2024, arXiv 2410.01623; reused by APOLLO, arXiv 2412.05270).

Per matrix and step t, with U_t the raw update (before Adam's bias correction and the learning rate: both
authors limit it there and multiply by lr sqrt(1 - b2^t) / (1 - b1^t) afterwards) and gamma > 1:

    if ||U_t|| > gamma ||U_{t-1}||:   U_t <- U_t * gamma ||U_{t-1}|| / ||U_t||

where ||U_{t-1}|| is the norm of the update actually applied at the previous step (after limiting). It
stops the sudden jumps of low-rank updates (a new projection, a scaling factor that spikes) that show as
loss spikes, and it needs nothing from the other parameters: it is the per-matrix substitute for global
gradient clipping, which layer-wise updates cannot do (optim/layerwise.py).

State: one float32 scalar tensor per parameter, `state[PREVIOUS_NORM]`. Choices the paper leaves open:
  * the first update of a parameter is never limited (nothing to compare with);
  * a previous norm of 0 (an all-zero update) counts as "no history": the next update is not limited,
    where a literal reading would freeze the parameter at zero for good;
  * a non-finite norm (an inf/NaN gradient) is passed through unlimited (the step guard deals with it) and
    never recorded: the previous norm stays, so one bad step cannot turn the limiter off for the rest of the
    run (a NaN history would compare false forever; an inf one would never limit again).
Why before the bias correction: the correction sqrt(1 - b2^t) / (1 - b1^t) itself grows by more than 1% per
step around steps 20-45 (b = 0.9, 0.999), so a limiter after it clips every one of those steps; against the
authors' Fira on one 32 x 64 matrix that placement (with torch's eps placement) moved the weights 43% / 31% /
1% differently after 10 / 40 / 300 steps; this one agrees to within 3e-6 (tests/test_fira_reference.py).
Everything stays on the device (no .item()): the factor is a tensor the caller multiplies in.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import torch
from torch import Tensor

from galore_train.optim.layout import StateTensor
from galore_train.optim.row_shards import RowShard, sum_over_rows

PREVIOUS_NORM = "norm_growth_prev"  # the state key: ||U_{t-1}|| after limiting, float32 scalar
DEFAULT_LIMIT = 1.01  # Fira's and APOLLO's gamma


def check_norm_growth_limit(limit: Optional[float]) -> None:
    """ValueError unless `limit` is None (off) or a finite number >= 1 (below 1 every update would shrink)."""
    if limit is None:
        return
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not math.isfinite(limit) or limit < 1.0:
        raise ValueError(f"norm_growth_limit must be a number >= 1 (or None for off), got {limit!r}")


def limiter_layout(group: Mapping[str, Any]) -> list[StateTensor]:
    """The limiter's state entry in a group with these settings (an omitted limit is the default, on)."""
    return [] if group.get("norm_growth_limit", DEFAULT_LIMIT) is None else [StateTensor(PREVIOUS_NORM, 1, 4)]


def norm_growth_factor(norm: Tensor, state: dict[str, Any], limit: Optional[float]) -> Optional[Tensor]:
    """The factor (float32 scalar tensor, <= 1) to multiply an update of norm `norm` by, and record the
    limited norm as this parameter's previous one. None when the limiter is off (limit None)."""
    if limit is None:
        return None
    norm = norm.detach().to(torch.float32)
    previous = state.get(PREVIOUS_NORM)
    if previous is None:
        factor = torch.ones_like(norm)
    else:
        ceiling = limit * previous
        factor = torch.where((previous > 0) & (norm > ceiling), ceiling / norm, torch.ones_like(norm))
    finite = torch.isfinite(norm)
    factor = torch.where(finite, factor, torch.ones_like(norm))
    kept = torch.zeros_like(norm) if previous is None else previous
    state[PREVIOUS_NORM] = torch.where(finite, norm * factor, kept)
    return factor


def limit_norm_growth_(
    update: Tensor, state: dict[str, Any], limit: Optional[float], shard: Optional[RowShard] = None
) -> Tensor:
    """`update`, scaled in place so its norm grows by at most `limit` per step (see the module docstring).
    Under FSDP2 `update` is this rank's rows (`shard`): the norm is the whole matrix's (one all-reduce)."""
    if limit is None:
        return update
    (square,) = sum_over_rows(shard, torch.linalg.vector_norm(update, dtype=torch.float32).square())
    return update.mul_(norm_growth_factor(square.sqrt_(), state, limit).to(update.dtype))
