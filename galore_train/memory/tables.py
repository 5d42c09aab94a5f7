"""The tables `galore-train memory` prints: one setup part by part, every optimizer side by side, and the
GaLore paper's Table 2 memory column reproduced by the estimator (memory/estimate.py), with deviations. GiB."""

from __future__ import annotations

import io
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table
from transformers import LlamaConfig

from galore_train.memory.estimate import MemoryEstimate, estimate_memory
from galore_train.memory.meter import GIB
from galore_train.model import load_model_config
from galore_train.registry import FSDP_NAMES, MOMENTS_NAMES, OPTIMIZERS
from galore_train.weights.options import accumulates_projected

# GaLore paper, Table 2: model -> (rank, Full GB, GaLore GB): weights + optimizer states in BF16.
PAPER_TABLE2 = {
    "llama_60m": (128, 0.36, 0.24),
    "llama_130m": (256, 0.76, 0.52),
    "llama_350m": (256, 2.06, 1.22),
    "llama_1b": (512, 7.80, 4.38),
}


def weights_and_states(estimate: MemoryEstimate) -> int:
    """Table 2's quantity: weights + optimizer states (moments; projection matrices are their own part)."""
    return estimate.weights + estimate.optimizer_states


@dataclass(frozen=True)
class Table2Row:
    model: str
    rank: int
    full: float  # GiB, ours
    paper_full: float
    galore: float
    paper_galore: float
    galore_projections: float  # GiB of GaLore's projection matrices, not in the paper's cell

    @property
    def full_deviation(self) -> float:
        return self.full / self.paper_full - 1

    @property
    def galore_deviation(self) -> float:
        return self.galore / self.paper_galore - 1


def table2_rows() -> list[Table2Row]:
    """Our Table 2 cells (BF16, GiB) next to the paper's: one formula for every cell."""
    rows = []
    for model, (rank, paper_full, paper_galore) in PAPER_TABLE2.items():
        config = load_model_config(model)
        full = estimate_memory(config, "adamw", rank, dtype="bf16")
        galore = estimate_memory(config, "galore_adamw", rank, dtype="bf16")
        rows.append(
            Table2Row(
                model,
                rank,
                weights_and_states(full) / GIB,
                paper_full,
                weights_and_states(galore) / GIB,
                paper_galore,
                galore.projections / GIB,
            )
        )
    return rows


def paper_table2() -> Table:
    """Table 2's memory column reproduced, with the deviation of each cell."""
    table = Table(title="GaLore paper, Table 2: weights + optimizer states, BF16 (GiB)")
    for column in ("model", "rank", "Full", "paper", "dev", "GaLore", "paper", "dev", "+ projections"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in table2_rows():
        table.add_row(
            row.model,
            str(row.rank),
            f"{row.full:.2f}",
            f"{row.paper_full:.2f}",
            f"{row.full_deviation:+.1%}",
            f"{row.galore:.2f}",
            f"{row.paper_galore:.2f}",
            f"{row.galore_deviation:+.1%}",
            f"{row.galore + row.galore_projections:.2f}",
        )
    return table


def memory_table(estimate: MemoryEstimate, title: str | None = None) -> Table:
    """One configuration, part by part."""
    table = Table(title=title or estimate.label, min_width=60)
    table.add_column("part")
    table.add_column("GiB", justify="right")
    parts = [
        ("weights", estimate.weights),
        ("gradients", estimate.gradients),
        ("optimizer states", estimate.optimizer_states),
        ("projection matrices", estimate.projections),
        ("activations (estimated)", estimate.activations),
    ]
    parts += [("FSDP unsharded units", estimate.distributed)] if estimate.distributed else []
    parts += [("one dequantized INT8 matrix / fp32 update copy", estimate.dequantized)] if estimate.dequantized else []
    for name, nbytes in parts:
        table.add_row(name, f"{nbytes / GIB:.3f}")
    table.add_row("total (sum of parts)", f"{estimate.total / GIB:.3f}")
    held = "accumulation" if estimate.accumulating else "DDP's buckets"
    both = f"and activations: {held}" if estimate.gradients_held else "or activations"
    table.add_row(f"peak (gradients {both})", f"{estimate.peak / GIB:.3f}", style="bold")
    return table


def compare_table(model_config: LlamaConfig, rank: int, *, title: str = "", **options: object) -> Table:
    """Every optimizer and method side by side for one model (a Table 2 style row each; under FSDP those
    that run sharded); `options` are estimate_memory's keywords (layerwise, dtype, batch_size, ...);
    --moments-dtype applies to the rows that take it, the others keep their moments as they are."""
    table = Table(title=title or None)
    distributed = options.get("nproc", 1) > 1
    sharded = distributed and options.get("distributed") == "fsdp"
    columns = (
        "optimizer",
        "weights",
        "gradients",
        "states",
        "projections",
        "activations",
        *(["ddp/fsdp"] if distributed else []),
        "total",
        "peak",
        "weights+states",
    )
    for column in columns:
        table.add_column(column, justify="left" if column == "optimizer" else "right")
    for name in FSDP_NAMES if sharded else OPTIMIZERS:
        moments = {} if name in MOMENTS_NAMES else {"moments_dtype": "param"}
        side = {"proj_type": "right"} if sharded and OPTIMIZERS[name].galore else {}  # GaLore on FSDP row shards
        estimate = estimate_memory(
            model_config, name, rank, **{**options, **moments, **side, **_weights(name, options)}
        )
        parts = (
            estimate.weights,
            estimate.gradients,
            estimate.optimizer_states,
            estimate.projections,
            estimate.activations,
            *([estimate.distributed] if distributed else []),
            estimate.total,
            estimate.peak,
            weights_and_states(estimate),
        )
        used = OPTIMIZERS[name].rank_used(rank)
        table.add_row(name if used == rank else f"{name} (rank {used})", *(f"{nbytes / GIB:.2f}" for nbytes in parts))
    return table


def _weights(name: str, options: dict[str, object]) -> dict[str, bool]:
    """A compare row's weight options: methods replace the dense weights (no INT8), and the optimizers that read
    the full gradient accumulate it (no projected accumulation)."""
    return {
        "int8_weights": bool(options.get("int8_weights")) and not OPTIMIZERS[name].is_method,
        "accumulate_projected": bool(options.get("accumulate_projected")) and accumulates_projected(name),
    }


def render_text(table: Table) -> str:
    """A rich table as plain text (logs, docs, tests)."""
    console = Console(file=io.StringIO(), width=140, color_system=None)
    console.print(table)
    return console.file.getvalue()
