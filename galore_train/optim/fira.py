"""Fira-AdamW (Chen et al. 2024, arXiv 2410.01623): GaLore-AdamW plus the gradient GaLore throws away.

Per GaLore parameter and step t, with R_t = P_t^T G_t, the raw Adam direction N'_t = M_t / (sqrt(V_t) + eps)
(moments of R, no bias correction; galore_adamw.py) and the bias correction k_t = sqrt(1 - b2^t) / (1 - b1^t)
(P, the sides and the refresh in projector.py):

    S_t    = G_t - c P_t R_t                     the out-of-subspace residual; c = 1 (paper) or c = scale
                                                 (the authors' code), see RESIDUALS
    phi_t  = ||N'_t[:, j]|| / ||R_t[:, j]||      per channel j (the paper's column-wise norm-based scaling:
                                                 Adam's effect on the norm, measured in the subspace)
    U_t    = phi_t * S_t, limited                the norm-growth limiter (norm_growth.py, gamma = 1.01) on
                                                 the raw update, before the bias correction
    W_t    = (1 - lr wd) W_{t-1} - lr k_t (scale P_t N'_t + U_t)

This is the authors' code (github.com/xichen-fy/Fira, optimizer_torch/fira_adamw.py, Apache-2.0), including
its eps placement (added to the uncorrected sqrt(V), as in transformers' old AdamW; EPS_ON_CORRECTED_V) and
the limiter's place; tests/test_fira_reference.py runs their file beside ours. Two edge cases differ on
purpose: phi_j = 0 where ||R[:, j]|| = 0 (theirs divides by ||R|| + 1e-8), and the limiter's zero/non-finite
history (norm_growth.py); their weight decay comes after the step (W - lr wd W of the updated W), ours is
decoupled before it, as in GaLore-AdamW (their launch scripts use weight decay 0).

Channels are the dimension the projection keeps: the columns of G for a left projection (R is r x n), the
rows for a right one (R is m x r), so "column-wise" with GaLore's std side for m <= n as in the paper; a
two-sided ("full") projection keeps none and is refused.

The residual coefficient: the paper writes S = G - P P^T G; the authors' code subtracts scale * P P^T G,
so with scale 0.25 three quarters of the in-subspace gradient also take the phi-scaled SGD path. That is
what produced the published perplexities, so it is the default ("code"); "paper" gives the equation. At
scale 1 the two coincide, and on gradients inside the subspace Fira is then GaLore-AdamW (tested).

FSDP2 (row shards, row_shards.py; right projections only): R's rows, the residual's rows and phi (one per
row) are local; the limiter's whole-matrix norm sums the ranks' squares (one float32 all-reduced per matrix
and step). So each rank keeps its rows of the moments, the projection whole and the limiter's scalar.

State per GaLore parameter: GaLore-AdamW's (moments of R, the projection) plus one float32 scalar for the
limiter. S is an m x n temporary of each step, not state. Plain groups run AdamW (the authors' eps placement).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

import torch
from torch import Tensor

from galore_train.optim.base import GaLoreOptimizer
from galore_train.optim.galore_adamw import GaLoreAdamW, adam_defaults
from galore_train.optim.layout import StateTensor
from galore_train.optim.norm_growth import (
    DEFAULT_LIMIT,
    check_norm_growth_limit,
    limit_norm_growth_,
    limiter_layout,
)
from galore_train.optim.projector import GaLoreProjector
from galore_train.optim.row_shards import RowShard, sum_over_rows

RESIDUALS = ("code", "paper")


def channel_dim(side: str) -> int:
    """The dimension a channel-wise norm of R reduces: 0 for a left projection (one norm per column of
    R = P^T G, i.e. of G), 1 for a right one (one per row)."""
    return 0 if side == "left" else 1


def channel_squares(t: Tensor, dim: Optional[int]) -> Tensor:
    """float32 squared L2 norms over `dim`, kept 2-D so they broadcast against G (dim None: the whole tensor,
    1 x 1). Under FSDP2 `t` is this rank's rows: see `whole_over_rows`."""
    if dim is None:
        return torch.linalg.vector_norm(t, dtype=torch.float32).reshape(1, 1).square_()
    return torch.linalg.vector_norm(t, dim=dim, keepdim=True, dtype=torch.float32).square_()


