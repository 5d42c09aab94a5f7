"""LoRA pretraining: random-init target weights W0 stay frozen, adapters B·A learn the update.

The layer is y = x·W0ᵀ + (alpha / rank)·B·A·dropout(x), with A ~ U(±1/√in_features) (nn.Linear's
default init) and B = 0, as in Hu et al. 2021. Embeddings, norms, lm_head (and any bias) train normally.

The adapter layers are peft's (`inject_adapter_in_model`): it rewrites the LlamaForCausalLM in place
without a PeftModel wrapper, so the model keeps its type, its forward and its state_dict layout
(`<target>.base_layer.weight`, `<target>.lora_A.default.weight`, `<target>.lora_B.default.weight`).
"""

from __future__ import annotations

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import LlamaForCausalLM

from galore_train.config import TrainConfig
from galore_train.errors import UserError
from galore_train.methods.base import MatrixParams, MergedLinear, Method
from galore_train.model import target_linear_modules

ADAPTER = "default"  # peft's adapter name; one adapter per layer here


def attach_adapters(model: nn.Module, cfg: TrainConfig) -> None:
    """Wrap every target linear in a LoRA layer; freeze exactly the target weights W0."""
    config = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(target_linear_modules(model, cfg.galore_targets)),  # full names: exact matches
    )
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    model.requires_grad_(True)  # peft freezes everything but the adapters; LoRA pretraining does not
    for layer in adapter_layers(model):
        layer.get_base_layer().weight.requires_grad_(False)


def adapter_layers(model: nn.Module) -> list[LoraLayer]:
    return [module for module in model.modules() if isinstance(module, LoraLayer)]


def adapter_parameters(layer: LoraLayer) -> tuple[nn.Parameter, nn.Parameter]:
    """(A, B) of a LoRA layer."""
    return layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight


def adapter_delta(layer: LoraLayer) -> torch.Tensor:
    """scale·B·A in fp32 (bf16 products would round the update before it is merged)."""
    a, b = adapter_parameters(layer)
    return layer.scaling[ADAPTER] * (b.float() @ a.float())


class LoRA(Method):
    @classmethod
    def check_options(cls, cfg: TrainConfig) -> None:
        if not 0.0 <= cfg.lora_dropout < 1.0:
            raise UserError(f"--lora-dropout must be within [0, 1), got {cfg.lora_dropout}")
        if cfg.lora_alpha <= 0:
            raise UserError(f"--lora-alpha must be positive, got {cfg.lora_alpha}")

    @classmethod
    def matrix_parameter_counts(cls, out_features: int, in_features: int, rank: int) -> MatrixParams:
        """mn + (m+n)r stored, (m+n)r trainable -> mn + 3(m+n)r with Adam (GaLore paper)."""
        adapters = (out_features + in_features) * rank
        return MatrixParams(stored=out_features * in_features + adapters, trainable=adapters)

    def prepare(self, model: LlamaForCausalLM, completed_steps: int = 0) -> LlamaForCausalLM:
        attach_adapters(model, self.cfg)
        return model

    def is_wrapped(self, module: nn.Module) -> bool:
        return isinstance(module, LoraLayer)

    def merged_linear(self, module: LoraLayer) -> MergedLinear:
        base = module.get_base_layer()
        weight = (base.weight.float() + adapter_delta(module)).to(base.weight.dtype)
        return weight, None if base.bias is None else base.bias.detach()
