"""Memory you can trust: measured peaks during training, and the estimator behind `galore-train memory`.

Units: every figure this module prints or logs is in GiB (2**30 bytes); the `*_gb` metric keys hold
GiB as well (the paper's tables and `torch.cuda` tools use the same binary unit).

Measured (MemoryMeter)
    CUDA: `torch.cuda.max_memory_allocated` per logging window (the allocator's own peak, reset at each
    read); weights and optimizer state are summed from their tensors.
    CPU: a TorchDispatchMode sees every tensor an operation returns. Each new storage is entered in a
    ledger with its size and a category, and a weak reference with a callback takes it out when the
    storage is freed, so the ledger always holds the live tensor bytes; peaks are kept per category
    and in total. Categories: the model's parameters and buffers are "weights"; a gradient becomes
    "grads" when autograd hands it to a parameter (a tensor hook on each parameter); tensors held
    by the optimizer are "optimizer_state" after each `optimizer.step()`; everything else (activations,
    temporaries, projected gradients) is "other". Not seen: scratch memory inside a kernel and
    tensors created outside `track()` that the model and optimizer do not own (e.g. the data batch).

Estimated (estimate_memory)
    From the model config alone (a meta-device model, so 7B is instant): weights, gradients (all, or
    the largest one with layer-wise updates), optimizer states in the exact layout of each optimizer
    of the registry, GaLore projection matrices, and activations from a documented per-token formula.
    `paper_table2()` reproduces the paper's Table 2 memory column; formulas in docs/memory.md.
"""

from __future__ import annotations

import io
import math
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.optim import Optimizer
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import LlamaConfig, LlamaForCausalLM

from galore_train.config import TrainConfig
from galore_train.errors import UserError
from galore_train.methods import METHOD_NAMES, base_optimizer_name, matrix_parameter_counts
from galore_train.model import load_model_config, target_linear_modules
from galore_train.optim.natural_galore import FISHER_HISTORY
from galore_train.optim.projector import PROJ_TYPES, GaLoreProjector
from galore_train.optim.quantize import QUANT_BITS, quantized_nbytes
from galore_train.optim.registry import GALORE_NAMES, OPTIMIZER_NAMES, resolve_optimizer_name

GIB = 2**30
CATEGORIES = ("weights", "grads", "optimizer_state", "other")


# ---------------------------------------------------------------------------------------------
# Measured memory
# ---------------------------------------------------------------------------------------------


@dataclass
class _Entry:
    nbytes: int
    category: str
    ref: weakref.ref


class StorageLedger:
    """Live bytes of every storage entered, by category, with running peaks."""

    def __init__(self) -> None:
        self._entries: dict[int, _Entry] = {}
        self.live = dict.fromkeys(CATEGORIES, 0)
        self.total = 0
        self.reset_peaks()

    def reset_peaks(self) -> None:
        self.peak = dict(self.live)
        self.peak_total = self.total

    def enter(self, tensor: torch.Tensor, category: str) -> None:
        """Count the tensor's storage under `category` (new storage) or note a size change."""
        storage = tensor.untyped_storage()
        entry = self._entries.get(id(storage))
        if entry is None:
            key = id(storage)
            ref = weakref.ref(storage, lambda _ref, key=key: self._free(key))
            entry = self._entries[key] = _Entry(0, category, ref)
        self._resize(entry, storage.nbytes())

    def label(self, tensor: torch.Tensor, category: str) -> None:
        """Move the tensor's storage to `category`, entering it first if it is new."""
        self.enter(tensor, category)
        entry = self._entries[id(tensor.untyped_storage())]
        if entry.category != category:
            self._add(entry.category, -entry.nbytes)
            entry.category = category
            self._add(category, entry.nbytes)

    def _resize(self, entry: _Entry, nbytes: int) -> None:
        change, entry.nbytes = nbytes - entry.nbytes, nbytes
        if change:
            self._add(entry.category, change)
            self.total += change
            self.peak_total = max(self.peak_total, self.total)

    def _add(self, category: str, change: int) -> None:
        self.live[category] += change
        self.peak[category] = max(self.peak[category], self.live[category])

    def _free(self, key: int) -> None:
        entry = self._entries.pop(key)
        self._add(entry.category, -entry.nbytes)
        self.total -= entry.nbytes


