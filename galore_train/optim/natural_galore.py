"""Natural GaLore-AdamW (Das 2024, arXiv 2410.16029): GaLore-AdamW on a natural gradient in the low-rank space.

Per GaLore parameter and step t, with R_t the projected gradient (projector.py) read as one vector
g_t of d = (rows x cols of R) values, and H the k <= s most recent such vectors, g_t included
(s = fisher_history, a ring buffer per matrix):

    F_t = lam I + (1/k) sum_i h_i h_i^T              damped empirical Fisher of the low-rank gradients (d x d)
    g~_t = lam F_t^{-1} g_t
         = g_t - H^T (k lam I_k + H H^T)^{-1} H g_t  (Woodbury: only a k x k system is solved)
    then GaLore-AdamW on g~_t instead of R_t: Adam moments, projection back, scale (galore_adamw.py).

The factor lam in front of F^{-1} is constant, and Adam's normalization M / sqrt(V) cancels it (up to
eps); it keeps eps with the meaning it has in GaLore-AdamW and makes the limits exact: fisher_history
0 or lam -> infinity give g~ = g, i.e. GaLore-AdamW itself (tested).

Choices where the paper leaves room, and why:
  * each projected gradient is one vector (the whole r x n matrix flattened), the cheapest reading of
    "sum g g^T" that is faithful to it: one k x k Gram matrix per weight, no per-row systems;
  * the Gram matrix H H^T is kept up to date incrementally: writing g_t into its slot makes its
    row/column exactly H g_t, which the step needs anyway, so the preconditioner costs two
    (k x d) matrix-vector products and a k x k Cholesky solve per matrix and step;
  * the history is emptied when the projection is refreshed: stored vectors are coordinates in the
    old basis and mixing bases would make the Fisher estimate meaningless; it refills in s steps;
  * 1/k, not 1/s, while the buffer fills: the empirical mean over what has been seen;
  * the k x k solve runs in float64 (it is tiny), the products H g and H^T y in float32 at least: in
    bf16 the Gram rows carry 3 significant digits, the solve amplifies their error by the condition
    number of H H^T (large: consecutive gradients are nearly parallel), and g - H^T y cancels most of
    g, so bf16 products missed the fp64 result by 5-100% (tested). In bf16 this costs a transient
    float32 copy of the history (s x d) per matrix and step; the stored history stays in bf16;
  * a failed Cholesky factorization (the damped system is positive definite in exact arithmetic, but
    gradients of norm >> 1/lam can make it numerically indefinite) skips the preconditioner for that
    step: the plain GaLore-AdamW step, chosen on the device (torch.where on the factorization status, so
    no device sync per matrix and step); the fallbacks are counted on the device and read once per log
    (`svd_metrics()["fisher_fallbacks_total"]`, with a RuntimeWarning when the count grew);
  * only GaLore groups are preconditioned: a full-rank history of an embedding would cost s times its
    size; plain groups run AdamW exactly as GaLore-AdamW does.

State per GaLore parameter, besides GaLore-AdamW's: fisher_grads (s x d, gradient dtype; the memory
cost, s times the low-rank gradient), fisher_gram (s x s, float64), fisher_count (int, vectors written
since the last refresh). All tensors or ints, so torch.load(weights_only=True) round-trips them.

FSDP2 (row shards, row_shards.py): a rank holds its rows of R (m x r, right side), i.e. a contiguous part
of g, so its fisher_grads are the matching columns of H (sharded on dim 1) and H g is the sum of every
rank's partial products: one all-reduce of k <= s float64 values per matrix and step. The Gram matrix, the
k x k solve and y are then the same on every rank (fisher_gram is replicated), and g - H^T y is row-local.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Iterable, Mapping, Optional

import torch
from torch import Tensor

from galore_train.optim.base import GaLoreOptimizer, group_names
from galore_train.optim.galore_adamw import GaLoreAdamW, adam_defaults
from galore_train.optim.layout import StateTensor
from galore_train.optim.projector import GaLoreProjector
from galore_train.optim.row_shards import RowShard, follows_rows, is_row_sharded

FISHER_HISTORY = 20  # the authors' code keeps 20 projected gradients
FISHER_DAMPING = 1e-3  # and damps with 1e-3


def woodbury_solve(gram: Tensor, hg: Tensor, damping: float) -> tuple[Tensor, Tensor]:
    """(y, failed): y = (k lam I + H H^T)^{-1} H g for a k x d history H, from gram = H H^T and hg = H g (float64).

    Then lam F^{-1} g = g - H^T y (module docstring). `failed`, a boolean on the device (no host read): the
    Cholesky factorization of a finite system failed (numerically indefinite); y is then meaningless. Non-finite
    gradients give non-finite output and failed False, so the training loop's non-finite guards see them like
    any other poisoned update.
    """
    k = gram.shape[0]
    system = gram + (k * damping) * torch.eye(k, dtype=gram.dtype, device=gram.device)
    factor, info = torch.linalg.cholesky_ex(system)
    failed = (info != 0) & torch.isfinite(system).all()
    return torch.cholesky_solve(hg.unsqueeze(1), factor).squeeze(1), failed


def _check_history_follows_rows(name: str, shape: tuple[int, int], world: int) -> None:
    """FSDP2: each rank's columns of fisher_grads must be where torch.chunk puts them (its rows x r values)."""
    if not follows_rows(shape[0], world, lambda rows: rows * shape[1]):
        raise ValueError(
            f"Natural GaLore's gradient history of {name} ({shape[0]} x {shape[1]}) cannot be sharded over {world} "
            f"processes like its rows: under --distributed fsdp its rows must divide evenly (or use --distributed ddp)"
        )


