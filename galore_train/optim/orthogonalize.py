"""Muon's orthogonalisation (Newton-Schulz) and, with several processes, which process computes it.

`newton_schulz` is the quintic iteration of Jordan et al. (2024) with their coefficients, in bfloat16, as
torch.optim.Muon computes it (the same operations in the same order, so MuonAdamW equals torch's Muon bit for
bit: tests/test_muon_reference.py), except that it never writes into its input.

Data parallelism: every process holds the same averaged gradient, so without sharing each one would run the
same Newton-Schulz on every matrix (5 iterations of three matmuls on the whole matrix: Muon's main cost).
`SharedOrthogonalization` gives each matrix an owner (round-robin over the Muon matrices in optimizer order,
`refresh_owners`, the rule GaLore's shared refresh uses: with LLaMA's seven matrices per layer in order, every
process gets the same count and nearly the same work); only the owner orthogonalises it and the result reaches
the others. The matrices of a step are taken in buckets of at most `BUCKET_BYTES` of results, so a collective
carries a bucket's worth of matrices, not one, and at most one bucket's results are alive beyond the weights:

* DDP (whole matrices on every process): in each bucket, every owner orthogonalises its matrices, then each
  owner broadcasts them as one flat bfloat16 buffer (one broadcast per owner and bucket);
* FSDP2 (row shards, row_shards.py): the owner needs the whole momentum of its matrices, so each process sends
  its rows of an owner's matrices to it in one gather (rows padded to torch.chunk's block, as `gather_rows`
  does), the owner orthogonalises, and one scatter hands every process its rows of the result. The momentum
  itself stays sharded: each process keeps only its rows (docs/distributed.md).

Layer-wise updates step one matrix per gradient hook, in the same order on every process: a bucket of one,
whose owner computes and sends it; the work is divided, not parallel (as for GaLore's refresh, refresh_sharing).

`calls` counts the Newton-Schulz runs of this process (tests read it: matrices / processes per step).
The results' bytes are counted as "orthogonalized" in traffic.py (a broadcast on its source, a gather's rows on
each sender, a scatter's rows for the others on its source).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from galore_train.optim import traffic
from galore_train.optim.refresh_sharing import refresh_owners
from galore_train.optim.row_shards import is_row_sharded

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic (torch.optim.Muon's defaults)
NS_STEPS = 5
NS_EPS = 1e-7
ORTHOGONAL_DTYPE = torch.bfloat16  # what newton_schulz returns, whatever it is given
BUCKET_BYTES = 2**26  # 64 MiB of results per bucket: 32M values, e.g. two 4096 x 4096 matrices of 7B


def newton_schulz(matrix: Tensor, coefficients: Sequence[float], steps: int, eps: float) -> Tensor:
    """An approximately orthogonal matrix with `matrix`'s singular vectors (U S' V^T, S' near 1), in bfloat16."""
    a, b, c = coefficients
    x = matrix.bfloat16()
    tall = matrix.size(0) > matrix.size(1)
    if tall:
        x = x.T
    x = x.div(x.norm().clamp(min=eps))  # spectral norm at most 1 (not in place: bfloat16() may return `matrix`)
    for _ in range(steps):
        gram = x @ x.T
        gram_update = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, gram_update, x, beta=a)
    return x.T if tall else x


@dataclass(frozen=True)
class Orthogonalize:
    """One matrix to orthogonalise this step: its momentum update (whole, or this process's rows under FSDP2)."""

    param: Tensor
    update: Tensor
    group: dict[str, Any]


class Orthogonalization:
    """Every matrix orthogonalised here (one process; or data-parallel processes each repeating all of them)."""

    def __init__(self) -> None:
        self.calls = 0

    def run(self, items: Sequence[Orthogonalize]) -> list[Tensor]:
        """Each item's orthogonalised update, shaped like its `update` (collective where shared)."""
        return [self._compute(item.update, item.group) for item in items]

    def _compute(self, whole: Tensor, group: dict[str, Any]) -> Tensor:
        self.calls += 1
        return newton_schulz(whole, group["ns_coefficients"], group["ns_steps"], group["eps"])


def buckets(items: Sequence[Orthogonalize], limit: int = BUCKET_BYTES) -> list[list[Orthogonalize]]:
    """`items` in order, cut into runs whose whole results take at most `limit` bytes (at least one item each)."""
    out: list[list[Orthogonalize]] = []
    size = limit
    for item in items:
        nbytes = item.param.numel() * ORTHOGONAL_DTYPE.itemsize
        if size + nbytes > limit:
            out.append([])
            size = 0
        out[-1].append(item)
        size += nbytes
    return out


