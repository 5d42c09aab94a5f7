"""The GaLore gradient projection (Zhao et al. 2024, Algorithm 2), shared by every GaLore optimizer.

A weight W and its gradient G are m x n (torch's Linear weight is out_features x in_features). GaLore
keeps optimizer moments of a rank-r projection of G and maps the update back to m x n:

    side    state["projection"]      low-rank R      moments   back-projection of an update N
    left    P = U[:, :r]   (m x r)   P^T G  (r x n)  r x n     P N
    right   Q = Vh[:r, :]  (r x n)   G Q^T  (m x r)  m x r     N Q
    full    P (m x r), plus          P^T G Q^T       r x r     P N Q
            state["projection_right"] = Q (r x n)

where U, Vh are the singular vectors of G at the last refresh. `proj_type` picks the side, with the
same meaning as galore-torch:
    std          project the smaller dimension: left when m < n, right when m >= n. The projection
                 matrix is then min(m, n) x r and the moments r x max(m, n): the paper's memory
                 formula mr + 2nr for m <= n (its P is m x r).
    reverse_std  the other side (projection max(m, n) x r, moments r x min(m, n)).
    left, right, full (two-sided) as in the table.

Refresh: at the first step, then whenever (step + refresh_offset) % update_proj_gap == 0, where step
counts the parameter's completed updates (so without an offset: steps 0, gap, 2 gap, ... like
galore-torch). The SVD runs in float32 (bf16/fp16 gradients are upcast) and the top `rank` singular
vectors are stored, as compact tensors in the gradient's dtype, in the optimizer's per-parameter state,
so `optimizer.state_dict()` round-trips through torch.save/torch.load(weights_only=True).
`svd="randomized"` uses a seeded randomized range finder (2 power iterations) instead of a full SVD.

Robustness (a refresh must never kill or poison a run):
  * non-finite gradient at a refresh: the parameter's update is skipped for this step (its step
    counter does not advance, so the refresh is retried at the next step), the projection is kept;
  * SVD raises or returns non-finite vectors: the previous projection is kept; at the first refresh
    (nothing to keep) the randomized range finder is tried, then a seeded random orthonormal basis.
Each case warns (RuntimeWarning, with the parameter name when the optimizer knows it) and counts one
failure in `RefreshStats`. Non-finite gradients between refreshes are not inspected (that would cost a
device sync per parameter per step); the training loop's non-finite-loss/grad-norm checks cover them.

Staggered refresh: `stagger_offsets(count, gap)` spreads per-parameter offsets evenly over the gap
window so that a refresh step does not SVD every matrix at once.

Quantized projections (Q-GaLore, `proj_bits` 8 or 4): the refreshed matrices are stored group-wise
quantized (quantize.py: codes plus fp32 scales in "<key>_scales") and dequantized, in the gradient's
dtype, each time they are used. The stored dtype says how: float as is, int8 8-bit, uint8 packed 4-bit.

Lazy refresh (Q-GaLore, `adaptive_gap`): at each refresh the new basis is compared with the stored one
(`subspace_similarity`; for "full" the mean of both sides). After STABLE_REFRESHES refreshes in a row
with similarity >= cos_threshold, the parameter's interval state["proj_gap"] doubles (counter reset), up
to MAX_GAP_FACTOR x update_proj_gap. Refreshes stay on the fixed grid (step + offset) % update_proj_gap
== 0; state["next_refresh"] is the next one due. A grid step passed over counts one skipped SVD in
state["svd_skipped"] (checkpointed; `svd_metrics()["svd_skipped_total"]` sums them).

A refresh is two halves: `compute_refresh` (the checks, the SVD, the similarity; reads the state only)
and `apply_refresh` (stores the outcome). Under data parallelism only a matrix's owner computes, and
every process applies the broadcast outcome (refresh_sharing.py).

`GaLoreOptimizer` (base.py) drives the projector from torch.optim's step; `state_layout` tells the memory
estimator which projection tensors a parameter keeps, without computing any.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from galore_train.optim.layout import StateTensor
from galore_train.optim.quantize import QuantizedMatrix, dequantize, quantize, quantized_layout
from galore_train.optim.svd import random_orthonormal_top, randomized_svd_top, subspace_similarity, svd_top

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
SVD_METHODS = ("full", "randomized")
STABLE_REFRESHES = 3  # similar refreshes in a row before a parameter's interval doubles (Q-GaLore waits for 5)
MAX_GAP_FACTOR = 8  # the interval grows to at most 8 x update_proj_gap: a subspace is never frozen for good


def stagger_offsets(count: int, gap: int) -> list[int]:
    """Refresh offsets for `count` matrices spread evenly over a window of `gap` steps."""
    return [(index * gap) // count for index in range(count)]


# --- refresh bookkeeping ------------------------------------------------------------------------


@dataclass
class RefreshStats:
    """What the training loop logs about projection refreshes (see GaLoreOptimizer.svd_metrics)."""

    refreshes: int = 0  # since the last read
    seconds: float = 0.0  # wall time in refreshes (SVD and checks) since the last read
    failures: int = 0  # cumulative since the optimizer was built (not saved in checkpoints)

    def record_failure(self, name: Optional[str], message: str) -> None:
        self.failures += 1
        warnings.warn(f"GaLore projection of {name or 'a parameter'}: {message}", RuntimeWarning, stacklevel=2)

    def read(self) -> dict[str, float]:
        metrics = {"svd_seconds": self.seconds, "svd_refreshes": self.refreshes, "svd_failures_total": self.failures}
        self.seconds, self.refreshes = 0.0, 0
        return metrics


@dataclass
class RefreshOutcome:
    """What one refresh computed (`compute_refresh`), before `apply_refresh` stores it."""

    finite: bool  # False: non-finite gradient; skip this update and keep the projection
    matrices: Optional[dict[str, Tensor]] = None  # the new projection matrices by state key; None: keep the old
    similar: bool = False  # adaptive gap: the new basis is close to the stored one


def _all_finite(t: Tensor) -> bool:
    """One read pass, no temporary: NaN and inf propagate into the sum (a finite tensor whose sum
    overflows float32 counts as non-finite too, which is right for a gradient or a basis)."""
    return bool(torch.isfinite(t.sum()))


def _checked(top: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """Treat non-finite singular vectors like a raised SVD failure."""
    if not all(_all_finite(t) for t in top):
        raise torch.linalg.LinAlgError("the SVD returned non-finite singular vectors")
    return top


def _compact(t: Tensor, dtype: torch.dtype) -> Tensor:
    """An owning contiguous copy: a slice of U would otherwise keep the whole U alive."""
    return t.to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)


# --- the projector -------------------------------------------------------------------------------


@dataclass(frozen=True)
class GaLoreProjector:
    """Refresh / project / project back for one parameter group's settings; the state is the
    parameter's optimizer-state dict (keys "projection", "projection_right", "refresh_offset")."""

    rank: int
    update_proj_gap: int
    proj_type: str = "std"
    svd: str = "full"
    proj_bits: int = 32
    proj_group_size: int = 256
    adaptive_gap: bool = False
    cos_threshold: float = 0.4

    @classmethod
    def from_group(cls, group: dict[str, Any]) -> "GaLoreProjector":
        return cls(
            group["rank"],
            group["update_proj_gap"],
            group["proj_type"],
            group["svd"],
            group["proj_bits"],
            group["proj_group_size"],
            group["adaptive_gap"],
            group["cos_threshold"],
        )

    def side(self, shape: torch.Size) -> str:
        """'left', 'right' or 'full' for a gradient of this shape (see the module docstring)."""
        if self.proj_type in ("left", "right", "full"):
            return self.proj_type
        m, n = shape
        smaller_is_rows = m < n
        if self.proj_type == "std":
            return "left" if smaller_is_rows else "right"
        return "right" if smaller_is_rows else "left"

    def low_rank_shape(self, shape: torch.Size) -> tuple[int, int]:
        """Shape of R (and of the moments) for a gradient of this shape."""
        side, (m, n) = self.side(shape), shape
        return {"left": (self.rank, n), "right": (m, self.rank), "full": (self.rank, self.rank)}[side]

    def state_layout(self, shape: tuple[int, int], itemsize: int) -> list[StateTensor]:
        """The projection entries kept for a parameter of `shape` (gradient `itemsize` bytes per element)."""
        (m, n), rank, side = shape, self.rank, self.side(shape)
        matrices = {
            "left": [("projection", m * rank)],
            "right": [("projection", rank * n)],
            "full": [("projection", m * rank), ("projection_right", rank * n)],
        }[side]
        if self.proj_bits != 32:
            return [
                t for key, numel in matrices for t in quantized_layout(key, numel, self.proj_bits, self.proj_group_size)
            ]
        return [StateTensor(key, numel, itemsize, projection=True) for key, numel in matrices]

    def on_grid(self, state: dict[str, Any], step: int) -> bool:
        """Whether the fixed schedule (every update_proj_gap steps, shifted by the offset) refreshes here."""
        return (step + state.get("refresh_offset", 0)) % self.update_proj_gap == 0

    def refresh_due(self, state: dict[str, Any], step: int) -> bool:
        if "projection" not in state:
            return True
        if self.adaptive_gap and "next_refresh" in state:
            return step >= state["next_refresh"]
        return self.on_grid(state, step)

    def project(
        self,
        grad: Tensor,
        state: dict[str, Any],
        step: int,
        stats: RefreshStats,
        name: Optional[str] = None,
        out: Optional[Tensor] = None,
        refreshed: Optional[bool] = None,
    ) -> Optional[Tensor]:
        """The low-rank gradient R (written into `out` if given), refreshing the projection first if due.

        `refreshed`: what `apply_refresh` returned when the caller has already run this step's refresh
        (shared refresh, refresh_sharing.py); None: refresh here if due.
        Returns None when the gradient is unusable (non-finite at a refresh): skip this update.
        """
        if not self.ready(grad, state, step, stats, name, refreshed):
            return None
        side = self.side(grad.shape)
        projection = self.matrix(state, "projection", grad.shape, grad.dtype)
        if side == "left":
            return torch.mm(projection.mT, grad, out=out)
        if side == "right":
            return torch.mm(grad, projection.mT, out=out)
        return torch.mm(
            projection.mT @ grad, self.matrix(state, "projection_right", grad.shape, grad.dtype).mT, out=out
        )

    def ready(
        self,
        grad: Tensor,
        state: dict[str, Any],
        step: int,
        stats: RefreshStats,
        name: Optional[str] = None,
        refreshed: Optional[bool] = None,
    ) -> bool:
        """Refresh the projection if due (unless the caller already has: `refreshed`, as in `project`);
        False when this update must be skipped (non-finite gradient at a refresh). The grouped step
        (grouped.py) runs this per matrix, then projects all of them at once."""
        if refreshed is None:
            refreshed = self._refresh_if_due(grad, state, step, stats, name)
        return refreshed

    def project_back_add_(
        self, param: Tensor, update: Tensor, state: dict[str, Any], alpha: float, beta: float = 1.0
    ) -> None:
        """param <- beta * param + alpha * back(update), as one fused matmul-accumulate (no m x n temporary)."""
        side = self.side(param.shape)
        projection = self.matrix(state, "projection", param.shape, param.dtype).to(param.dtype)  # fp32: bf16 rounding
        update = update.to(param.dtype)
        if side == "left":
            param.addmm_(projection, update, beta=beta, alpha=alpha)
        elif side == "right":
            param.addmm_(update, projection, beta=beta, alpha=alpha)
        else:
            right = self.matrix(state, "projection_right", param.shape, param.dtype).to(param.dtype)
            param.addmm_(projection @ update, right, beta=beta, alpha=alpha)

    def matrix(self, state: dict[str, Any], key: str, shape: torch.Size, dtype: torch.dtype) -> Tensor:
        """The stored matrix `key` ("projection" or "projection_right") of a parameter of `shape`,
        dequantized to `dtype` if it is stored quantized."""
        stored = state[key]
        if stored.is_floating_point():
            return stored
        matrix_shape = self._matrix_shape(key, shape)
        bits = 8 if stored.dtype == torch.int8 else 4
        return dequantize(
            QuantizedMatrix(stored, state[f"{key}_scales"]), bits, self.proj_group_size, matrix_shape, dtype
        )

    def _refresh_if_due(
        self, grad: Tensor, state: dict[str, Any], step: int, stats: RefreshStats, name: Optional[str]
    ) -> bool:
        """Refresh if due (else count a grid step the lazy refresh passed over); False: skip the update."""
        if not self.refresh_due(state, step):
            if self.adaptive_gap and self.on_grid(state, step):
                state["svd_skipped"] = state.get("svd_skipped", 0) + 1
            return True
        start = time.perf_counter()
        try:
            return self.apply_refresh(self.compute_refresh(grad, state, step, stats, name), state, step, grad.dtype)
        finally:
            stats.seconds += time.perf_counter() - start

    def compute_refresh(
        self, grad: Tensor, state: dict[str, Any], step: int, stats: RefreshStats, name: Optional[str]
    ) -> RefreshOutcome:
        """The new projection from `grad`, without touching `state`: under shared refresh only the
        matrix's owner runs this (the SVD) and the outcome is broadcast to the others."""
        matrix = grad.to(torch.promote_types(grad.dtype, torch.float32))
        if not _all_finite(matrix):
            stats.record_failure(name, f"non-finite gradient at step {step}; update skipped, projection kept")
            return RefreshOutcome(finite=False)
        first = "projection" not in state
        top = self._top_singular_vectors(matrix, step, stats, name, first)
        if top is None:
            return RefreshOutcome(finite=True)
        stats.refreshes += 1
        matrices = self._new_matrices(top, grad.shape)
        similar = (
            self.adaptive_gap and not first and self._similarity(state, matrices, grad.shape) >= self.cos_threshold
        )
        return RefreshOutcome(finite=True, matrices=matrices, similar=similar)

    def apply_refresh(self, outcome: RefreshOutcome, state: dict[str, Any], step: int, dtype: torch.dtype) -> bool:
        """Store a refresh's outcome in `state` (the gradient's `dtype`) and schedule the next one;
        False if the gradient was non-finite (skip the update). The same outcome gives the same state."""
        if not outcome.finite:
            return False
        if outcome.matrices is not None:
            if self.adaptive_gap and "projection" in state:
                self._advance_gap(state, outcome.similar)
            for key, matrix in outcome.matrices.items():
                self._put(state, key, matrix, dtype)
            state["projection_step"] = step  # Natural GaLore empties its history at a new basis
        if self.adaptive_gap:  # the next refresh: `proj_gap` on from the last grid step
            grid_phase = (step + state.get("refresh_offset", 0)) % self.update_proj_gap
            state["next_refresh"] = step - grid_phase + state.get("proj_gap", self.update_proj_gap)
        return True

    def stored_shapes(self, shape: torch.Size) -> dict[str, tuple[int, int]]:
        """The shape of each matrix a refresh stores for a parameter of `shape`, by state key."""
        keys = ("projection", "projection_right") if self.side(shape) == "full" else ("projection",)
        return {key: self._matrix_shape(key, shape) for key in keys}

    def _matrix_shape(self, key: str, shape: torch.Size) -> tuple[int, int]:
        m, n = shape
        return (self.rank, n) if key == "projection_right" or self.side(shape) == "right" else (m, self.rank)

    def _top_singular_vectors(
        self, matrix: Tensor, step: int, stats: RefreshStats, name: Optional[str], first: bool
    ) -> Optional[tuple[Tensor, Tensor]]:
        """The configured method. If it fails: None (keep the previous projection) or, at the first
        refresh (nothing to keep), the randomized range finder, then a random orthonormal basis."""
        try:
            if self.svd == "randomized":
                return _checked(randomized_svd_top(matrix, self.rank, seed=step))
            return _checked(svd_top(matrix, self.rank))
        except RuntimeError as err:  # torch.linalg.LinAlgError is a RuntimeError
            action = "falling back" if first else "keeping the previous projection"
            stats.record_failure(name, f"SVD failed at step {step} ({err}); {action}")
        if not first:
            return None
        if self.svd != "randomized":
            try:
                return _checked(randomized_svd_top(matrix, self.rank, seed=step))
            except RuntimeError:
                pass
        return random_orthonormal_top(matrix, self.rank, seed=step)

    def _new_matrices(self, top: tuple[Tensor, Tensor], shape: torch.Size) -> dict[str, Tensor]:
        """The singular vectors a parameter of `shape` keeps, by state key: P (m x r) and/or Q (r x n)."""
        left, right = top
        side = self.side(shape)
        matrices = {"projection": right if side == "right" else left}
        if side == "full":
            matrices["projection_right"] = right
        return matrices

    def _similarity(self, state: dict[str, Any], matrices: dict[str, Tensor], shape: torch.Size) -> float:
        """Lazy refresh: how close the new bases are to the stored ones (for "full" the mean of both sides)."""
        total = 0.0
        for key, new in matrices.items():
            old = self.matrix(state, key, shape, new.dtype).to(new.dtype)
            rows = key == "projection_right" or self.side(shape) == "right"  # Q: orthonormal rows
            total += subspace_similarity(new.mT, old.mT) if rows else subspace_similarity(new, old)
        return total / len(matrices)

    def _advance_gap(self, state: dict[str, Any], similar: bool) -> None:
        """Lazy refresh bookkeeping: double the parameter's interval after STABLE_REFRESHES similar
        refreshes in a row."""
        stable = state.get("stable_refreshes", 0) + 1 if similar else 0
        gap = state.get("proj_gap", self.update_proj_gap)
        if stable >= STABLE_REFRESHES:
            gap, stable = min(2 * gap, MAX_GAP_FACTOR * self.update_proj_gap), 0
        state["stable_refreshes"], state["proj_gap"] = stable, gap

    def _put(self, state: dict[str, Any], key: str, matrix: Tensor, dtype: torch.dtype) -> None:
        if self.proj_bits == 32:
            state[key] = _compact(matrix, dtype)
        else:
            state[key], state[f"{key}_scales"] = quantize(matrix, self.proj_bits, self.proj_group_size)
