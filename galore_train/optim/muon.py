"""The Muon baseline: torch.optim.Muon on the hidden matrices, AdamW on the rest, as ONE optimizer.

Muon (Jordan et al. 2024) orthogonalizes the momentum of a 2-D weight (Newton-Schulz) and is meant for
hidden layers only; embeddings, norms and lm_head stay with AdamW. The training loop, checkpoints, the
LR schedule and layer-wise updates all expect one torch.optim.Optimizer, so `MuonAdamW` owns the param
groups and the state, and two inner torch optimizers (Muon, AdamW) do the arithmetic on the very same
group dicts and state dict: `state_dict()`/`load_state_dict()` are torch's own, over all groups.

Learning rate: one --lr for both. Muon's `adjust_lr_fn="match_rms_adamw"` (Moonshot, arXiv 2502.16982)
scales each matrix's step to AdamW's update RMS (0.2 sqrt(max(m, n)) lr), so the AdamW lr applies.

Feature-detected: a torch without torch.optim.Muon (before 2.9) gets a one-line UserError.
State: momentum_buffer (m x n, like the gradient; torch's Muon keeps no step count) per Muon matrix; AdamW's
exp_avg, exp_avg_sq and step (a float32 tensor) elsewhere.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor

from galore_train.errors import UserError
from galore_train.optim.external import torch_adam_state_layout
from galore_train.optim.layout import StateTensor

MUON_MOMENTUM = 0.95  # torch's and Keller Jordan's default
ADJUST_LR = "match_rms_adamw"


def muon_class() -> type[torch.optim.Optimizer]:
    muon = getattr(torch.optim, "Muon", None)
    if muon is None:
        raise UserError(f"--optimizer muon needs torch.optim.Muon (torch >= 2.9); this torch is {torch.__version__}")
    return muon


class MuonAdamW(torch.optim.Optimizer):
    """Groups with `"muon": True` (2-D hidden matrices) run torch.optim.Muon, the others AdamW.

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
        muon_groups = [group for group in groups if group.get("muon")]
        adamw_groups = [group for group in groups if not group.get("muon")]
        self._muon = (
            muon_class()(muon_groups, lr=lr, weight_decay=weight_decay, momentum=momentum, adjust_lr_fn=ADJUST_LR)
            if muon_groups
            else None
        )
        self._adamw = (
            torch.optim.AdamW(adamw_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
            if adamw_groups
            else None
        )
        super().__init__(groups, {})  # the same group dicts, now filled in by the inner optimizers, in order
        self._link()

    def _inner(self) -> list[torch.optim.Optimizer]:
        return [inner for inner in (self._muon, self._adamw) if inner is not None]

    def _link(self) -> None:
        """Point the inner optimizers at this optimizer's group dicts and state."""
        if self._muon is not None:
            self._muon.param_groups = [group for group in self.param_groups if group.get("muon")]
        if self._adamw is not None:
            self._adamw.param_groups = [group for group in self.param_groups if not group.get("muon")]
        for inner in self._inner():
            inner.state = self.state

    @classmethod
    def state_layout(cls, shape: tuple[int, ...], group: Mapping[str, Any], itemsize: int) -> list[StateTensor]:
        """torch.optim.Muon keeps one momentum buffer like the gradient (no step count); AdamW its own."""
        if group.get("muon"):
            return [StateTensor("momentum_buffer", math.prod(shape), itemsize)]
        return torch_adam_state_layout(shape, group, itemsize)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for inner in self._inner():
            inner.step()
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch replaces the group dicts and the state on load: re-link the inner optimizers to the new ones."""
        super().load_state_dict(state_dict)
        self._link()
