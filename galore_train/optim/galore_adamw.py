"""GaLore-AdamW: Adam moments of the projected gradient, decoupled weight decay on the full weight.

Per GaLore parameter and step t (paper, Algorithm 2; projector.py for P and the projection sides):

    R_t = P_t^T G_t                               (low rank, refreshed every update_proj_gap steps)
    M_t = b1 M_{t-1} + (1 - b1) R_t               V_t = b2 V_{t-1} + (1 - b2) R_t^2
    N_t = (M_t / (1 - b1^t)) / (sqrt(V_t / (1 - b2^t)) + eps)
    W_t = (1 - lr wd) W_{t-1} - lr * scale * P_t N_t

Groups without "rank" run exactly this with P = identity and scale 1, i.e. torch.optim.AdamW.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor

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
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        super().__init__(params, adam_defaults(lr, betas, eps, weight_decay))

    def _update(self, p: Tensor, grad: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        normalized, c1, c2 = self._adam_direction(grad, group, state)
        self._apply(p, normalized, group, state, step_size=group["lr"] * c2 / c1)

    @staticmethod
    def _adam_direction(grad: Tensor, group: dict[str, Any], state: dict[str, Any]) -> tuple[Tensor, float, float]:
        """Update the moments with `grad`; return (N', c1, c2) with (c2 / c1) N' = N, the bias-corrected Adam direction.

        N = (M / c1) / (sqrt(V) / c2 + eps) = (c2 / c1) * M / (sqrt(V) + eps c2) with the bias corrections
        c1 = 1 - b1^t, c2 = sqrt(1 - b2^t): N' = M / (sqrt(V) + eps c2) and the step size lr c2 / c1 give the same value
        with one pass fewer. For GaLore groups the projected gradient is dead after the moments, so N' is
        computed in its buffer (p.grad is never written); Fira and APOLLO reuse this.
        """
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(grad, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(grad, memory_format=torch.contiguous_format)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        beta1, beta2 = group["betas"]
        exp_avg.lerp_(grad, 1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        c1, c2 = 1.0 - beta1 ** state["step"], math.sqrt(1.0 - beta2 ** state["step"])
        normalized = grad if "rank" in group else torch.empty_like(grad)
        torch.sqrt(exp_avg_sq, out=normalized).add_(group["eps"] * c2)
        torch.div(exp_avg, normalized, out=normalized)
        return normalized, c1, c2

    @classmethod
    def _moment_layout(cls, shape: tuple[int, ...], group: Mapping[str, Any], itemsize: int) -> list[StateTensor]:
        return adam_moments(math.prod(shape), itemsize)  # `step` is a Python int
