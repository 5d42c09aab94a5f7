"""The Muon baseline: Muon on the hidden matrices, AdamW on the rest, as ONE optimizer.

Muon (Jordan et al. 2024) orthogonalizes the momentum of a 2-D weight (Newton-Schulz) and is meant for
hidden layers only; embeddings, norms and lm_head stay with AdamW. The training loop, checkpoints, the
LR schedule and layer-wise updates all expect one torch.optim.Optimizer, so `MuonAdamW` owns the param
groups and the state; an inner torch.optim.AdamW does the arithmetic of the other groups on the very same group
dicts and state dict, and the Muon groups are stepped here: `state_dict()`/`load_state_dict()` are torch's own.

The Muon step is torch.optim.Muon's (momentum 0.95, Nesterov, 5 Newton-Schulz steps, decoupled weight decay; the
same group keys, so checkpoints of either load in the other), bit for bit (tests/test_muon_reference.py), written
here rather than called so that the orthogonalisation can be shared between processes (optim/orthogonalize.py:
under DDP and FSDP2 each matrix's Newton-Schulz runs once, on its owner), so that it runs on FSDP2's row shards,
and so that the momentum can be kept in 8 bits (optim/muon_momentum.py, group key "momentum_bits": 8).
It needs no torch.optim.Muon (torch >= 2.9): any torch the project supports runs it.

Learning rate: one --lr for both. Moonshot's `adjust_lr_fn="match_rms_adamw"` (arXiv 2502.16982) scales each
matrix's step to AdamW's update RMS (0.2 sqrt(max(m, n)) lr), so the AdamW lr applies.

State: momentum_buffer (m x n, like the gradient; no step count) per Muon matrix (8-bit: uint8 codes and a
float32 absmax per block of 256); AdamW's exp_avg, exp_avg_sq and step (a float32 tensor) elsewhere. Under FSDP2
each process keeps its rows of the momentum (DTensors, gathered into the one checkpoint format).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Optional

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from galore_train.optim import muon_momentum
from galore_train.optim.external import torch_adam_state_layout
from galore_train.optim.layout import StateTensor
from galore_train.optim.orthogonalize import (
    NS_COEFFICIENTS,
    NS_EPS,
    NS_STEPS,
    Orthogonalization,
    Orthogonalize,
    SharedOrthogonalization,
)
from galore_train.optim.row_shards import is_row_sharded

MUON_MOMENTUM = 0.95  # torch's and Keller Jordan's default
ADJUST_LR = "match_rms_adamw"


def adjusted_lr(lr: float, adjust_lr_fn: Optional[str], shape: tuple[int, ...]) -> float:
    """The matrix's own step size: Moonshot's 0.2 sqrt(max(m, n)) lr, or Keller Jordan's sqrt(max(1, m / n)) lr."""
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1, rows / cols))
    return lr * (0.2 * math.sqrt(max(rows, cols)) if adjust_lr_fn == "match_rms_adamw" else 1.0)


def _local(t: Tensor) -> Tensor:
    """This process's rows of a row-sharded DTensor (a view), or the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


class MuonAdamW(torch.optim.Optimizer):
    """Groups with `"muon": True` (2-D hidden matrices) run Muon, the others AdamW.

    Example:
        MuonAdamW([{"params": others}, {"params": matrices, "muon": True}], lr=1e-3, weight_decay=0.0)
    """

    def __init__(
        self,
        params: Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum: float = MUON_MOMENTUM,
    ) -> None:
        groups = list(params)
        muon = {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "nesterov": True}
        muon.update(ns_coefficients=NS_COEFFICIENTS, eps=NS_EPS, ns_steps=NS_STEPS, adjust_lr_fn=ADJUST_LR)
        for group in groups:
            if group.get("muon"):
                for key, value in muon.items():  # torch.optim.Muon's keys, in its order
                    group.setdefault(key, value)
                muon_momentum.check_group(group)
        adamw_groups = [group for group in groups if not group.get("muon")]
        self._adamw = (
            torch.optim.AdamW(adamw_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
            if adamw_groups
            else None
        )
        super().__init__(groups, {})  # the same group dicts, the AdamW ones filled in by the inner optimizer
        self._orthogonalization: Orthogonalization = Orthogonalization()
        self._link()

    def _link(self) -> None:
        """Point the inner AdamW at this optimizer's group dicts and state."""
        if self._adamw is not None:
            self._adamw.param_groups = [group for group in self.param_groups if not group.get("muon")]
            self._adamw.state = self.state

    def _muon_params(self) -> list[Tensor]:
        return [p for group in self.param_groups if group.get("muon") for p in group["params"]]

    def share_orthogonalization(self, process_group: Optional[Any] = None) -> None:
        """Data parallelism (every process steps on the same averaged gradients, or FSDP2's shards of them): each
        matrix's Newton-Schulz runs on one process, its owner, and the result reaches the others
        (optim/orthogonalize.py). Every process of the group must call this, and from then on step in lockstep."""
        self._orthogonalization = SharedOrthogonalization(self._muon_params(), process_group)

    @property
    def newton_schulz_calls(self) -> int:
        """Newton-Schulz runs on this process since construction (shared: only the matrices it owns)."""
        return self._orthogonalization.calls

    @classmethod
    def state_layout(cls, shape: tuple[int, ...], group: Mapping[str, Any], itemsize: int) -> list[StateTensor]:
        """Muon keeps one momentum buffer like the gradient (no step count; 8-bit codes + absmax blocks with
        momentum_bits 8); AdamW its own."""
        if group.get("muon"):
            return muon_momentum.layout(shape, group, itemsize)
        return torch_adam_state_layout(shape, group, itemsize)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group.get("muon"):
                self._muon_step(group)
        if self._adamw is not None:
            self._adamw.step()
        return loss

    def _muon_step(self, group: dict[str, Any]) -> None:
        """Momentum of every matrix with a gradient, their orthogonalisation (shared or not), the weight updates."""
        items = []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse or torch.is_complex(p):
                raise RuntimeError("Muon supports dense real gradients only")
            update = muon_momentum.advance(p, _local(p.grad), group, self.state[p])
            items.append(Orthogonalize(p, update, group))
        if any(is_row_sharded(item.param) for item in items) and not isinstance(
            self._orthogonalization, SharedOrthogonalization
        ):
            self.share_orthogonalization()  # FSDP2: each process holds only rows; the owner gathers the matrix
        for item, orthogonal in zip(items, self._orthogonalization.run(items)):
            weight = _local(item.param)
            weight.mul_(1 - group["lr"] * group["weight_decay"])
            weight.add_(orthogonal, alpha=-adjusted_lr(group["lr"], group["adjust_lr_fn"], item.param.shape))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch replaces the group dicts and the state on load: re-link the inner AdamW to the new ones. The
        8-bit momentum is put back as saved (torch casts its codes and block maxima to the weight's dtype)."""
        super().load_state_dict(state_dict)
        muon_momentum.restore_quantized(self, state_dict)
        self._link()
