"""How one optimizer step's gradients reach the weights: after backward (plain) or inside it (layer-wise).

The training loop drives both through the same calls, so it never asks which one it has:

    with updates.accumulating():      # earlier micro-batches: gradients only accumulate (plain: no DDP/FSDP sync)
        loss.backward()
    loss.backward()                   # last micro-batch (layer-wise: the weights change during it)
    grad_norm = updates.finish()      # the step's gradient norm; a non-finite one is never applied
    updates.abandon()                 # instead, for a step dropped half-way (e.g. a non-finite loss)
    updates.close()                   # before the optimizer is replaced (ReLoRA's warm start)
"""

from __future__ import annotations

import math
from typing import ContextManager, Protocol

import torch
from torch import nn
from torch.optim import Optimizer

from galore_train import distributed
from galore_train.distributed import DistEnv
from galore_train.optim.layerwise import LayerwiseUpdater


class WeightUpdates(Protocol):
    applies_in_backward: bool  # the weights change during the last backward (so a loss is checked before it)

    def accumulating(self) -> ContextManager[None]: ...

    def finish(self) -> float: ...

    def abandon(self) -> None: ...

    def close(self) -> None: ...


class PlainUpdates:
    """`optimizer.step()` after backward, with global gradient-norm clipping (0 = off). `module` is what
    forward and backward run through (the DDP wrapper, or the model itself)."""

    applies_in_backward = False

    def __init__(self, model: nn.Module, module: nn.Module, optimizer: Optimizer, *, grad_clipping: float) -> None:
        self.model = model
        self.module = module
        self.optimizer = optimizer
        self.max_norm = grad_clipping if grad_clipping > 0 else float("inf")

    def accumulating(self) -> ContextManager[None]:
        """Earlier micro-batches skip the gradient communication (DDP no_sync, FSDP2's gradient sync off)."""
        return distributed.no_sync(self.module)

    def finish(self) -> float:
        """Clip, step and clear the gradients; a non-finite norm (a NaN/inf gradient with a finite loss)
        skips the step: such a gradient would turn every weight it touches into NaN.

        The norm and the clipping are torch's clip_grad_norm_ in its two halves (torch >= 2.6, the floor), so
        that without clipping no gradient is rescaled: clip_grad_norm_(..., inf) multiplies every gradient by
        1, a pass over all of them per step. With clipping the values are clip_grad_norm_'s, bit for bit."""
        params = list(self.model.parameters())
        total = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        if self.max_norm != math.inf:
            torch.nn.utils.clip_grads_with_norm_(params, self.max_norm, total)
        norm = float(total)
        if math.isfinite(norm):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def abandon(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def close(self) -> None:
        self.abandon()


def build_updates(
    model: nn.Module, module: nn.Module, optimizer: Optimizer, env: DistEnv, *, layerwise: bool, grad_clipping: float
) -> WeightUpdates:
    """`module` runs forward and backward (`distributed.wrap_model`). Layer-wise under torchrun: with DDP the hooks
    average each gradient across ranks (the model is not DDP-wrapped); FSDP2 hands them reduce-scattered shards."""
    if layerwise:
        reduce = None if distributed.is_sharded(model) else distributed.gradient_averager(env)
        return LayerwiseUpdater(model, optimizer, grad_clipping=grad_clipping, reduce=reduce)
    return PlainUpdates(model, module, optimizer, grad_clipping=grad_clipping)
