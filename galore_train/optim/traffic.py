"""Counted collectives: the bytes each process puts into the gradient synchronisation, by kind.

`comm_bytes` in metrics.jsonl is read from here, so it is what the collectives were actually called with, not a
formula: every gradient-synchronising collective goes through `all_reduce` / `broadcast` below (the low-rank
sync, the layer-wise averager, shared refresh's broadcasts), and DDP's own bucket all-reduces through
`counting_allreduce_hook`, DDP's default hook with a count in front.

What is counted: the payload of each collective this process issues, in bytes: an all-reduce counts its tensor
(a ring all-reduce moves about 2 (N-1)/N times that over each process's link), a broadcast counts its tensor on
the source process only (the others receive), a gather the tensor each process other than the destination
sends, a scatter the blocks its source sends to the others. The loss/token scalars and evaluation are not gradient
synchronisation and are not counted.

Kinds (`KINDS`): "projected_matrices", the gradients of GaLore-family matrices however they are synced (R under
low-rank sync, the full gradient at their refreshes or through DDP's buckets without it; the bytes of a DDP bucket
are split by parameter); "other_gradients", every other gradient (DDP's buckets; under --layerwise every gradient,
which its averager cannot tell apart); "refresh", shared refresh's headers and singular vectors; "orthogonalized",
Muon's momentum rows gathered to their owner and its Newton-Schulz results sent back (optim/orthogonalize.py).

One process-wide counter (`TRAFFIC`): collectives are issued from DDP's hooks, the optimizer and the update
drivers, which share nothing else; the training loop reads and resets it once per logged step.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Optional

import torch.distributed as dist
from torch import Tensor

KINDS = ("projected_matrices", "other_gradients", "refresh", "orthogonalized")


class TrafficCounter:
    """Bytes by kind since the last `read`."""

    def __init__(self) -> None:
        self.bytes: Counter[str] = Counter()
        self._read_at_step = 0
        self.projected_params: set[Tensor] = set()  # GaLore-family matrices: their DDP bucket bytes are split out

    def add(self, kind: str, tensor: Tensor) -> None:
        self.bytes[kind] += tensor.numel() * tensor.element_size()

    def read(self, step: int) -> dict[str, float]:
        """Bytes per optimizer step since the last read (at optimizer step `step`), by kind and in total
        (`comm_bytes`); {} when nothing was sent (one process). Resets the counter."""
        steps = max(step - self._read_at_step, 1)
        self._read_at_step = step
        if not self.bytes:
            return {}
        metrics = {f"comm_bytes_{kind}": self.bytes[kind] / steps for kind in KINDS}
        metrics["comm_bytes"] = sum(self.bytes.values()) / steps
        self.bytes.clear()
        return metrics


TRAFFIC = TrafficCounter()


def all_reduce(tensor: Tensor, kind: str, group: Optional[Any] = None, async_op: bool = False) -> Any:
    """`dist.all_reduce` (sum), counted."""
    TRAFFIC.add(kind, tensor)
    return dist.all_reduce(tensor, group=group, async_op=async_op)


def broadcast(tensor: Tensor, src: int, kind: str, group: Optional[Any] = None, async_op: bool = False) -> Any:
    """`dist.broadcast`, counted on the source process."""
    if dist.get_rank() == src:
        TRAFFIC.add(kind, tensor)
    return dist.broadcast(tensor, src=src, group=group, async_op=async_op)


def gather(tensor: Tensor, blocks: Optional[list[Tensor]], dst: int, kind: str, group: Optional[Any] = None) -> Any:
    """`dist.gather` (asynchronous) into `blocks` on `dst` (None elsewhere), counted on the senders."""
    if dist.get_rank() != dst:
        TRAFFIC.add(kind, tensor)
    return dist.gather(tensor, blocks, dst=dst, group=group, async_op=True)


def scatter(tensor: Tensor, blocks: Optional[list[Tensor]], src: int, kind: str, group: Optional[Any] = None) -> Any:
    """`dist.scatter` (asynchronous) of `blocks` on `src` (None elsewhere) into `tensor`, counted on the source
    (the blocks it sends to the others)."""
    if blocks is not None:
        own = dist.get_rank(group) if group is not None else dist.get_rank()
        for rank, block in enumerate(blocks):
            if rank != own:
                TRAFFIC.add(kind, block)
    return dist.scatter(tensor, blocks, src=src, group=group, async_op=True)


def counting_allreduce_hook(group, bucket):  # noqa: ANN001, ANN201 (DDP rejects string annotations on hooks)
    """DDP's default communication hook (divide by the world size, all-reduce the bucket), counting the bucket's
    bytes per parameter: GaLore-family matrices as "projected_matrices", the rest as "other_gradients".
    (group: the process group or None; bucket: a dist.GradBucket; returns DDP's future of the averaged bucket.)"""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    for param, grad in zip(bucket.parameters(), bucket.gradients()):
        TRAFFIC.add("projected_matrices" if param in TRAFFIC.projected_params else "other_gradients", grad)
    return allreduce_hook(group, bucket)
