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
from typing import Any, Callable, ContextManager, Optional, Protocol

import torch
from torch import nn
from torch.optim import Optimizer

from galore_train import distributed
from galore_train.distributed import DistEnv
from galore_train.optim.layerwise import LayerwiseUpdater
from galore_train.weights.stepping import Int8Weights

Stepper = Optional[Callable[[Optimizer], None]]  # how a plain update steps (default: optimizer.step())


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

    def __init__(
        self, model: nn.Module, module: nn.Module, optimizer: Optimizer, *, grad_clipping: float, step: Stepper = None
    ) -> None:
        self.model = model
        self.module = module
        self.optimizer = optimizer
        self.max_norm = grad_clipping if grad_clipping > 0 else float("inf")
        self._step = step or (lambda optimizer: optimizer.step())

    def accumulating(self) -> ContextManager[None]:
        """Earlier micro-batches skip the gradient communication (DDP no_sync, FSDP2's gradient sync off)."""
        return distributed.no_sync(self.module)

    def finish(self) -> float:
        """Clip, step and clear the gradients; a non-finite norm (a NaN/inf gradient with a finite loss)
        skips the step: such a gradient would turn every weight it touches into NaN."""
        norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_norm))
        if math.isfinite(norm):
            self._step(self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def abandon(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def close(self) -> None:
        self.abandon()


def build_updates(
    model: nn.Module,
    module: nn.Module,
    optimizer: Optimizer,
    env: DistEnv,
    cfg: Any,
    int8: Optional[Int8Weights] = None,
) -> WeightUpdates:
    """`module` runs forward and backward (`distributed.wrap_model`); `cfg` a TrainConfig (--layerwise,
    --grad-clipping, --accumulate-projected). Layer-wise under torchrun: with DDP the hooks average each gradient
    across ranks (the model is not DDP-wrapped); FSDP2 hands them reduce-scattered shards. `int8`: the model's
    INT8 weights, each dequantized, stepped and requantized on its own (weights/stepping.py)."""
    if int8 is not None:
        int8.attach(optimizer)
    if cfg.layerwise:
        reduce = None if distributed.is_sharded(model) else distributed.gradient_averager(env)
        return LayerwiseUpdater(
            model, optimizer, grad_clipping=cfg.grad_clipping, reduce=reduce, projected=cfg.accumulate_projected
        )
    return PlainUpdates(model, module, optimizer, grad_clipping=cfg.grad_clipping, step=int8 and int8.step)
