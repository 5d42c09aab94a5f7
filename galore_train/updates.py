"""How one optimizer step's gradients reach the weights: after backward (plain) or inside it (layer-wise).

The training loop drives both through the same calls, so it never asks which one it has:

    updates.take_first_bases(replay, k)  # before a step: layer-wise projected accumulation's first projections
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
from galore_train.errors import UserError
from galore_train.optim import traffic
from galore_train.optim.base import GaLoreOptimizer
from galore_train.optim.layerwise import GradientReduce, LayerwiseUpdater
from galore_train.optim.lowrank_sync import LowRankSync, clip_tensors_
from galore_train.registry import OPTIMIZERS
from galore_train.weights.stepping import RoundedWeights

Stepper = Optional[Callable[[Optimizer], None]]  # how a plain update steps (default: optimizer.step())


class WeightUpdates(Protocol):
    applies_in_backward: bool  # the weights change during the last backward (so a loss is checked before it)

    def take_first_bases(self, replay: Callable[[], None], micro_batches: int) -> int: ...

    def accumulating(self) -> ContextManager[None]: ...

    def finish(self) -> float: ...

    def abandon(self) -> None: ...

    def close(self) -> None: ...


class PlainUpdates:
    """`optimizer.step()` after backward, with global gradient-norm clipping (0 = off). `module` is what
    forward and backward run through (the DDP wrapper, or the model itself). With `lowrank` (low-rank gradient
    sync, optim/lowrank_sync.py) its matrices are averaged here, as R, and clipping measures those R."""

    applies_in_backward = False

    def __init__(
        self,
        model: nn.Module,
        module: nn.Module,
        optimizer: Optimizer,
        *,
        grad_clipping: float,
        lowrank: Optional[LowRankSync] = None,
        step: Stepper = None,
    ) -> None:
        self.model = model
        self.module = module
        self.optimizer = optimizer
        self.max_norm = grad_clipping if grad_clipping > 0 else float("inf")
        self.lowrank = lowrank
        self._synced_as_r = set(lowrank.params) if lowrank is not None else set()  # fixed at wrap time
        self._step = step or (lambda optimizer: optimizer.step())

    def take_first_bases(self, replay: Callable[[], None], micro_batches: int) -> int:
        """Nothing to replay: a plain step sums every full gradient before any projection is taken."""
        return 0

    def accumulating(self) -> ContextManager[None]:
        """Earlier micro-batches skip the gradient communication (DDP no_sync, FSDP2's gradient sync off)."""
        return distributed.no_sync(self.module)

    def finish(self) -> float:
        """Clip, step and clear the gradients; a non-finite norm (a NaN/inf gradient with a finite loss)
        skips the step: such a gradient would turn every weight it touches into NaN. Without clipping no gradient
        is rescaled (optim/lowrank_sync.clip_tensors_)."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None and p not in self._synced_as_r]
        if self.lowrank is not None:
            grads += self.lowrank.synchronize()
        norm = clip_tensors_(grads, self.max_norm)
        if math.isfinite(norm):
            self._step(self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def abandon(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def close(self) -> None:
        self.abandon()


def _lowrank_first(lowrank: LowRankSync, average: Callable[[nn.Parameter], torch.Tensor]) -> GradientReduce:
    """Layer-wise reduce: a projected matrix (the only gradient present in its hook) through low-rank sync, which
    returns its averaged R; any other parameter through `average`."""
    projected = set(lowrank.params)

    def reduce(param: nn.Parameter) -> torch.Tensor:
        return lowrank.synchronize()[0] if param in projected else average(param)

    return reduce


def build_lowrank_sync(optimizer: Optimizer, name: str, cfg: Any, env: DistEnv, sharded: bool) -> Optional[LowRankSync]:
    """Low-rank gradient sync for this run (optimizer `name`, as built), or None: on by default wherever it is
    exact (several processes under DDP, plain or layer-wise, with an optimizer that reads only R); an explicit
    --lowrank-sync where it is not is a one-line error. Single-process runs have nothing to sync."""
    if cfg.lowrank_sync is False or not env.enabled:
        return None
    exact = isinstance(optimizer, GaLoreOptimizer) and OPTIMIZERS[name].reads_only_r
    refusal = (
        "--distributed fsdp (FSDP2 reduce-scatters whole gradients; not built)"
        if sharded
        else f"{name} (its update reads the full gradient, not only R)"
        if not exact
        else None
    )
    if refusal is None:
        return LowRankSync(optimizer, env.world_size)
    if cfg.lowrank_sync:
        raise UserError(f"--lowrank-sync does not apply with {refusal}")
    return None


def build_updates(
    model: nn.Module,
    module: nn.Module,
    optimizer: Optimizer,
    env: DistEnv,
    cfg: Any,
    *,
    lowrank: Optional[LowRankSync] = None,
    rounded: Optional[RoundedWeights] = None,
) -> WeightUpdates:
    """`module` runs forward and backward (`distributed.wrap_model`); `cfg` a TrainConfig (--layerwise,
    --grad-clipping, --accumulate-projected). Layer-wise under torchrun: with DDP the hooks average each gradient
    across ranks (the model is not DDP-wrapped); FSDP2 hands them reduce-scattered shards. `rounded`: the model's
    INT8 weights or bf16 weights with stochastic rounding, each opened, stepped and rounded back on its own
    (weights/stepping.py)."""
    if rounded is not None:
        rounded.attach(optimizer)
    if cfg.layerwise:
        reduce = None if distributed.is_sharded(model) else distributed.gradient_averager(env)
        if lowrank is not None:  # GaLore matrices: averaged as R (one matrix per hook), the rest as before
            reduce = _lowrank_first(lowrank, reduce)
        return LayerwiseUpdater(
            model, optimizer, grad_clipping=cfg.grad_clipping, reduce=reduce, projected=cfg.accumulate_projected
        )
    step = rounded.step if rounded is not None else None
    return PlainUpdates(model, module, optimizer, grad_clipping=cfg.grad_clipping, lowrank=lowrank, step=step)


def wrap_with_updates(
    model: nn.Module, optimizer: Optimizer, name: str, cfg: Any, env: DistEnv, rounded: Optional[RoundedWeights] = None
) -> tuple[nn.Module, WeightUpdates]:
    """The module forward and backward run through (`distributed.wrap_model`) and how updates reach the weights,
    for optimizer `name` (as built): low-rank sync's matrices are left out of DDP's buckets (averaged as R here)."""
    lowrank = build_lowrank_sync(optimizer, name, cfg, env, distributed.is_sharded(model))
    projected = optimizer.projected_params() if isinstance(optimizer, GaLoreOptimizer) else []
    traffic.TRAFFIC.projected_params = set(projected)  # their gradient bytes are counted apart, synced either way
    synced_elsewhere = lowrank.params if lowrank else ()
    module = distributed.wrap_model(model, env, layerwise=cfg.layerwise, synced_elsewhere=synced_elsewhere)
    return module, build_updates(model, module, optimizer, env, cfg, lowrank=lowrank, rounded=rounded)
