"""The Method protocol: how a training method that changes the model talks to the training loop.

A method rewrites the target linear layers of a LlamaForCausalLM in place (`prepare`), may act after
each optimizer step (ReLoRA's merges), and can always hand back a plain LLaMA with its low-rank parts
merged, so the final checkpoint loads with `AutoModelForCausalLM.from_pretrained`.
"""

from __future__ import annotations

import copy
from typing import Any, NamedTuple, Optional

import torch
from torch import nn
from transformers import LlamaForCausalLM

from galore_train.config import TrainConfig
from galore_train.registry import OPTIMIZERS

# A target layer's merged (weight, bias), in the layer's dtype.
MergedLinear = tuple[torch.Tensor, Optional[torch.Tensor]]


class MatrixParams(NamedTuple):
    """Parameter counts of one target matrix (out_features x in_features) under a method."""

    stored: int  # elements held in memory as weights
    trainable: int  # elements with gradients and optimizer state


class Method:
    """Base class. Subclasses implement `prepare`, `is_wrapped`, `merged_linear` and `matrix_parameter_counts`;
    the registry (galore_train/registry.py) names them."""

    changes_model = True  # its weights are not the plain LLaMA's: checkpoints also keep the wrapped ones

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg

    def optimizer_name(self) -> str:
        """The --optimizer registry name of what trains this method's parameters."""
        return OPTIMIZERS[self.cfg.optimizer].base

    @classmethod
    def check_options(cls, cfg: TrainConfig) -> None:
        """Raise UserError for options of `cfg` this method cannot run with."""

    @classmethod
    def scheduler_kwargs(cls, cfg: TrainConfig) -> dict[str, Any]:
        """Extra keyword arguments for schedule.build_scheduler."""
        return {}

    @classmethod
    def matrix_parameter_counts(cls, out_features: int, in_features: int, rank: int) -> MatrixParams:
        """Counts of one target matrix, for the memory estimator (LLaMA's linears have no bias)."""
        raise NotImplementedError

    def prepare(self, model: LlamaForCausalLM, completed_steps: int = 0) -> nn.Module:
        """Rewrite the target linears of `model` in place and set requires_grad; return `model`.

        `completed_steps` is where training (re)starts: the structure must be the one the model had
        right after `after_optimizer_step(completed_steps)`, so a checkpoint's state_dict fits it.
        """
        raise NotImplementedError

    def after_optimizer_step(self, completed_steps: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> bool:
        """Hook after every optimizer + scheduler step. True means the trainable parameters changed
        and the loop must build a new optimizer over them."""
        return False

    def is_wrapped(self, module: nn.Module) -> bool:
        """Whether `module` is one of this method's replacements of a target linear."""
        raise NotImplementedError

    def merged_linear(self, module: nn.Module) -> MergedLinear:
        """The dense (weight, bias) that `module` computes."""
        raise NotImplementedError

    @torch.no_grad()
    def merged_model(self, model: nn.Module) -> LlamaForCausalLM:
        """A plain LlamaForCausalLM computing what `model` computes, for `save_pretrained`.

        `model` is left untouched; the result shares every non-target tensor with it (no second copy
        of the embeddings in memory), so treat it as read-only.
        """
        merged = {name: self.merged_linear(module) for name, module in model.named_modules() if self.is_wrapped(module)}
        state = {
            key: value
            for key, value in model.state_dict().items()
            if not any(key.startswith(name + ".") for name in merged)
        }
        for name, (weight, bias) in merged.items():
            state[f"{name}.weight"] = weight
            if bias is not None:
                state[f"{name}.bias"] = bias
        with torch.device("meta"):
            plain = LlamaForCausalLM(copy.deepcopy(model.config))
        plain.load_state_dict(state, strict=True, assign=True)
        # Non-persistent buffers (rotary frequencies) are not in a state_dict: take them from `model`.
        for name, _ in plain.named_buffers():
            owner, _, leaf = name.rpartition(".")
            setattr(plain.get_submodule(owner), leaf, model.get_buffer(name))
        plain.tie_weights()
        return plain

    def state_dict(self) -> dict[str, Any]:
        """Plain values the method needs on resume (saved with the checkpoint)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{self.cfg.optimizer} keeps no state, got {sorted(state)}")


class FullModel(Method):
    """No method: the model as built, every weight trained by the optimizer named with --optimizer."""

    changes_model = False

    def optimizer_name(self) -> str:
        return self.cfg.optimizer

    def prepare(self, model: LlamaForCausalLM, completed_steps: int = 0) -> nn.Module:
        return model

    def is_wrapped(self, module: nn.Module) -> bool:
        return False

    def merged_model(self, model: nn.Module) -> LlamaForCausalLM:
        return model
