"""Low-rank gradient sync: under data parallelism, GaLore matrices are averaged as R = P^T G (or G Q^T), not as G.

Why it is exact: shared refresh (refresh_sharing.py) gives every process the same projection P, and the
projection is linear, so the mean over processes of P^T G_i is P^T of the mean gradient, which is all a GaLore
update reads (GaLore-AdamW, -Adafactor, -AdamW-8bit, Natural GaLore; not Fira or APOLLO, which also read the full
gradient: the registry marks which optimizers qualify). Between refreshes this moves r x n values per matrix
instead of m x n: 4x fewer at rank 128 on llama_60m's 512-wide matrices, 4x at 7B rank 1024 on 4096-wide ones.
At a matrix's refresh the owner needs the mean full gradient for the SVD, so that matrix's gradient is
all-reduced in full (every process then projects the mean with the new P: no second round).

Design: the step driver's own collective, not a DDP communication hook. The projected matrices are left out of
DDP's buckets (`DistributedDataParallel._set_params_and_buffers_to_ignore_for_model`), so their gradients stay
local and accumulate locally over micro-batches (projection is linear: projecting the sum once is exact and
cheapest); after backward, `synchronize()` averages them: full at refresh steps, R otherwise, all R of a step
in one flat all-reduce. Why not a comm hook: a hook must hand DDP back a full bucket, so it would have to write
P R back into every m x n gradient (a second matmul and a non-exact round trip through P P^T, wrong for
quantized P), and it would need the optimizer's refresh schedule and projections inside DDP's reducer. The
driver's collective needs neither: the optimizer receives the averaged R directly (`project_for_sync`).
Layer-wise updates (no DDP wrapper) call `synchronize()` from each GaLore matrix's gradient hook, where that
matrix's is the only gradient present; the update then reads the averaged R.

Gradient clipping: the full mean gradient of a projected matrix exists on no process, so the clipped norm is the
norm of what the optimizer consumes: the averaged R of every projected matrix (after any refresh of this step,
so with this step's P) plus every other parameter's full averaged gradient. Since GaLore's update is linear in
R, scaling R by the clipping factor scales the update exactly as clipping G would; only the threshold's meaning
changes (||P^T G|| <= ||G||): the logged grad_norm is this projected norm.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor

from galore_train.optim import traffic
from galore_train.optim.base import GaLoreOptimizer


class LowRankSync:
    """Averages a GaLore optimizer's projected gradients across `world_size` processes (see the module docstring).
    Every process calls `synchronize()` once per optimizer step, after the last backward, before step()."""

    def __init__(self, optimizer: GaLoreOptimizer, world_size: int, group: Optional[Any] = None) -> None:
        self.optimizer = optimizer
        self.world_size = world_size
        self.group = group
        self.params = optimizer.projected_params()

    @torch.no_grad()
    def synchronize(self) -> list[Tensor]:
        """Average this step's projected gradients (of the parameters that have one: all of them after a plain
        backward, the hooked one under layer-wise updates); returns what clipping measures for them: the averaged
        R the optimizer will use, or the averaged full gradient where a refresh found it non-finite (the optimizer
        skips that update; the non-finite norm makes the step skipped, as without low-rank sync). Collective."""
        for item in self.optimizer.due_refreshes():  # the refresh SVDs need the mean full gradient
            self._average(item.param.grad)
        refreshing = {item.param for item in self.optimizer.due_refreshes()}
        projected = self.optimizer.project_for_sync()
        between = [r for p, r in projected.items() if p not in refreshing and r is not None]
        if between:
            flat = torch.cat([r.reshape(-1) for r in between])
            self._average(flat)
            for r, chunk in zip(between, flat.split([r.numel() for r in between])):
                r.copy_(chunk.view_as(r))
        return [p.grad if r is None else r for p, r in projected.items()]

    def _average(self, tensor: Tensor) -> None:
        """In place, as DDP computes it: divide by the process count, then sum."""
        tensor.div_(self.world_size)
        traffic.all_reduce(tensor, "projected_matrices", group=self.group)


def clip_tensors_(tensors: list[Tensor], max_norm: float) -> float:
    """Scale `tensors` in place so that their joint L2 norm is at most `max_norm`; return the norm before clipping.

    torch's clip_grad_norm_ in its two halves (get_total_norm, then the same clamped factor), so the values are its
    own bit for bit; with `max_norm` inf nothing is rescaled (clip_grad_norm_(..., inf) multiplies every gradient
    by 1: a pass over all of them per step)."""
    if not tensors:
        return 0.0
    total = torch.nn.utils.get_total_norm(tensors)
    if math.isfinite(max_norm):
        torch._foreach_mul_(tensors, torch.clamp(max_norm / (total + 1e-6), max=1.0))
    return float(total)