def whole_over_rows(shard: Optional[RowShard], dim: Optional[int], *squares: Tensor) -> tuple[Tensor, ...]:
    """`channel_squares(·, dim)` of a rank's rows made whole: per-row ones (dim 1) already are; those that sum
    over the rows (per column, dim 0, or whole-matrix, None) are summed over the ranks, all in one all-reduce
    (row_shards.sum_over_rows; nothing without a shard)."""
    return squares if dim == 1 else sum_over_rows(shard, *squares)


def norm_ratio(numerator: Tensor, denominator: Tensor) -> Tensor:
    """numerator / denominator, 0 where the denominator is 0 (no gradient in that channel: nothing to scale)."""
    return torch.where(denominator > 0, numerator / denominator, torch.zeros_like(numerator))


def check_one_sided(group: dict[str, Any], name: str) -> None:
    if group["proj_type"] == "full":
        raise ValueError(f"{name} scales by channel along the unprojected dimension; proj_type 'full' projects both")


class FiraAdamW(GaLoreAdamW):
    """GaLore-AdamW whose GaLore groups also apply the phi-scaled, norm-growth-limited residual.

    Param-group keys as GaLoreAdamW's plus `residual` ("code" | "paper") and `norm_growth_limit` (gamma,
    or None for off). Example:
        FiraAdamW([{"params": others},
                   {"params": matrices, "rank": 128, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"}],
                  lr=1e-2)
    """

    EPS_ON_CORRECTED_V = False  # the authors': M / (sqrt(V) + eps)
    ACCUMULATES_PROJECTED = False  # the update reads the full gradient p.grad

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        residual: str = "code",
        norm_growth_limit: Optional[float] = DEFAULT_LIMIT,
    ) -> None:
        defaults = {
            **adam_defaults(lr, betas, eps, weight_decay),
            "residual": residual,
            "norm_growth_limit": norm_growth_limit,
        }
        GaLoreOptimizer.__init__(self, params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group["residual"] not in RESIDUALS:
            raise ValueError(f"unknown Fira residual {group['residual']!r}; known: {', '.join(RESIDUALS)}")
        check_norm_growth_limit(group["norm_growth_limit"])
        if "rank" in group:
            check_one_sided(group, "Fira")

    @classmethod
    def state_layout(cls, shape: tuple[int, ...], group: Mapping[str, Any], itemsize: int) -> list[StateTensor]:
        """GaLore-AdamW's layout (moments of R, the projection), plus the limiter's scalar in GaLore groups."""
        layout = super().state_layout(shape, group, itemsize)
        return layout + limiter_layout(group) if "rank" in group else layout

    def _update(self, p: Tensor, grad: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        if "rank" not in group:
            super()._update(p, grad, group, state)
            return
        projector = GaLoreProjector.from_group(group)
        dim = channel_dim(projector.side(p.shape))
        projected = channel_squares(grad, dim)  # before the Adam direction overwrites R's buffer
        residual = self._gradient_rows(p).clone(memory_format=torch.contiguous_format)
        coefficient = 1.0 if group["residual"] == "paper" else group["scale"]
        projector.project_back_add_(residual, grad, state, alpha=-coefficient)
        normalized, c1, c2 = self._adam_direction(grad, group, state)  # N', before the bias correction
        projected, adam = whole_over_rows(self._shard, dim, projected, channel_squares(normalized, dim))
        phi = norm_ratio(adam.sqrt_(), projected.sqrt_())
        limit_norm_growth_(residual.mul_(phi.to(residual.dtype)), state, group["norm_growth_limit"], self._shard)
        step_size = group["lr"] * c2 / c1  # the bias correction, after the limiter (as the authors)
        self._apply(p, normalized, group, state, step_size=step_size)
        p.add_(residual, alpha=-step_size)