class _RecordOutputs(TorchDispatchMode):
    """Enter every tensor an ATen operation returns into the ledger (as 'other' when new)."""

    def __init__(self, ledger: StorageLedger) -> None:
        super().__init__()
        self.ledger = ledger

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 (torch signature)
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and leaf.device.type != "meta":
                self.ledger.enter(leaf, "other")
        return out


def optimizer_state_tensors(optimizer: Optimizer) -> Iterator[torch.Tensor]:
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                yield value


def unique_nbytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (shared storages counted once)."""
    storages = {id(t.untyped_storage()): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


class MemoryMeter:
    """Peak memory per logging window: wrap each training step in `track()`, log `read_and_reset()`.

    CUDA devices read the allocator's peak; any other device uses the storage ledger. `every=N`
    measures only every N-th step (the ledger's dispatch mode costs Python time per operation);
    windows without a measured step read as {}.
    """

    def __init__(self, model: nn.Module, optimizer: Optimizer, device: torch.device | str, *, every: int = 1) -> None:
        self.model, self.optimizer = model, optimizer
        self.device = torch.device(device)
        self.every = every
        self._calls = 0
        self._measured = False
        self._cuda = self.device.type == "cuda"
        self._tracking = False
        self._handles = []
        if not self._cuda:
            self.ledger = StorageLedger()
            self._handles = [p.register_hook(self._on_incoming_grad) for p in model.parameters() if p.requires_grad]
            self._handles.append(optimizer.register_step_post_hook(lambda *_: self._label_optimizer_state()))

    @contextmanager
    def track(self) -> Iterator[None]:
        """Measure the memory of the enclosed block (one training step)."""
        self._calls += 1
        if (self._calls - 1) % self.every:
            yield
            return
        self._measured = True
        if self._cuda:
            yield
            return
        self._label_known_tensors()
        self._tracking = True
        try:
            with _RecordOutputs(self.ledger):
                yield
        finally:
            self._tracking = False

    def read_and_reset(self) -> dict[str, float]:
        """Peaks (GiB) since the last read: peak_memory_gb and peak_<category>_gb."""
        if not self._measured:
            return {}
        self._measured = False
        if self._cuda:
            return self._read_cuda()
        reading = {"peak_memory_gb": self.ledger.peak_total / GIB}
        reading.update({f"peak_{name}_gb": self.ledger.peak[name] / GIB for name in CATEGORIES})
        self.ledger.reset_peaks()
        return reading

    def remove(self) -> None:
        """Detach the gradient and optimizer hooks (before replacing the optimizer)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _read_cuda(self) -> dict[str, float]:
        peak = torch.cuda.max_memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        weights = unique_nbytes([*self.model.parameters(), *self.model.buffers()])
        return {
            "peak_memory_gb": peak / GIB,
            "peak_weights_gb": weights / GIB,
            "peak_optimizer_state_gb": unique_nbytes(optimizer_state_tensors(self.optimizer)) / GIB,
        }

    def _label_known_tensors(self) -> None:
        """Enter what existed before this step: weights, any gradients, optimizer state."""
        for tensor in [*self.model.parameters(), *self.model.buffers()]:
            self.ledger.label(tensor, "weights")
        for p in self.model.parameters():
            if p.grad is not None:
                self.ledger.label(p.grad, "grads")
        self._label_optimizer_state()

    def _on_incoming_grad(self, grad: torch.Tensor) -> None:
        # Runs before autograd stores the gradient in .grad (it usually keeps this very tensor),
        # and before any post-accumulate hook, so layer-wise updates cannot hide it.
        if self._tracking:
            self.ledger.label(grad, "grads")

    def _label_optimizer_state(self) -> None:
        if self._tracking:
            for tensor in optimizer_state_tensors(self.optimizer):
                self.ledger.label(tensor, "optimizer_state")


# ---------------------------------------------------------------------------------------------
# Estimated memory (pure: model config + options, nothing allocated)
# ---------------------------------------------------------------------------------------------

DTYPE_BYTES = {"bf16": 2, "fp32": 4}
EIGHTBIT_MIN_SIZE = 4096  # bitsandbytes and GaLoreAdamW8bit keep smaller tensors' moments unquantized
EIGHTBIT_BLOCK = 256  # values per fp32 absmax of the 8-bit block-wise moments
EIGHTBIT_MAPS_BYTES = 2 * 256 * 4  # bitsandbytes' two shared 256-entry fp32 quantization maps
TORCH_STEP_BYTES = 4  # torch.optim Adam/AdamW keep `step` as a float32 tensor per parameter


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of one training configuration, by part.

    `total` adds every part. `peak` models the step's high-water mark: activations are largest at the
    start of the backward pass, before any gradient exists, and gradients at its end, after the
    activations are freed, so only the larger of the two counts (the CPU bench confirms it).
    """

    label: str
    weights: int
    gradients: int
    optimizer_states: int
    projections: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer_states + self.projections + self.activations

    @property
    def peak(self) -> int:
        return self.weights + self.optimizer_states + self.projections + max(self.gradients, self.activations)

    def render(self) -> str:
        return render_text(memory_table(self))


@dataclass(frozen=True)
class _Tensor:
    """A parameter-shaped tensor of the estimate: `trainable` ones get gradients and optimizer state;
    `moment_shape` is the shape the optimizer keeps moments in (the low-rank one under GaLore)."""

    shape: tuple[int, ...]
    trainable: bool = True
    moment_shape: tuple[int, ...] | None = None
    projections: tuple[int, ...] = ()  # elements of each GaLore projection matrix

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _parameter_shapes(model_config: LlamaConfig, targets: Iterable[str]) -> list[tuple[tuple[int, ...], bool]]:
    """(shape, is_target_weight) for every parameter of the LLaMA model, built on the meta device."""
    with torch.device("meta"):
        model = LlamaForCausalLM(model_config)
    target_weights = {f"{name}.weight" for name in target_linear_modules(model, targets)}
    return [(tuple(p.shape), name in target_weights) for name, p in model.named_parameters()]


def _galore_tensor(shape: tuple[int, ...], rank: int, proj_type: str) -> _Tensor:
    """A target weight under GaLore: moments of the projected gradient, projection matrices by side."""
    m, n = shape
    side = GaLoreProjector(rank, 1, proj_type).side(shape)
    moments = {"left": (rank, n), "right": (m, rank), "full": (rank, rank)}[side]
    projections = {"left": (m * rank,), "right": (rank * n,), "full": (m * rank, rank * n)}[side]
    return _Tensor(shape, moment_shape=moments, projections=projections)


def _method_tensors(method: str, shape: tuple[int, ...], rank: int) -> list[_Tensor]:
    """A target weight under LoRA/ReLoRA/low-rank: the frozen dense weight (if kept) and two factors."""
    m, n = shape
    counts = matrix_parameter_counts(method, m, n, rank)
    frozen = counts.stored - counts.trainable
    return ([_Tensor((frozen,), trainable=False)] if frozen else []) + [_Tensor((rank, n)), _Tensor((m, rank))]


def _adam_moments_8bit(numel: int, unquantized_bytes: int) -> int:
    """Two Adam moments, block-wise 8-bit (uint8 + one fp32 absmax per block) from the size threshold on."""
    if numel < EIGHTBIT_MIN_SIZE:
        return 2 * numel * unquantized_bytes
    return 2 * numel + 2 * 4 * -(-numel // EIGHTBIT_BLOCK)


def _natural_history_bytes(numel: int, e: int, fisher_history: int) -> int:
    """Natural GaLore's per-matrix history: `fisher_history` low-rank gradients and their float64 Gram matrix."""
    return fisher_history * numel * e + fisher_history**2 * 8 if fisher_history else 0


def _optimizer_state_bytes(optimizer: str, tensors: list[_Tensor], e: int, beta1: float | None, fisher_history: int) -> int:
    """Bytes the optimizer holds for these tensors (projections apart): the layouts of torch.optim,
    bitsandbytes and galore_train.optim, element for element (tests compare them with real states)."""
    trainable = [t for t in tensors if t.trainable]
    moment_shapes = [t.moment_shape or t.shape for t in trainable]
    total = 0
    for t, shape in zip(trainable, moment_shapes):
        numel = math.prod(shape)
        if optimizer in ("adamw", "adam"):  # torch.optim
            total += 2 * numel * e + TORCH_STEP_BYTES
        elif optimizer == "adam8bit":  # bitsandbytes AdamW8bit: fp32 moments below the threshold
            total += _adam_moments_8bit(numel, 4)
        elif optimizer == "galore_adamw":
            total += 2 * numel * e
        elif optimizer == "natural_galore_adamw":  # the Fisher history is kept for GaLore matrices only
            total += 2 * numel * e + (_natural_history_bytes(numel, e, fisher_history) if t.moment_shape else 0)
        elif optimizer == "galore_adamw8bit":  # moments in the gradient's dtype below the threshold
            total += _adam_moments_8bit(numel, e)
        elif optimizer in ("adafactor", "galore_adafactor"):  # fp32, factored second moment for matrices
            second = sum(shape) if len(shape) == 2 else numel
            total += 4 * (second + (numel if beta1 is not None else 0))
        else:
            raise ValueError(f"no state layout for optimizer {optimizer!r}")
    if optimizer == "adam8bit" and any(math.prod(shape) >= EIGHTBIT_MIN_SIZE for shape in moment_shapes):
        total += EIGHTBIT_MAPS_BYTES
    return total


def activation_bytes(model_config: LlamaConfig, *, dtype_bytes: int, batch_size: int, max_length: int, checkpointing: bool) -> int:
    """Peak activation bytes of one micro-batch (HF LLaMA, SDPA attention), per token:

        layer = 2 (4h + e h + 4) + e (6h + 4i) + 4a     two RMSNorms (fp32 internals), q/k/v/RoPE/
                                                         attention output, SwiGLU; a fp32 logsumexp per head
        head  = 12 V + 16 h                             fp32 log-probabilities and, at the start of the
                                                         backward, two fp32 vocabulary-sized gradients
        peak  = L layer + head                          (layers saved for backward, then the loss backward)
        with activation checkpointing: L e h + max(layer, head)   (layer inputs, then one recomputed layer)

    with h hidden, i intermediate, a heads, V vocabulary, L layers, e bytes per element. Fitted to, and
    checked against, the CPU MemoryMeter (see docs/memory.md); the logits are assumed not kept.
    """
    h, i = model_config.hidden_size, model_config.intermediate_size
    heads, vocab, layers = model_config.num_attention_heads, model_config.vocab_size, model_config.num_hidden_layers
    e = dtype_bytes
    layer = 2 * (4 * h + e * h + 4) + e * (6 * h + 4 * i) + 4 * heads
    head = 12 * vocab + 16 * h
    per_token = layers * e * h + max(layer, head) if checkpointing else layers * layer + head
    return batch_size * max_length * per_token


def _projection_bytes(numel: int, e: int, proj_bits: int, group_size: int) -> int:
    """One projection matrix: in the gradient's dtype, or quantized codes + fp32 group scales."""
    return numel * e if proj_bits == 32 else quantized_nbytes(numel, proj_bits, group_size)


def estimate_memory(
    model_config: LlamaConfig,
    optimizer: str,
    rank: int,
    *,
    eightbit: bool = False,
    layerwise: bool = False,
    dtype: str = "bf16",
    batch_size: int = 1,
    max_length: int = 256,
    activation_checkpointing: bool = False,
    galore_targets: Iterable[str] = ("attn", "mlp"),
    proj_type: str = "std",
    proj_bits: int = 32,
    proj_group_size: int = 256,
    beta1: float | None = None,
    fisher_history: int = FISHER_HISTORY,
) -> MemoryEstimate:
    """Memory of training `model_config` with `optimizer` (a --optimizer name: optimizer or method).

    Weights, gradients and activations are in `dtype`; optimizer states follow each optimizer's real
    layout; GaLore projection matrices are stored in the gradient's dtype, or group-wise quantized
    with `proj_bits` 8 or 4. `beta1` matters for Adafactor only (its optional first moment),
    `fisher_history` for natural_galore_adamw only.
    """
    if dtype not in DTYPE_BYTES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPE_BYTES)} for the estimate; got {dtype!r}")
    if proj_type not in PROJ_TYPES:
        raise UserError(f"--proj-type must be one of {', '.join(PROJ_TYPES)}; got {proj_type!r}")
    if proj_bits not in QUANT_BITS + (32,) or proj_group_size <= 0:
        raise UserError(f"--proj-bits must be 4, 8 or 32 and --proj-group-size positive; got {proj_bits}, {proj_group_size}")
    e = DTYPE_BYTES[dtype]
    method = optimizer if optimizer in METHOD_NAMES else None
    name = resolve_optimizer_name(base_optimizer_name(TrainConfig(optimizer=optimizer)) if method else optimizer, eightbit)
    galore = name in GALORE_NAMES
    tensors: list[_Tensor] = []
    for shape, is_target in _parameter_shapes(model_config, list(galore_targets)):
        if is_target and (galore or method) and rank >= min(shape):
            raise UserError(f"--rank {rank} is not below min{shape} of a target matrix; lower --rank")
        if is_target and galore:
            tensors.append(_galore_tensor(shape, rank, proj_type))
        elif is_target and method:
            tensors.extend(_method_tensors(method, shape, rank))
        else:
            tensors.append(_Tensor(shape))
    trainable = [t.numel * e for t in tensors if t.trainable]
    label = [f"{method or name} rank {rank}" if galore or method else name, dtype]
    label += ["layer-wise"] if layerwise else []
    label += ["activation checkpointing"] if activation_checkpointing else []
    return MemoryEstimate(
        label=", ".join(label + [f"batch {batch_size}x{max_length}"]),
        weights=sum(t.numel for t in tensors) * e,
        gradients=max(trainable) if layerwise else sum(trainable),
        optimizer_states=_optimizer_state_bytes(name, tensors, e, beta1, fisher_history),
        projections=sum(_projection_bytes(n, e, proj_bits, proj_group_size) for t in tensors for n in t.projections),
        activations=activation_bytes(model_config, dtype_bytes=e, batch_size=batch_size, max_length=max_length,
                                     checkpointing=activation_checkpointing),
    )


