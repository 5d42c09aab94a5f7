"""GaLore on FSDP2 row shards: parameters and gradients are DTensors sharded on dim 0 (blocks of rows).

A right-side projection Q (r x n) keeps every per-step operation row-local: R = G Q^T (m x r) is each
rank's rows of G times Q^T, the Adam moments of R are row shards like the weight, and the back-projection
N Q adds to the rank's own rows of W. So between refreshes nothing is communicated. Only a refresh needs
the whole m x n gradient: its row shards are gathered to the matrix's owner (`gather_rows`, one matrix at
a time), which computes the SVD and broadcasts Q (refresh_sharing.py); Q is kept whole on every rank.

Hence proj_type "right" is required on row shards: with "left" or "full", P^T G would need a sum over
every rank's rows at each step (an r x n all-reduce per matrix), and "std" / "reverse_std" pick the side
from the shape, which a shard does not have.

State: the moments are DTensors sharded like the weight (torch's full-state gathering then concatenates
them, and re-shards them on load); Q and the refresh bookkeeping are plain values, the same on every rank.
"""

from __future__ import annotations

from typing import Any, Optional

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


def local_state(state: dict[str, Any]) -> dict[str, Any]:
    """The state with each DTensor replaced by this rank's shard (a view: in-place updates reach the DTensor)."""
    return {key: value.to_local() if isinstance(value, DTensor) else value for key, value in state.items()}


def keep_local_state(state: dict[str, Any], local: dict[str, Any], param: DTensor) -> None:
    """Write back what the update changed in `local`: entries created on the shard (the moments, rows like
    the weight's) become row-sharded DTensors; plain values (the step, Q) are stored as they are."""
    for key, value in local.items():
        if isinstance(state.get(key), DTensor):
            continue  # updated in place through its local view
        if isinstance(value, Tensor) and value.dim() == 2 and not key.startswith("projection"):
            value = DTensor.from_local(
                value,
                param.device_mesh,
                [Shard(0)],
                run_check=False,
                shape=torch.Size((param.shape[0], value.shape[1])),
                stride=(value.shape[1], 1),
            )
        state[key] = value
