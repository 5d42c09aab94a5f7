"""Estimated gradient traffic per optimizer step under DDP: full all-reduce vs low-rank sync (`galore-train memory
--comm`). The training run counts the same bytes from the collectives it issues (`comm_bytes` in metrics.jsonl,
optim/traffic.py); this is the same accounting from the model config alone, so 7B is instant.

Per GPU and step, in the payload bytes each process hands its collectives (a ring all-reduce moves about
2 (N-1)/N times that over each link; the count is the same whatever N):
  full              every gradient, m x n per matrix, in the gradient dtype (DDP's buckets);
  low-rank sync     GaLore matrices: R (r x n or m x r, or r x r two-sided) between refreshes, m x n at each
                    refresh (every gap-th step); other parameters in full, as before; plus shared refresh's
                    broadcasts of the new float32 singular vectors and a 4-integer header, sent by each matrix's
                    owner (so 1/N of them per GPU), every gap-th step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

from rich.table import Table
from transformers import LlamaConfig

from galore_train.errors import UserError
from galore_train.memory.estimate import DTYPE_BYTES, parameter_shapes
from galore_train.memory.meter import GIB
from galore_train.optim.projector import GaLoreProjector
from galore_train.registry import OPTIMIZERS, resolve_optimizer_name

HEADER_BYTES = 4 * 8  # shared refresh's header per refreshed matrix: 4 int64


@dataclass(frozen=True)
class CommEstimate:
    """Bytes per GPU and optimizer step."""

    label: str
    matrices_full: int  # GaLore matrices' gradients, all-reduced in full
    matrices_low_rank: int  # their R, between refreshes
    others: int  # every other gradient (the same in both modes)
    refresh_broadcasts: int  # one GPU's share of one refresh of every matrix (singular vectors and headers)
    gap: int

    @property
    def full(self) -> int:
        return self.matrices_full + self.others

    @property
    def low_rank_between(self) -> int:
        """A step without refresh."""
        return self.matrices_low_rank + self.others

    @property
    def matrices_average(self) -> float:
        """GaLore matrices averaged over a refresh interval: one step in gap moves them in full and broadcasts."""
        return (self.matrices_full + (self.gap - 1) * self.matrices_low_rank + self.refresh_broadcasts) / self.gap

    @property
    def low_rank_average(self) -> float:
        return self.matrices_average + self.others


def estimate_comm(
    model_config: LlamaConfig,
    optimizer: str,
    rank: int,
    *,
    nproc: int,
    gap: int,
    eightbit: bool = False,
    dtype: str = "bf16",
    proj_type: str = "std",
    galore_targets: Iterable[str] = ("attn", "mlp"),
) -> CommEstimate:
    """Gradient traffic of `model_config` trained with GaLore-family `optimizer` on `nproc` DDP processes."""
    name = resolve_optimizer_name(optimizer, eightbit)
    if not OPTIMIZERS[name].reads_only_r:
        raise UserError(
            f"--comm estimates low-rank gradient sync, which {name} cannot use (it reads the full gradient)"
        )
    if nproc < 2:
        raise UserError("--comm needs --nproc 2 or more (one process sends nothing)")
    dtype = "bf16" if dtype == "auto" else dtype  # as `memory` estimates it: the GPU case
    e = DTYPE_BYTES[dtype]
    projector = GaLoreProjector(rank, gap, proj_type)
    matrices_full = matrices_low = others = broadcasts = 0
    for _, shape, is_target in parameter_shapes(model_config, list(galore_targets)):
        if not is_target:
            others += math.prod(shape) * e
            continue
        matrices_full += math.prod(shape) * e
        matrices_low += math.prod(projector.low_rank_shape(shape)) * e
        vectors = sum(math.prod(s) for s in projector.stored_shapes(shape).values())
        broadcasts += vectors * 4 + HEADER_BYTES
    label = f"{name} rank {rank}, refresh every {gap} steps, DDP on {nproc} GPUs, {dtype}: gradient bytes per GPU"
    return CommEstimate(label, matrices_full, matrices_low, others, -(-broadcasts // nproc), gap)


def comm_table(estimate: CommEstimate) -> Table:
    table = Table(title=estimate.label)
    for column in ("per step", "full all-reduce", "low-rank sync", "ratio"):
        table.add_column(column, justify="left" if column == "per step" else "right")
    rows = [
        ("GaLore matrices, between refreshes", estimate.matrices_full, estimate.matrices_low_rank),
        (f"GaLore matrices, averaged over {estimate.gap} steps", estimate.matrices_full, estimate.matrices_average),
        ("other parameters", estimate.others, estimate.others),
        ("all gradients, between refreshes", estimate.full, estimate.low_rank_between),
        (f"all, averaged over {estimate.gap} steps (with refreshes)", estimate.full, estimate.low_rank_average),
    ]
    for name, full, low in rows:
        table.add_row(name, f"{full / GIB:.3f} GiB", f"{low / GIB:.3f} GiB", f"{full / low:.2f}x")
    return table
