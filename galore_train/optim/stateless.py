"""Stateless optimizers of the hidden matrices (SWAN, SinkGD), with AdamW on the other parameters.

SWAN (Ma et al., ICML 2025) and SinkGD (Scetbon et al., NeurIPS 2025) replace Adam's moments on the 2-D
hidden weights by a normalization of the current gradient alone, so those weights keep no optimizer state
at all (SGD's memory); both papers keep Adam on the embeddings, the LM head and the norms. One optimizer holds
both kinds of param group, so checkpoints, the LR schedule and layer-wise updates see one torch optimizer:

    groups with "stateless": True     W <- (1 - lr wd) W - lr * normalize(G)      (no state)
    the other groups                  AdamW exactly (GaLoreAdamW's plain groups: torch.optim.AdamW's math)

Subclasses give `normalize` (float32 in, float32 out; the update is cast to the weight's dtype), a function
of G only. The normalized update has an RMS of about 1 per entry in both papers (rows and columns scaled to
norms sqrt(n) and sqrt(m)), like Adam's early updates, so AdamW's learning rate is the natural start.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from torch import Tensor

from galore_train.optim.galore_adamw import GaLoreAdamW
from galore_train.optim.layout import StateTensor
from galore_train.optim.projector import GaLoreProjector


class StatelessMatrixAdamW(GaLoreAdamW):
    """AdamW whose `"stateless": True` groups (2-D weights) take `normalize(G)` steps and keep no state.

    Example:
        SwanAdamW([{"params": others}, {"params": matrices, "stateless": True}], lr=1e-3)
    """

    NAME = "stateless"

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if not group.get("stateless"):
            return
        if "rank" in group:
            raise ValueError(f"{self.NAME} is not a GaLore optimizer: its matrices take no rank")
        for p in group["params"]:
            if p.dim() != 2:
                raise ValueError(
                    f"{self.NAME} normalizes 2-D gradients; a stateless group holds shape {tuple(p.shape)}"
                )

    @classmethod
    def state_layout(cls, shape: tuple[int, ...], group: Mapping[str, Any], itemsize: int) -> list[StateTensor]:
        """Nothing for the stateless matrices; AdamW's moments elsewhere."""
        return [] if group.get("stateless") else super().state_layout(shape, group, itemsize)

    def normalize(self, grad: Tensor, group: Mapping[str, Any]) -> Tensor:
        """The update direction for one 2-D float32 gradient (a new tensor; `grad` is not written)."""
        raise NotImplementedError

    def _step_parameter(
        self, p: Tensor, group: dict[str, Any], projector: Optional[GaLoreProjector], name: Optional[str]
    ) -> None:
        if not group.get("stateless"):
            super()._step_parameter(p, group, projector, name)
            return
        if p.grad.is_sparse:
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
        update = self.normalize(p.grad.to(torch.float32), group)
        decay = 1.0 - group["lr"] * group["weight_decay"]
        if decay != 1.0:
            p.mul_(decay)
        p.add_(update.to(p.dtype), alpha=-group["lr"])
