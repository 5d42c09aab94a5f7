"""ReLoRA (Lialin et al. 2023): LoRA whose adapters are merged into W and restarted periodically.

A sum of rank-r updates can reach full rank, so the model is not stuck in one low-rank subspace.
Timeline (steps counted as completed optimizer steps, S = --relora-warm-start, N = --relora-reset):
- steps [0, S): optional full-rank warm start, every parameter trains, no adapters;
- at S: adapters attach (the loop builds a new optimizer over the trainable set);
- at S + k·N (k >= 1): merge W += scale·B·A into the base weight, re-init A (random) and B (zero), prune the adapters'
  optimizer state by magnitude; the jagged lr schedule (schedule.restart_ramp) re-warms after
  every restart, including the attach.
Everything is a function of the step count, so resuming needs no extra state; re-inits draw from a
generator seeded by (seed, step), identical on every rank and independent of dropout's RNG.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn
from transformers import LlamaForCausalLM

from galore_train.config import TrainConfig, restart_warmup
from galore_train.errors import UserError
from galore_train.methods.lora import LoRA, adapter_delta, adapter_layers, adapter_parameters, attach_adapters


@torch.no_grad()
def reinit_adapter_(layer: nn.Module, generator: torch.Generator) -> None:
    """A ~ U(±1/√in_features) like at attach time (nn.Linear's default init), B = 0."""
    a, b = adapter_parameters(layer)
    bound = 1.0 / a.shape[1] ** 0.5
    a.copy_(torch.empty(a.shape).uniform_(-bound, bound, generator=generator))
    b.zero_()


@torch.no_grad()
def merge_and_reinit_(model: nn.Module, generator: torch.Generator) -> None:
    """W += scale·B·A for every adapter layer, then restart its adapters (parameters keep identity)."""
    for layer in adapter_layers(model):
        weight = layer.get_base_layer().weight
        weight.copy_((weight.float() + adapter_delta(layer)).to(weight.dtype))
        reinit_adapter_(layer, generator)


@torch.no_grad()
def prune_by_magnitude_(tensor: torch.Tensor, ratio: float) -> None:
    """Zero the round(ratio * numel) entries with the smallest magnitude (ties at the cut go too)."""
    k = round(ratio * tensor.numel())
    if k == 0:
        return
    magnitude = tensor.abs()
    threshold = magnitude.flatten().float().kthvalue(k).values
    tensor.masked_fill_(magnitude <= threshold, 0)


def prune_optimizer_state_(optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter], ratio: float) -> None:
    """Partial optimizer reset for `params` (ReLoRA's magnitude pruning of the moments).

    Prunes every floating-point state tensor shaped like its parameter (AdamW's exp_avg and exp_avg_sq,
    SGD's momentum_buffer); scalar entries such as `step` are kept. A parameter whose state also
    holds something else (8-bit quantized codes, Adafactor's factored statistics) cannot be pruned
    entry-wise: its state is dropped, so the optimizer starts it afresh at the next step.
    """
    for param in params:
        state = optimizer.state.get(param)
        if not state:
            continue
        tensors = [value for value in state.values() if torch.is_tensor(value) and value.dim() > 0]
        if all(t.is_floating_point() and t.shape == param.shape for t in tensors):
            for tensor in tensors:
                prune_by_magnitude_(tensor, ratio)
        else:
            state.clear()


class ReLoRA(LoRA):
    @classmethod
    def check_options(cls, cfg: TrainConfig) -> None:
        super().check_options(cfg)
        if cfg.relora_warm_start < 0:
            raise UserError(f"--relora-warm-start must be >= 0, got {cfg.relora_warm_start}")
        if (
            cfg.restart_warmup_steps is not None and not 0 <= cfg.restart_warmup_steps < cfg.relora_reset
        ):  # derived: fits
            raise UserError(
                f"--restart-warmup-steps must be >= 0 and smaller than --relora-reset "
                f"({cfg.relora_reset}), got {cfg.restart_warmup_steps}"
            )

    @classmethod
    def scheduler_kwargs(cls, cfg: TrainConfig) -> dict[str, Any]:
        """The jagged schedule: re-warm after every restart, including the attach."""
        return {
            "restart_every": cfg.relora_reset,
            "restart_warmup": restart_warmup(cfg.restart_warmup_steps, cfg.relora_reset),
            "restart_offset": cfg.relora_warm_start,
        }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.merges = 0  # restarts done so far: for logs and the checkpoint

    def prepare(self, model: LlamaForCausalLM, completed_steps: int = 0) -> LlamaForCausalLM:
        if completed_steps >= self.cfg.relora_warm_start:
            self._attach(model)
        return model

    def after_optimizer_step(self, completed_steps: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> bool:
        since_attach = completed_steps - self.cfg.relora_warm_start
        if since_attach == 0 and completed_steps > 0:
            self._attach(model)
            return True
        if since_attach > 0 and since_attach % self.cfg.relora_reset == 0:
            merge_and_reinit_(model, self._generator(completed_steps))
            adapters = [p for layer in adapter_layers(model) for p in adapter_parameters(layer)]
            prune_optimizer_state_(optimizer, adapters, self.cfg.optimizer_reset_ratio)
            self.merges += 1
        return False

    def _attach(self, model: nn.Module) -> None:
        attach_adapters(model, self.cfg)
        generator = self._generator(self.cfg.relora_warm_start)
        for layer in adapter_layers(model):
            reinit_adapter_(layer, generator)

    def _generator(self, step: int) -> torch.Generator:
        return torch.Generator().manual_seed((self.cfg.seed * 2**32 + step) % 2**63)

    def state_dict(self) -> dict[str, Any]:
        return {"merges": self.merges}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.merges = int(state["merges"])
