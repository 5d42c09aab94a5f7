"""`Int8Linear`: a target linear layer whose weight is stored as INT8 codes and per-group scales (int8.py).

What the rest of the trainer sees is an nn.Linear with a `weight` parameter of the usual shape and dtype:
the optimizer's param groups, the target-layer rule, gradient hooks and DDP work on it unchanged. That
parameter is a surrogate: between updates its data is one element expanded to m x n (no storage; an
in-place write to it fails loudly), and only while the optimizer steps it does it hold the dequantized
matrix (stepping.py: dequantize, step, requantize, one matrix at a time).

Forward and backward dequantize the layer's own weight, use it and drop it, so at most one dequantized
matrix exists at a time, activation checkpointing's recomputation included (it runs forward again). The
weight's gradient goes to the surrogate in the run's dtype, as an nn.Linear's would.

State dict: the exact state, `weight_int8` and `weight_scale` (the surrogate is not saved), so resuming
restores the codes bit for bit. Loading a dequantized `weight` (a plain LLaMA checkpoint) quantizes it to
nearest instead. A plain-transformers copy of the model is written by export.py.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from galore_train.weights.int8 import check_group_size, dequantize_rows, quantize_rows_


class _Int8LinearFunction(torch.autograd.Function):
    """y = x W^T with W dequantized in forward and again in backward (never saved)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, surrogate: Tensor, codes: Tensor, scales: Tensor) -> Tensor:
        ctx.save_for_backward(x, codes, scales)
        ctx.weight_dtype = surrogate.dtype
        return F.linear(x, dequantize_rows(codes, scales, surrogate.dtype))

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Optional[Tensor], ...]:
        x, codes, scales = ctx.saved_tensors
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ dequantize_rows(codes, scales, ctx.weight_dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = grad_out.reshape(-1, grad_out.shape[-1]).mT @ x.reshape(-1, x.shape[-1])
        return grad_x, grad_weight, None, None


class Int8Linear(nn.Linear):
    """A bias-free nn.Linear whose weight lives in `weight_int8` (int8, m x n) and `weight_scale`
    (fp32, m x n/group_size); `weight` is the surrogate parameter (module docstring)."""

    def __init__(self, linear: nn.Linear, group_size: int, name: str = "a linear layer") -> None:
        if linear.bias is not None:
            raise ValueError(f"INT8 weights support bias-free linear layers; {name} has a bias")
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        check_group_size(self.in_features, group_size, name)
        self.group_size = group_size
        source = linear.weight
        self.register_buffer("weight_int8", torch.empty(source.shape, dtype=torch.int8, device=source.device))
        scales = (self.out_features, self.in_features // group_size)
        self.register_buffer("weight_scale", torch.empty(scales, dtype=torch.float32, device=source.device))
        quantize_rows_(source, self.weight_int8, self.weight_scale, group_size)
        self.weight = nn.Parameter(self._surrogate(source.dtype), requires_grad=source.requires_grad)
        self.register_parameter("bias", None)

    def _surrogate(self, dtype: torch.dtype) -> Tensor:
        return torch.zeros((), dtype=dtype, device=self.weight_int8.device).expand(self.out_features, self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        return _Int8LinearFunction.apply(x, self.weight, self.weight_int8, self.weight_scale)

    def dequantized(self) -> Tensor:
        """The weight as a float matrix in the run's dtype (a new tensor)."""
        return dequantize_rows(self.weight_int8, self.weight_scale, self.weight.dtype)

    @torch.no_grad()
    def materialize(self) -> None:
        """Give the surrogate the dequantized matrix, for the optimizer to update in place."""
        self.weight.data = self.dequantized()

    @torch.no_grad()
    def store(self, generator: Optional[torch.Generator]) -> None:
        """Requantize the surrogate's (updated) matrix, stochastically with `generator`, and drop it."""
        quantize_rows_(self.weight.data, self.weight_int8, self.weight_scale, self.group_size, generator)
        self.weight.data = self._surrogate(self.weight.dtype)

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        for name in ("weight_int8", "weight_scale"):
            buffer = getattr(self, name)
            destination[prefix + name] = buffer if keep_vars else buffer.detach()

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        dense = state_dict.get(prefix + "weight")
        with torch.no_grad():
            if dense is not None:  # a plain checkpoint's float weight
                quantize_rows_(dense.to(self.weight_int8.device), self.weight_int8, self.weight_scale, self.group_size)
                return
            for name in ("weight_int8", "weight_scale"):
                if prefix + name in state_dict:
                    getattr(self, name).copy_(state_dict[prefix + name])
                else:
                    missing_keys.append(prefix + name)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, int8 groups of {self.group_size}"


def quantize_linears(model: nn.Module, linears: dict[str, nn.Linear], group_size: int) -> None:
    """Replace each named linear layer of `model` by an Int8Linear (in place, one layer at a time)."""
    for name, linear in linears.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, Int8Linear(linear, group_size, name))


def int8_linears(model: nn.Module) -> Iterator[tuple[str, Int8Linear]]:
    return ((name, m) for name, m in model.named_modules() if isinstance(m, Int8Linear))