class NaturalGaLoreAdamW(GaLoreAdamW):
    """GaLoreAdamW whose GaLore groups precondition the projected gradient with the inverse damped
    empirical Fisher of its last `fisher_history` values (see the module docstring).

    Same param-group convention as GaLoreAdamW; groups may override fisher_history / fisher_damping.

    Example:
        NaturalGaLoreAdamW([{"params": others},
                            {"params": matrices, "rank": 128, "update_proj_gap": 200, "scale": 0.25}],
                           lr=1e-3, fisher_history=20, fisher_damping=1e-3)
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        fisher_history: int = FISHER_HISTORY,
        fisher_damping: float = FISHER_DAMPING,
    ) -> None:
        defaults = {
            **adam_defaults(lr, betas, eps, weight_decay),
            "fisher_history": fisher_history,
            "fisher_damping": fisher_damping,
        }
        self._fisher_fallbacks: Tensor | int = 0  # indefinite systems since construction, a device tensor once stepped
        self._fisher_fallbacks_warned = 0
        GaLoreOptimizer.__init__(self, params, defaults)

    STATE_SHARDING = {"fisher_grads": 1, "fisher_gram": None}  # FSDP2: H by columns, H H^T replicated

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        history, damping = group["fisher_history"], group["fisher_damping"]
        if not isinstance(history, int) or isinstance(history, bool) or history < 0:
            raise ValueError(f"fisher_history must be a non-negative integer, got {history!r}")
        if not (isinstance(damping, (int, float)) and math.isfinite(damping) and damping > 0):
            raise ValueError(f"fisher_damping must be a positive number, got {damping!r}")
        if "rank" in group and history:
            projector = GaLoreProjector.from_group(group)
            for name, p in zip(group_names(group), group["params"]):
                if is_row_sharded(p):
                    _check_history_follows_rows(name, projector.low_rank_shape(p.shape), p.device_mesh.size())

    @classmethod
    def state_layout(cls, shape: tuple[int, ...], group: Mapping[str, Any], itemsize: int) -> list[StateTensor]:
        """GaLoreAdamW's, plus the Fisher history of GaLore matrices: s low-rank gradients, their float64 Gram."""
        layout = super().state_layout(shape, group, itemsize)
        history = group.get("fisher_history", FISHER_HISTORY)
        if "rank" not in group or not history:
            return layout
        low_rank = layout[0].numel  # the first moment has the projected gradient's size
        return layout + [
            StateTensor("fisher_grads", history * low_rank, itemsize),
            StateTensor("fisher_gram", history**2, 8),
        ]

    def _update(self, p: Tensor, grad: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        if "rank" in group and group["fisher_history"] > 0:
            failed = self._natural_gradient_(grad, group, state, self._shard)
            self._fisher_fallbacks = self._fisher_fallbacks + failed  # on the device: no host read per matrix
        super()._update(p, grad, group, state)

    @staticmethod
    def _natural_gradient_(
        grad: Tensor, group: dict[str, Any], state: dict[str, Any], shard: Optional[RowShard] = None
    ) -> Tensor:
        """grad <- lam F^{-1} grad, in place (grad is the projected gradient's scratch buffer; FSDP: its rows).
        Returns the device-side flag of a numerically indefinite system, where grad is left as it was."""
        size = group["fisher_history"]
        g = grad.view(-1)
        if "fisher_grads" not in state:
            state["fisher_grads"] = torch.zeros(size, g.numel(), dtype=g.dtype, device=g.device)
            state["fisher_gram"] = torch.zeros(size, size, dtype=torch.float64, device=g.device)
            state["fisher_count"] = 0
        if state.get("projection_step") == state["step"] - 1:  # refreshed at this step: new coordinates
            state["fisher_count"] = 0
        history_buffer, gram_buffer = state["fisher_grads"], state["fisher_gram"]
        slot = state["fisher_count"] % size
        k = min(state["fisher_count"] + 1, size)
        history_buffer[slot].copy_(g)
        precise = torch.promote_types(g.dtype, torch.float32)  # bf16/fp16 products are far off (docstring)
        history, g_precise = history_buffer[:k].to(precise), g.to(precise)
        hg = torch.mv(history, g_precise).to(torch.float64)
        if shard is not None:  # FSDP: each rank's part of every inner product
            shard.sum(hg)
        gram_buffer[slot, :k] = hg
        gram_buffer[:k, slot] = hg
        state["fisher_count"] += 1
        y, failed = woodbury_solve(gram_buffer[:k, :k], hg, group["fisher_damping"])
        natural = torch.addmv(g_precise, history.mT, y.to(precise), alpha=-1.0)
        g.copy_(torch.where(failed, g_precise, natural))  # failed: the plain GaLore-AdamW step
        return failed

    def svd_metrics(self) -> dict[str, float]:
        """GaLoreOptimizer's, plus fisher_fallbacks_total: the steps whose damped Fisher system was numerically
        indefinite (plain GaLore-AdamW steps instead; counted on the device, read here once per log, with a
        RuntimeWarning when it grew)."""
        metrics = super().svd_metrics()
        total = int(self._fisher_fallbacks) if isinstance(self._fisher_fallbacks, Tensor) else 0
        if total > self._fisher_fallbacks_warned:
            warnings.warn(
                f"Natural GaLore: {total - self._fisher_fallbacks_warned} damped Fisher system(s) numerically "
                "indefinite (gradients too large for fisher_damping?); plain GaLore-AdamW steps instead",
                RuntimeWarning,
                stacklevel=2,
            )
            self._fisher_fallbacks_warned = total
        metrics["fisher_fallbacks_total"] = total
        return metrics
