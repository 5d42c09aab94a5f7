"""How the optimizer updates weights kept in a narrower form than it computes in: open one matrix, step it,
round it back. Two kinds share the machinery (`RoundedWeights`): INT8 weights (dequantize, step, requantize)
and bf16 weights with --stochastic-rounding (`BF16StochasticRounding`: step an fp32 copy, round it to bf16).

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

bf16 stochastic rounding works the same way on every bf16 parameter: before its step it is given an fp32
copy of itself (the one matrix of fp32 scratch the estimator counts: the largest parameter), after it the
copy is rounded stochastically into the parameter's own bf16 storage (bf16.py) and dropped.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn
from torch.optim import Optimizer

from galore_train.errors import UserError
from galore_train.model import target_linear_modules
from galore_train.weights.bf16 import stochastic_round_to_bf16_
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


def restore_rounding(rounded: Optional["RoundedWeights"], state: Optional[dict[str, Any]]) -> None:
    """Put a checkpoint's rounding generator back (runs without rounded weights have neither)."""
    if rounded is not None:
        rounded.load_state_dict(state or {})


class RoundedWeights:
    """Parameters that the optimizer steps through a working copy, written back by rounding: the hooks, the
    one-matrix-at-a-time step and the saved rounding generator (None: round to nearest) that INT8 weights and
    bf16 stochastic rounding share. Subclasses say how a parameter is opened (`_open`) and stored (`_store`)."""

    ROUNDING_FLAG = "the rounding"  # the flag that chose it, for messages

    def __init__(self, params: list[nn.Parameter], *, stochastic: bool, seed: int) -> None:
        if not params:
            raise ValueError("no parameters to round")
        self.params: dict[nn.Parameter, None] = dict.fromkeys(params)  # model order: reproducible draws
        self.generator: Optional[torch.Generator] = None
        if stochastic:
            self.generator = torch.Generator(device=params[0].device)
            self.generator.manual_seed(seed + ROUNDING_SEED_OFFSET)
        self._open_params: list[nn.Parameter] = []

    def attach(self, optimizer: Optimizer) -> list[Any]:
        """Open before, store after each `optimizer.step()` every parameter of ours that has a gradient;
        returns the hook handles."""
        return [
            optimizer.register_step_pre_hook(lambda optimizer, *_: self._open_all(optimizer)),
            optimizer.register_step_post_hook(lambda *_: self._store_all()),
        ]

    def step(self, optimizer: Optimizer) -> None:
        """`optimizer.step()` with at most one working copy alive: the other parameters first, then each of
        ours alone. Gradients stay as they were (the caller clears them)."""
        grads = {p: p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None}
        ours = [p for p in grads if p in self.params]  # optimizer order: the rounding draws are reproducible
        for p in ours:
            p.grad = None
        optimizer.step()
        for p in grads:
            p.grad = None
        for p in ours:
            p.grad = grads[p]
            optimizer.step()
            p.grad = None
        for p, grad in grads.items():
            p.grad = grad

    def _open_all(self, optimizer: Optimizer) -> None:
        for p in self.params:
            if p.grad is not None and self._open(p, optimizer):
                self._open_params.append(p)

    def _store_all(self) -> None:
        for p in self._open_params:
            self._store(p)
        self._open_params.clear()

    def _open(self, p: nn.Parameter, optimizer: Optimizer) -> bool:
        """Give `p` its working copy for the step; False when it steps as it is (nothing to store after)."""
        raise NotImplementedError

    def _store(self, p: nn.Parameter) -> None:
        """Round the stepped working copy of `p` back into its storage and drop the copy."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {"generator": None if self.generator is None else self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state.get("generator") is None) != (self.generator is None):
            flag = self.ROUNDING_FLAG
            raise UserError(f"{flag} differs from the checkpoint's (stochastic or nearest); keep it to resume")
        if self.generator is not None:
            self.generator.set_state(state["generator"])


class Int8Weights(RoundedWeights):
    """The INT8 layers of `model` (their surrogate parameters) and their rounding generator."""

    ROUNDING_FLAG = "--int8-rounding"

    def __init__(self, model: nn.Module, *, stochastic: bool, seed: int) -> None:
        self.layers: dict[nn.Parameter, Int8Linear] = {layer.weight: layer for _, layer in int8_linears(model)}
        if not self.layers:
            raise ValueError("the model has no INT8 layers")
        super().__init__(list(self.layers), stochastic=stochastic, seed=seed)

    def _open(self, p: nn.Parameter, optimizer: Optimizer) -> bool:
        self.layers[p].materialize()
        return True

    def _store(self, p: nn.Parameter) -> None:
        self.layers[p].store(self.generator)


class BF16StochasticRounding(RoundedWeights):
    """--stochastic-rounding: each bf16 parameter steps on an fp32 copy of itself (the optimizer's new value
    before any bf16 cast), which is then rounded stochastically into the parameter's own storage (bf16.py).

    The optimizer's state keeps its dtypes: the projections and moments of the GaLore family follow the
    gradient (still bf16), torch's and bitsandbytes' moments follow the parameter at their creation. So a
    parameter's first update, which creates its state, runs in bf16 and rounds to nearest; every later one is
    stochastic. The parameter's tensor object is never replaced (DDP's and the checkpoint's views of it hold)."""

    ROUNDING_FLAG = "--stochastic-rounding"

    def __init__(self, model: nn.Module, *, seed: int) -> None:
        params = [p for p in model.parameters() if p.requires_grad and p.dtype == torch.bfloat16]
        if not params:
            raise ValueError("the model has no bf16 parameters")
        super().__init__(params, stochastic=True, seed=seed)
        self._stored: dict[nn.Parameter, torch.Tensor] = {}

    def _open(self, p: nn.Parameter, optimizer: Optimizer) -> bool:
        if not optimizer.state.get(p):
            return False
        self._stored[p] = p.data
        p.data = p.data.float()
        return True

    def _store(self, p: nn.Parameter) -> None:
        stored = self._stored.pop(p)
        stochastic_round_to_bf16_(p.data, stored, self.generator)
        p.data = stored


def rounded_weights_for_run(model: nn.Module, cfg: Any) -> Optional[RoundedWeights]:
    """The run's rounded weights: INT8 (--int8-weights, --int8-rounding), bf16 stochastic rounding
    (--stochastic-rounding), or None; seeded from --seed."""
    if cfg.int8_weights:
        return Int8Weights(model, stochastic=cfg.int8_rounding == "stochastic", seed=cfg.seed)
    if cfg.stochastic_rounding:
        return BF16StochasticRounding(model, seed=cfg.seed)
    return None
