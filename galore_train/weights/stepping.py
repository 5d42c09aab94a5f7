"""How the optimizer updates INT8 weights: dequantize one matrix, step it, requantize it.

`Int8Weights` owns a model's Int8Linear layers (int8_linear.py) and the generator their stochastic rounding
draws from. It hooks the optimizer (torch.optim's step pre- and post-hooks, so any optimizer works: the
GaLore family, Fira, APOLLO, Muon, AdamW, bitsandbytes'): before a step, every INT8 surrogate that has a
gradient is given its dequantized matrix; after it, each is requantized and emptied again. The optimizer
sees normal parameters with normal gradients throughout, and its state is exactly that of a float run.

One matrix at a time: layer-wise updates already step one parameter per call. Plain updates call `step`
here instead of `optimizer.step()`: the other parameters step together, then each INT8 matrix alone
(the others' gradients are set aside), so at most one dequantized matrix exists beside the INT8 model.

The generator lives on the weights' device, is seeded from --seed (the same on every process, so data
parallel processes requantize to identical codes from identical averaged gradients) and is saved in
checkpoints (`state_dict`): a resumed run draws the same rounding noise, so resume is bit-exact.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn
from torch.optim import Optimizer

from galore_train.errors import UserError
from galore_train.model import target_linear_modules
from galore_train.weights.int8_linear import Int8Linear, int8_linears, quantize_linears

ROUNDING_SEED_OFFSET = 0x51A7  # the rounding stream is not the model-init / dropout stream of the same seed


def quantize_targets(model: nn.Module, cfg: Any) -> nn.Module:
    """With --int8-weights, a TrainConfig's target layers (--galore-targets) as Int8Linear, in place; UserError
    for a group size that does not divide a row. The model unchanged without it."""
    if cfg.int8_weights:
        try:
            quantize_linears(model, target_linear_modules(model, cfg.galore_targets), cfg.int8_group_size)
        except ValueError as err:
            raise UserError(str(err)) from None
    return model


def restore_rounding(int8: Optional["Int8Weights"], state: Optional[dict[str, Any]]) -> None:
    """Put a checkpoint's rounding generator back (runs without INT8 weights have neither)."""
    if int8 is not None:
        int8.load_state_dict(state or {})


class Int8Weights:
    """The INT8 layers of `model` and their rounding generator (None: round to nearest)."""

    def __init__(self, model: nn.Module, *, stochastic: bool, seed: int) -> None:
        self.layers: dict[nn.Parameter, Int8Linear] = {layer.weight: layer for _, layer in int8_linears(model)}
        if not self.layers:
            raise ValueError("the model has no INT8 layers")
        device = next(iter(self.layers.values())).weight_int8.device
        self.generator: Optional[torch.Generator] = None
        if stochastic:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(seed + ROUNDING_SEED_OFFSET)
        self._open: list[Int8Linear] = []

    @classmethod
    def for_run(cls, model: nn.Module, cfg: Any) -> Optional["Int8Weights"]:
        """The run's INT8 weights (a TrainConfig's --int8-weights, --int8-rounding, --seed), or None."""
        if not cfg.int8_weights:
            return None
        return cls(model, stochastic=cfg.int8_rounding == "stochastic", seed=cfg.seed)

    def attach(self, optimizer: Optimizer) -> list[Any]:
        """Dequantize before, requantize after each `optimizer.step()`; returns the hook handles."""
        return [
            optimizer.register_step_pre_hook(lambda *_: self._materialize()),
            optimizer.register_step_post_hook(lambda *_: self._store()),
        ]

    def step(self, optimizer: Optimizer) -> None:
        """`optimizer.step()` with at most one dequantized matrix alive: the other parameters first, then
        each INT8 matrix alone. Gradients stay as they were (the caller clears them)."""
        grads = {p: p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None}
        matrices = [p for p in grads if p in self.layers]  # optimizer order: the rounding draws are reproducible
        for p in matrices:
            p.grad = None
        optimizer.step()
        for p in grads:
            p.grad = None
        for p in matrices:
            p.grad = grads[p]
            optimizer.step()
            p.grad = None
        for p, grad in grads.items():
            p.grad = grad

    def _materialize(self) -> None:
        for p, layer in self.layers.items():
            if p.grad is not None:
                layer.materialize()
                self._open.append(layer)

    def _store(self) -> None:
        for layer in self._open:
            layer.store(self.generator)
        self._open.clear()

    def state_dict(self) -> dict[str, Any]:
        return {"generator": None if self.generator is None else self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state.get("generator") is None) != (self.generator is None):
            raise UserError("--int8-rounding differs from the checkpoint's (stochastic or nearest); keep it to resume")
        if self.generator is not None:
            self.generator.set_state(state["generator"])