# ---------------------------------------------------------------------------------------------
# The paper's Table 2, and tables for the CLI
# ---------------------------------------------------------------------------------------------

# GaLore paper, Table 2: model -> (rank, Full GB, GaLore GB): weights + optimizer states in BF16.
PAPER_TABLE2 = {
    "llama_60m": (128, 0.36, 0.24),
    "llama_130m": (256, 0.76, 0.52),
    "llama_350m": (256, 2.06, 1.22),
    "llama_1b": (512, 7.80, 4.38),
}
COMPARE_OPTIMIZERS = OPTIMIZER_NAMES + METHOD_NAMES


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
        rows.append(Table2Row(model, rank, weights_and_states(full) / GIB, paper_full,
                              weights_and_states(galore) / GIB, paper_galore, galore.projections / GIB))
    return rows


def paper_table2() -> Table:
    """Table 2's memory column reproduced, with the deviation of each cell."""
    table = Table(title="GaLore paper, Table 2: weights + optimizer states, BF16 (GiB)")
    for column in ("model", "rank", "Full", "paper", "dev", "GaLore", "paper", "dev", "+ projections"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in table2_rows():
        table.add_row(row.model, str(row.rank), f"{row.full:.2f}", f"{row.paper_full:.2f}", f"{row.full_deviation:+.1%}",
                      f"{row.galore:.2f}", f"{row.paper_galore:.2f}", f"{row.galore_deviation:+.1%}",
                      f"{row.galore + row.galore_projections:.2f}")
    return table


def memory_table(estimate: MemoryEstimate, title: str | None = None) -> Table:
    """One configuration, part by part."""
    table = Table(title=title or estimate.label, min_width=60)
    table.add_column("part")
    table.add_column("GiB", justify="right")
    parts = [("weights", estimate.weights), ("gradients", estimate.gradients),
             ("optimizer states", estimate.optimizer_states), ("projection matrices", estimate.projections),
             ("activations (estimated)", estimate.activations)]
    for name, nbytes in parts:
        table.add_row(name, f"{nbytes / GIB:.3f}")
    table.add_row("total (sum of parts)", f"{estimate.total / GIB:.3f}")
    table.add_row("peak (gradients or activations)", f"{estimate.peak / GIB:.3f}", style="bold")
    return table


def compare_table(model_config: LlamaConfig, rank: int, *, title: str = "", **options: object) -> Table:
    """Every optimizer and method side by side for one model (a Table 2 style row each);
    `options` are estimate_memory's keywords (layerwise, dtype, batch_size, ...)."""
    table = Table(title=title or None)
    for column in ("optimizer", "weights", "gradients", "states", "projections", "activations", "total", "peak", "weights+states"):
        table.add_column(column, justify="left" if column == "optimizer" else "right")
    for name in COMPARE_OPTIMIZERS:
        estimate = estimate_memory(model_config, name, rank, **options)
        parts = (estimate.weights, estimate.gradients, estimate.optimizer_states, estimate.projections,
                 estimate.activations, estimate.total, estimate.peak, weights_and_states(estimate))
        table.add_row(name, *(f"{nbytes / GIB:.2f}" for nbytes in parts))
    return table


def render_text(table: Table) -> str:
    """A rich table as plain text (logs, docs, tests)."""
    console = Console(file=io.StringIO(), width=140, color_system=None)
    console.print(table)
    return console.file.getvalue()
