"""Measured memory: peaks per logging window during training (MemoryMeter).

Units: every figure is in GiB (2**30 bytes); the `*_gb` metric keys hold GiB as well (the paper's tables
and `torch.cuda` tools use the same binary unit).

    CUDA: `torch.cuda.max_memory_allocated` per logging window (the allocator's own peak, reset at each
    read, at start and around evaluations) and `max_memory_reserved` beside it; weights and optimizer state
    are summed from their tensors.
    CPU: a TorchDispatchMode sees every tensor an operation returns. Each new storage is entered in a
    ledger with its size and a category, and a weak reference with a callback takes it out when the
    storage is freed, so the ledger always holds the live tensor bytes; peaks are kept per category
    and in total. Categories: the model's parameters and buffers are "weights"; a gradient becomes
    "grads" when autograd hands it to a parameter (a tensor hook on each parameter); tensors held
    by the optimizer are "optimizer_state" after each `optimizer.step()`; everything else (activations,
    temporaries, projected gradients) is "other". Not seen: scratch memory inside a kernel and
    tensors created outside `track()` that the model and optimizer do not own (e.g. the data batch).

The estimate of the same quantities from a model config alone is galore_train/memory/estimate.py.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
from torch import nn
from torch.optim import Optimizer
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

GIB = 2**30
CATEGORIES = ("weights", "grads", "optimizer_state", "other")


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


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """FSDP2's DTensor: this rank's shard, whose storage is the memory it holds (the wrapper's is not)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def optimizer_state_tensors(optimizer: Optimizer) -> Iterator[torch.Tensor]:
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                yield local_tensor(value)


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
        self._carried = (0, 0)
        if self._cuda:  # what building and loading the model left behind is not the first step's peak
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
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

    @contextmanager
    def excluded(self) -> Iterator[None]:
        """Keep the enclosed block (an evaluation) out of the training peaks. On CUDA the allocator's peaks
        so far are carried over and reset after the block; on CPU only `track()` blocks are measured."""
        if self._cuda:
            self._carried = self._cuda_peaks()
        yield
        if self._cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def _cuda_peaks(self) -> tuple[int, int]:
        """(allocated, reserved) peaks of the window: the allocator's, and any carried over an evaluation.
        Reserved is what the allocator holds from the device: what must fit."""
        allocated, reserved = torch.cuda.max_memory_allocated(self.device), torch.cuda.max_memory_reserved(self.device)
        return max(allocated, self._carried[0]), max(reserved, self._carried[1])

    def _read_cuda(self) -> dict[str, float]:
        peak, reserved = self._cuda_peaks()
        self._carried = (0, 0)
        torch.cuda.reset_peak_memory_stats(self.device)
        weights = unique_nbytes(local_tensor(t) for t in [*self.model.parameters(), *self.model.buffers()])
        return {
            "peak_memory_gb": peak / GIB,
            "peak_reserved_gb": reserved / GIB,
            "peak_weights_gb": weights / GIB,
            "peak_optimizer_state_gb": unique_nbytes(optimizer_state_tensors(self.optimizer)) / GIB,
        }

    def _label_known_tensors(self) -> None:
        """Enter what existed before this step: weights, any gradients, optimizer state."""
        for tensor in [*self.model.parameters(), *self.model.buffers()]:
            self.ledger.label(local_tensor(tensor), "weights")
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