class SharedOrthogonalization(Orthogonalization):
    """Owner-computed orthogonalisation over a process group (see the module docstring). Ownership is fixed at
    construction over `params` in the order given (the optimizer's); every process must call `run` with the same
    matrices in the same order."""

    def __init__(self, params: Sequence[Tensor], group: Optional[dist.ProcessGroup] = None) -> None:
        super().__init__()
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.owner = dict(zip(params, refresh_owners(len(params), self.world)))

    def run(self, items: Sequence[Orthogonalize]) -> list[Tensor]:
        return [result for bucket in buckets(items) for result in self._bucket(bucket)]

    def _bucket(self, bucket: list[Orthogonalize]) -> list[Tensor]:
        by_owner = {
            rank: [i for i, item in enumerate(bucket) if self.owner[item.param] == rank] for rank in range(self.world)
        }
        by_owner = {rank: indices for rank, indices in by_owner.items() if indices}
        if is_row_sharded(bucket[0].param):
            wholes = self._gather(bucket, by_owner)
            mine = [self._compute(wholes[i], bucket[i].group) for i in by_owner.get(self.rank, [])]
            return self._scatter(bucket, by_owner, mine)
        mine = [self._compute(bucket[i].update, bucket[i].group) for i in by_owner.get(self.rank, [])]
        return self._broadcast(bucket, by_owner, mine)

    def _broadcast(
        self, bucket: list[Orthogonalize], by_owner: dict[int, list[int]], mine: list[Tensor]
    ) -> list[Tensor]:
        """DDP: each owner's results to every process, one flat buffer per owner."""
        results: list[Optional[Tensor]] = [None] * len(bucket)
        works = []
        for owner, indices in by_owner.items():
            shapes = [bucket[i].update.shape for i in indices]
            if owner == self.rank:
                flat = torch.cat([result.reshape(-1) for result in mine])
            else:
                size = sum(shape.numel() for shape in shapes)
                flat = torch.empty(size, dtype=ORTHOGONAL_DTYPE, device=bucket[indices[0]].update.device)
            works.append(traffic.broadcast(flat, self._global(owner), "orthogonalized", self.group, async_op=True))
            for i, part, shape in zip(indices, flat.split([shape.numel() for shape in shapes]), shapes):
                results[i] = part.view(shape)
        for work in works:
            work.wait()
        return results

    def _gather(self, bucket: list[Orthogonalize], by_owner: dict[int, list[int]]) -> dict[int, Tensor]:
        """FSDP2: the whole momentum update of each matrix this process owns, from every process's rows (one
        gather per owner)."""
        received, works = {}, []
        for owner, indices in by_owner.items():
            flat = torch.cat([self._padded(bucket[i]).reshape(-1) for i in indices])
            blocks = [torch.empty_like(flat) for _ in range(self.world)] if owner == self.rank else None
            works.append(traffic.gather(flat, blocks, self._global(owner), "orthogonalized", self.group))
            received[owner] = blocks
        for work in works:
            work.wait()
        wholes = {}
        if self.rank in by_owner:
            indices, blocks = by_owner[self.rank], received[self.rank]
            sizes = [self._chunk(bucket[i]) * bucket[i].param.shape[1] for i in indices]
            parts = [block.split(sizes) for block in blocks]  # [process][matrix]
            for position, i in enumerate(indices):
                rows = torch.cat([part[position].view(-1, bucket[i].param.shape[1]) for part in parts])
                wholes[i] = rows[: bucket[i].param.shape[0]]
        return wholes

    def _scatter(self, bucket: list[Orthogonalize], by_owner: dict[int, list[int]], mine: list[Tensor]) -> list[Tensor]:
        """FSDP2: every process's rows of each owner's results (one scatter per owner)."""
        results: list[Optional[Tensor]] = [None] * len(bucket)
        works = []
        for owner, indices in by_owner.items():
            chunks = [self._chunk(bucket[i]) for i in indices]
            widths = [bucket[i].param.shape[1] for i in indices]
            flat = torch.empty(
                sum(c * w for c, w in zip(chunks, widths)),
                dtype=ORTHOGONAL_DTYPE,
                device=bucket[indices[0]].update.device,
            )
            blocks = None
            if owner == self.rank:
                padded = [self._pad_rows(result, chunk * self.world) for result, chunk in zip(mine, chunks)]
                blocks = [
                    torch.cat([p[k * c : (k + 1) * c].reshape(-1) for p, c in zip(padded, chunks)])
                    for k in range(self.world)
                ]
            works.append(traffic.scatter(flat, blocks, self._global(owner), "orthogonalized", self.group))
            for i, part, width in zip(indices, flat.split([c * w for c, w in zip(chunks, widths)]), widths):
                results[i] = part.view(-1, width)[: bucket[i].update.shape[0]]
        for work in works:
            work.wait()
        return results

    def _chunk(self, item: Orthogonalize) -> int:
        """The rows of each process's block (torch.chunk's: the last processes may hold fewer)."""
        return -(-item.param.shape[0] // self.world)

    def _padded(self, item: Orthogonalize) -> Tensor:
        return self._pad_rows(item.update, self._chunk(item))

    @staticmethod
    def _pad_rows(t: Tensor, rows: int) -> Tensor:
        missing = rows - t.shape[0]
        return (torch.cat([t, t.new_zeros(missing, *t.shape[1:])]) if missing else t).contiguous()

    def _global(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)
