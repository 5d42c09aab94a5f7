"""Shared projection refresh: under data parallelism, one process computes each matrix's refresh and broadcasts it.

Data-parallel processes (DDP, layer-wise DDP) hold the same averaged gradient (FSDP2: its row shards,
which are gathered to the owner at a refresh, one matrix at a time: row_shards.py). Without this, every process
ran the same SVD for every GaLore matrix and relied on getting the same bits back (true on identical
hardware and libraries, not guaranteed across GPU models or library builds). Instead each matrix has an
owner (`refresh_owners`: round-robin over the GaLore parameters in optimizer order; with staggered refresh
the offsets already spread the refreshes over steps). At a refresh only the owner computes the outcome
(`GaLoreProjector.compute_refresh`: the finiteness check, the SVD or its fallbacks, the adaptive-gap
similarity) and broadcasts it; every process then stores the same outcome (`apply_refresh`), so the
projections (quantized codes and scales included) and the lazy-refresh bookkeeping are identical by
construction: storing is a copy or an elementwise quantization, which gives the same bits everywhere.

Broadcast per refreshed matrix: a header of 4 integers (finite, new matrices or not, similar, the failures
the owner counted, which the others add to their metrics), then, when there are new matrices, the float32
singular vectors a parameter keeps (r x min(m, n) values for one side, both sides for "full"): once per
refresh interval, small next to a step's gradient all-reduce.

Order: every process must issue the same collectives. All of them refresh the same matrices at the same
step (same state, same averaged gradient), in optimizer order within a step; layer-wise steps one matrix
per hook, in autograd's order, which is the same on every process.

Wall time: the due refreshes run in rounds of world-size matrices: each process computes the SVDs it owns
in the round, then the round's broadcasts run. Round-robin owners make a round's SVDs run in parallel on
different processes, and at most one round's singular vectors are alive at a time. Layer-wise updates
refresh one matrix per step call, so there the processes take turns: the SVD work is divided, the wall
time is not.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from galore_train.optim import traffic
from galore_train.optim.projector import GaLoreProjector, RefreshOutcome, RefreshStats
from galore_train.optim.row_shards import gather_rows, is_row_sharded


def refresh_owners(count: int, world_size: int) -> list[int]:
    """The process that computes the refreshes of each of `count` matrices: round-robin, in order."""
    return [index % world_size for index in range(count)]


@dataclass(frozen=True)
class DueRefresh:
    """A parameter whose projection is due for a refresh at this step."""

    param: Tensor
    projector: GaLoreProjector
    name: Optional[str]


class RefreshSharing:
    """Owner-computes-and-broadcasts refreshes over a process group (all of torch.distributed's by default).
    Ownership is fixed at construction, over `params` in the order given (the optimizer's)."""

    def __init__(self, params: Sequence[Tensor], group: Optional[dist.ProcessGroup] = None) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self._owner = dict(zip(params, refresh_owners(len(params), self.world_size)))

    def owner(self, param: Tensor) -> int:
        return self._owner[param]

    def refresh(self, due: Sequence[DueRefresh], states: Any, stats: RefreshStats) -> dict[Tensor, bool]:
        """Run this step's due refreshes (the same list, in the same order, on every process) and store them;
        `apply_refresh`'s result (False: skip the update) per parameter. Collective."""
        start = time.perf_counter()
        results = {}
        for begin in range(0, len(due), self.world_size):
            round_ = due[begin : begin + self.world_size]
            gradients = [self._whole_gradient(item) for item in round_]  # FSDP: gathered to the owner (collective)
            owned = [
                self._compute(item, grad, states[item.param], stats) if self.owner(item.param) == self.rank else None
                for item, grad in zip(round_, gradients)
            ]
            for item, outcome in zip(round_, self._broadcast(round_, owned, stats)):
                state, dtype = states[item.param], item.param.grad.dtype
                results[item.param] = item.projector.apply_refresh(outcome, state, state.get("step", 0), dtype)
        stats.seconds += time.perf_counter() - start
        return results

    def _whole_gradient(self, item: DueRefresh) -> Optional[Tensor]:
        """The m x n gradient where the owner needs it: FSDP's row shards are gathered to it (collective)."""
        grad = item.param.grad
        return gather_rows(grad, self._global(self.owner(item.param)), self.group) if is_row_sharded(grad) else grad

    @staticmethod
    def _compute(
        item: DueRefresh, grad: Tensor, state: dict[str, Any], stats: RefreshStats
    ) -> tuple[RefreshOutcome, int]:
        """The owner's outcome, with the failures it counted; matrices made contiguous for the broadcast
        (this also frees the full singular-vector matrices they were sliced from)."""
        before = stats.failures
        outcome = item.projector.compute_refresh(grad, state, state.get("step", 0), stats, item.name)
        if outcome.matrices is not None:
            outcome.matrices = {key: m.contiguous() for key, m in outcome.matrices.items()}
        return outcome, stats.failures - before

    def _broadcast(
        self, round_: Sequence[DueRefresh], owned: list[Optional[tuple[RefreshOutcome, int]]], stats: RefreshStats
    ) -> list[RefreshOutcome]:
        """Every process gets each owner's outcome: the headers first, then the new matrices."""
        headers = []
        for item, mine in zip(round_, owned):
            device = item.param.grad.device
            if mine is None:
                headers.append(torch.empty(4, dtype=torch.int64, device=device))
            else:
                outcome, failures = mine
                values = [outcome.finite, outcome.matrices is not None, outcome.similar, failures]
                headers.append(torch.tensor(values, dtype=torch.int64, device=device))
        self._wait([self._send(header, item) for header, item in zip(headers, round_)])

        outcomes, sends = [], []
        for item, mine, header in zip(round_, owned, headers):
            finite, has_matrices, similar, failures = header.tolist()
            if mine is not None:
                outcomes.append(mine[0])
            else:
                stats.failures += failures
                grad = item.param.grad
                dtype = torch.promote_types(grad.dtype, torch.float32)
                shapes = item.projector.stored_shapes(grad.shape) if has_matrices else None
                matrices = (
                    {key: torch.empty(shape, dtype=dtype, device=grad.device) for key, shape in shapes.items()}
                    if shapes
                    else None
                )
                outcomes.append(RefreshOutcome(finite=bool(finite), matrices=matrices, similar=bool(similar)))
            if outcomes[-1].matrices is not None:
                sends += [self._send(matrix, item) for matrix in outcomes[-1].matrices.values()]
        self._wait(sends)
        return outcomes

    def _send(self, tensor: Tensor, item: DueRefresh) -> dist.Work:
        return traffic.broadcast(tensor, self._global(self.owner(item.param)), "refresh", self.group, async_op=True)

    def _global(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    @staticmethod
    def _wait(works: list[dist.Work]) -> None:
        for work in works:
            work.wait()
