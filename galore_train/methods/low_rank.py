"""Low-rank factorized pretraining: every target weight is the product W = B·A, trained from scratch.

This is the "Low-Rank" baseline of GaLore's Table 2: the model itself is restricted to rank r, so it
saves weights, gradients and optimizer states alike, at the price of capacity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaForCausalLM

from galore_train.methods.base import MatrixParams, MergedLinear, Method
from galore_train.model import target_linear_modules


class FactorizedLinear(nn.Module):
    """y = x·Aᵀ·Bᵀ + bias with A: (rank, in_features) and B: (out_features, rank).

    Init: A and B are Gaussian with the same std s = (std² / rank)^¼, so every entry of B·A has
    variance rank·s⁴ = std², the variance of the dense layer it replaces (LLaMA: initializer_range).
    The forward signal therefore starts at the dense model's scale, and neither factor dominates.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        *,
        bias: bool,
        std: float,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        factor_std = (std**2 / rank) ** 0.25
        self.a = nn.Parameter(torch.randn(rank, in_features, device=device).mul_(factor_std).to(dtype))
        self.b = nn.Parameter(torch.randn(out_features, rank, device=device).mul_(factor_std).to(dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.a), self.b, self.bias)

    def extra_repr(self) -> str:
        bias = self.bias is not None
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, bias={bias}"


class LowRank(Method):
    @classmethod
    def matrix_parameter_counts(cls, out_features: int, in_features: int, rank: int) -> MatrixParams:
        """(m+n)r stored and trainable -> 3(m+n)r with Adam."""
        adapters = (out_features + in_features) * rank
        return MatrixParams(stored=adapters, trainable=adapters)

    def prepare(self, model: LlamaForCausalLM, completed_steps: int = 0) -> LlamaForCausalLM:
        std = model.config.initializer_range
        for name, linear in target_linear_modules(model, self.cfg.galore_targets).items():
            factorized = FactorizedLinear(
                linear.in_features,
                linear.out_features,
                self.cfg.rank,
                bias=linear.bias is not None,
                std=std,
                dtype=linear.weight.dtype,
                device=linear.weight.device,
            )
            model.set_submodule(name, factorized)
        model.requires_grad_(True)
        return model

    def is_wrapped(self, module: nn.Module) -> bool:
        return isinstance(module, FactorizedLinear)

    def merged_linear(self, module: FactorizedLinear) -> MergedLinear:
        weight = (module.b.float() @ module.a.float()).to(module.a.dtype)
        return weight, None if module.bias is None else module.bias.detach()
