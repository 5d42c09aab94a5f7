"""Loss guard: decide, before any gradient reaches the weights, whether a step's loss is usable.

A non-finite loss stops the run (default) or skips the step (`--skip-nonfinite`); so does a non-finite
gradient norm with a finite loss (an overflow inside backward), checked before the update is applied. With
`--spike-threshold F`, a loss above F x the running mean of accepted losses is skipped as well: long
8-bit/layer-wise runs are known to blow up after a single bad batch, and one skipped update is cheap
next to restarting days of training. `--max-spikes` consecutive skips stop the run, since then the
model, not the batch, is the problem. The check runs before backward, so it also protects layer-wise
updates, which happen inside backward.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from galore_train.errors import TrainingStopped


class LossGuard:
    ema_decay = 0.95  # running mean over roughly the last 20 accepted steps
    warmup_steps = 10  # accepted steps before spike detection starts (early losses fall fast)

    def __init__(self, *, spike_threshold: Optional[float], skip_nonfinite: bool, max_consecutive: int) -> None:
        self.spike_threshold = spike_threshold
        self.skip_nonfinite = skip_nonfinite or spike_threshold is not None
        self.max_consecutive = max_consecutive
        self.running_mean: Optional[float] = None
        self.accepted = 0
        self.consecutive_skips = 0
        self.total_skips = 0

    def reason_to_skip(self, loss: float) -> Optional[str]:
        """None if the loss is usable, else why not."""
        if not math.isfinite(loss):
            return f"loss became {loss}"
        if self.spike_threshold is None or self.accepted < self.warmup_steps:
            return None
        if loss > self.spike_threshold * self.running_mean:
            return f"loss spiked to {loss:.4f} (> {self.spike_threshold} x running mean {self.running_mean:.4f})"
        return None

    @staticmethod
    def reason_to_skip_gradient(grad_norm: float) -> Optional[str]:
        """None if the step's gradient norm is finite, else why the step must not be applied."""
        return None if math.isfinite(grad_norm) else f"gradient norm became {grad_norm} (loss was finite)"

    def reject(self, reason: str, where: str) -> None:
        """Count a skipped step, or stop the run when skipping is off or has gone on too long."""
        if not self.skip_nonfinite:
            raise TrainingStopped(f"{reason}{where} (use --skip-nonfinite or --spike-threshold to skip such steps)", 3)
        self.total_skips += 1
        self.consecutive_skips += 1
        if self.consecutive_skips >= self.max_consecutive:
            raise TrainingStopped(f"{reason}: {self.consecutive_skips} consecutive steps skipped{where}", 3)

    def accept(self, loss: float) -> None:
        self.consecutive_skips = 0
        self.accepted += 1
        self.running_mean = (
            loss if self.running_mean is None else self.ema_decay * self.running_mean + (1 - self.ema_decay) * loss
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "running_mean": self.running_mean,
            "accepted": self.accepted,
            "consecutive_skips": self.consecutive_skips,
            "total_skips": self.total_skips,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.running_mean = state["running_mean"]
        self.accepted = state["accepted"]
        self.consecutive_skips = state["consecutive_skips"]
        self.total_skips = state["total_skips"]
