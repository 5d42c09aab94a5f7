"""GaLore on FSDP2 row shards: parameters and gradients are DTensors sharded on dim 0 (blocks of rows).

A right-side projection Q (r x n) keeps every per-step operation row-local: R = G Q^T (m x r) is each
rank's rows of G times Q^T, the Adam moments of R are row shards like the weight, and the back-projection
N Q adds to the rank's own rows of W. So between refreshes nothing is communicated. Only a refresh needs
the whole m x n gradient: its row shards are gathered to the matrix's owner (`gather_rows`, one matrix at
a time), which computes the SVD and broadcasts Q (refresh_sharing.py); Q is kept whole on every rank.

Hence proj_type "right" is required on row shards: with "left" or "full", P^T G would need a sum over
every rank's rows at each step (an r x n all-reduce per matrix), and "std" / "reverse_std" pick the side
from the shape, which a shard does not have (docs/distributed.md measures that trade-off).

Every row-sharded parameter, projected or not, is updated on its local rows (`RowShard` tells the update
which rows it has). Elementwise updates need nothing more; the reductions some updates make over the rows
go through `RowShard.sum`, an all-reduce: Adafactor's column statistics and update RMS (r + 2 values per
matrix per step), Natural GaLore's Fisher products H g (at most s values), and the norms of Fira and APOLLO
(`sum_over_rows`: whole-matrix or per-column sums of squares, batched into one all-reduce per matrix and step;
their per-row norms are local). `RowShard.grad` gives the update this rank's rows of the unprojected gradient,
which Fira and APOLLO read (the local weight it is handed has no `.grad`).

State: tensors an update creates on its shard become DTensors (torch's full-state gathering then concatenates
them, and re-shards them on load), sharded on dim 0 unless the optimizer's STATE_SHARDING says otherwise
(another dim, or None: replicated, the same on every rank); Q and the refresh bookkeeping are plain values,
the same on every rank. A sharded state tensor must follow torch.chunk's layout (`chunk_sizes`) for that to be
exact: the optimizers check it at construction (e.g. 8-bit blocks must not straddle two ranks' rows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Shard


def is_row_sharded(t: Tensor) -> bool:
    return isinstance(t, DTensor) and tuple(t.placements) == (Shard(0),)


def gather_rows(grad: DTensor, dst: int, group: Optional[dist.ProcessGroup] = None) -> Optional[Tensor]:
    """The whole gradient on global rank `dst`, None elsewhere (collective). Shards follow torch.chunk
    (rank i holds rows i*c .. (i+1)*c - 1, c = ceil(m / world), the last ones fewer or none): each rank pads
    its block to c rows for the gather, and the padding is cut off."""
    local, rows = grad.to_local(), grad.shape[0]
    world = dist.get_world_size(group)
    chunk = -(-rows // world)
    missing = chunk - local.shape[0]
    padded = (torch.cat([local, local.new_zeros(missing, *local.shape[1:])]) if missing else local).contiguous()
    blocks = [torch.empty_like(padded) for _ in range(world)] if dist.get_rank() == dst else None
    dist.gather(padded, blocks, dst=dst, group=group)
    return torch.cat(blocks)[:rows] if blocks is not None else None


def chunk_sizes(size: int, world: int) -> list[int]:
    """Each rank's part of `size` under Shard (torch.chunk): ceil(size / world) each, the last ones fewer or none."""
    chunk = -(-size // world)
    return [max(0, min(chunk, size - rank * chunk)) for rank in range(world)]


def follows_rows(rows: int, world: int, size_of_rows: Callable[[int], int]) -> bool:
    """Whether a state tensor whose part on a rank of r rows is `size_of_rows(r)` long shards like torch.chunk
    over its whole size `size_of_rows(rows)` (else its DTensor would gather and re-shard wrongly)."""
    return chunk_sizes(size_of_rows(rows), world) == [size_of_rows(r) for r in chunk_sizes(rows, world)]


@dataclass(frozen=True)
class RowShard:
    """What an update on one rank's rows needs to know: the whole weight's rows and the ranks' process group."""

    rows: int
    group: dist.ProcessGroup
    grad: Optional[Tensor] = None  # this rank's rows of the parameter's (unprojected) gradient

    def sum(self, t: Tensor) -> Tensor:
        """`t` summed over the ranks, in place (collective)."""
        dist.all_reduce(t, group=self.group)
        return t

    def numel(self, local: Tensor) -> int:
        """Elements of the whole tensor whose rows this rank holds `local` of."""
        return self.rows * math.prod(local.shape[1:])


def sum_over_rows(shard: Optional[RowShard], *partials: Tensor) -> tuple[Tensor, ...]:
    """The reduce hook of sums over the rows (sums of squares for norms): under FSDP2 each of `partials` was
    summed over this rank's rows only and the returned tensors are their sums over the ranks, all in one
    all-reduce (flattened into one float32 buffer: one scalar or one vector per matrix and step); without a
    shard (one process, DDP) the partials are already whole and come back as they are."""
    if shard is None:
        return partials
    flat = shard.sum(torch.cat([t.reshape(-1).to(torch.float32) for t in partials]))
    return tuple(part.view(t.shape).to(t.dtype) for part, t in zip(flat.split([t.numel() for t in partials]), partials))


def local_state(state: dict[str, Any]) -> dict[str, Any]:
    """The state with each DTensor replaced by this rank's shard (a view: in-place updates reach the DTensor)."""
    return {key: value.to_local() if isinstance(value, DTensor) else value for key, value in state.items()}


def keep_local_state(
    state: dict[str, Any], local: dict[str, Any], param: DTensor, sharding: Mapping[str, Optional[int]]
) -> None:
    """Write back what the update changed in `local`: tensors created on the shard become DTensors sharded on
    dim `sharding.get(key, 0)` (their whole size there summed over the ranks: one all-reduce per tensor, when
    it is created), or stay plain where that is None; the projections and plain values (the step) are stored
    as they are."""
    for key, value in local.items():
        if isinstance(state.get(key), DTensor):
            continue  # updated in place through its local view
        dim = sharding.get(key, 0)
        if isinstance(value, Tensor) and value.dim() > 0 and not key.startswith("projection") and dim is not None:
            size = torch.tensor([value.shape[dim]], dtype=torch.int64, device=value.device)
            dist.all_reduce(size, group=param.device_mesh.get_group())
            shape = value.shape[:dim] + (int(size),) + value.shape[dim + 1 :]
            value = DTensor.from_local(
                value.contiguous(),
                param.device_mesh,
                [Shard(dim)],
                run_check=False,
                shape=shape,
                stride=torch.empty(shape, device="meta").stride(),
            )
        state[key] = value
