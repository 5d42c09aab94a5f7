"""GaLore-AdamW: Adam moments of the projected gradient, decoupled weight decay on the full weight.

Per GaLore parameter and step t (paper, Algorithm 2; projector.py for P and the projection sides):

    R_t = P_t^T G_t                               (low rank, refreshed every update_proj_gap steps)
    M_t = b1 M_{t-1} + (1 - b1) R_t               V_t = b2 V_{t-1} + (1 - b2) R_t^2
    N_t = (M_t / (1 - b1^t)) / (sqrt(V_t / (1 - b2^t)) + eps)   (torch.optim.AdamW's eps placement)
    W_t = (1 - lr wd) W_{t-1} - lr * scale * P_t N_t

Groups without "rank" run exactly this with P = identity and scale 1, i.e. torch.optim.AdamW.

M and V are kept in the gradient's dtype (pure bf16 under --dtype bf16, as in the paper), or in a group's
"moment_dtype" (--moments-dtype fp32 sets float32 for the GaLore group: bf16 cannot represent 0.999 V != V,
so a bf16 V never decays; the low-rank moments are small enough to afford float32).

eps: added to the bias-corrected sqrt(V) as torch.optim.AdamW does. The reference implementations of GaLore,
Fira and APOLLO (transformers' old AdamW) add it to the uncorrected sqrt(V), i.e. eps / sqrt(1 - b2^t) in the
formula above; subclasses that follow those authors set EPS_ON_CORRECTED_V = False (Fira, APOLLO).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Optional

import torch
from torch import Tensor

from galore_train.optim import grouped
from galore_train.optim.base import GaLoreOptimizer
from galore_train.optim.layout import StateTensor, adam_moments


def adam_defaults(lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> dict[str, Any]:
    """Validated Adam hyperparameters (shared with the 8-bit variant)."""
    if lr < 0.0:
        raise ValueError(f"invalid learning rate {lr}")
    if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
        raise ValueError(f"invalid betas {betas}")
    if eps < 0.0:
        raise ValueError(f"invalid eps {eps}")
    return {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}


class GaLoreAdamW(GaLoreOptimizer):
    """AdamW with GaLore param groups (see GaLoreOptimizer for the param-group convention).

    Example:
        GaLoreAdamW([{"params": others},
                     {"params": matrices, "rank": 128, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"}],
                    lr=1e-3)

    `foreach`: step each param group's parameters together (grouped.py: batched projections, foreach Adam; the
    same updates to <= 1e-6): None (default) on CUDA, True on any device, False never (one parameter at a time).
    """

    EPS_ON_CORRECTED_V = True  # torch's eps placement (False: the authors' M / (sqrt(V) + eps), see the module)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        foreach: Optional[bool] = None,
    ) -> None:
        super().__init__(params, {**adam_defaults(lr, betas, eps, weight_decay), "foreach": foreach})

    def _step_together(self, group: dict[str, Any], params: list[tuple[Optional[str], Tensor]]) -> bool:
        """The grouped step (grouped.py) where it applies; it computes this class's update, so a subclass that
        changes `_update` keeps the per-parameter step."""
        if type(self)._update is not GaLoreAdamW._update or not grouped.applies(group, params):
            return False
        grouped.step_group(self, group, params)
        return True

    def _update(self, p: Tensor, grad: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        normalized, c1, c2 = self._adam_direction(grad, group, state)
        self._apply(p, normalized, group, state, step_size=group["lr"] * c2 / c1)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        dtype = self.param_groups[-1].get("moment_dtype")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"moment_dtype must be a floating-point torch.dtype or None, got {dtype!r}")

    def _adam_direction(
        self, grad: Tensor, group: dict[str, Any], state: dict[str, Any]
    ) -> tuple[Tensor, float, float]:
        """Update the moments with `grad`; return (N', c1, c2) with (c2 / c1) N' = N, the bias-corrected Adam direction.

        N = (M / c1) / (sqrt(V) / c2 + eps) = (c2 / c1) * M / (sqrt(V) + eps c2) with the bias corrections
        c1 = 1 - b1^t, c2 = sqrt(1 - b2^t): N' = M / (sqrt(V) + eps c2) and the step size lr c2 / c1 give the same value
        with one pass fewer (with EPS_ON_CORRECTED_V False, N' = M / (sqrt(V) + eps): the authors' raw direction).
        For GaLore groups the projected gradient is dead after the moments, so N' is
        computed in its buffer (p.grad is never written); Fira and APOLLO reuse this.

        A group's "moment_dtype" (e.g. float32 moments of bf16 gradients: a bf16 V cannot decay, 0.999 V rounds
        back to V) keeps the moments in that dtype: they and N' are computed from one copy of the gradient in
        it, and a GaLore group's N' is cast back into R's buffer, so callers see the gradient's dtype.
        """
        dtype = group.get("moment_dtype")
        work = grad if dtype is None else grad.to(dtype)  # grad itself when the dtypes agree
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(work, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(work, memory_format=torch.contiguous_format)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        beta1, beta2 = group["betas"]
        exp_avg.lerp_(work, 1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(work, work, value=1.0 - beta2)
        c1, c2 = 1.0 - beta1 ** state["step"], math.sqrt(1.0 - beta2 ** state["step"])
        normalized = work if "rank" in group or work is not grad else torch.empty_like(grad)
        torch.sqrt(exp_avg_sq, out=normalized).add_(group["eps"] * (c2 if self.EPS_ON_CORRECTED_V else 1.0))
        torch.div(exp_avg, normalized, out=normalized)
        if "rank" in group and normalized is not grad:
            normalized = grad.copy_(normalized)
        return normalized, c1, c2

    @classmethod
    def _moment_layout(cls, shape: tuple[int, ...], group: Mapping[str, Any], itemsize: int) -> list[StateTensor]:
        """Two moments in the group's moment_dtype, else the gradient's; `step` is a Python int."""
        dtype = group.get("moment_dtype")
        return adam_moments(math.prod(shape), itemsize if dtype is None else dtype.itemsize)
