"""LR schedule shapes: warm-up, cosine/linear/constant decay, ReLoRA's jagged restarts, mid-run starts."""

from __future__ import annotations

import math

import pytest
import torch

from galore_train.schedule import build_scheduler, lr_factor

PLAIN = dict(total_steps=110, warmup_steps=10, min_ratio=0.1)


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_warmup_is_linear_from_the_first_step(kind):
    assert [lr_factor(s, kind=kind, **PLAIN) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])


def test_cosine_values():
    assert lr_factor(10, kind="cosine", **PLAIN) == pytest.approx(1.0)
    assert lr_factor(60, kind="cosine", **PLAIN) == pytest.approx(0.55)  # half-way: (1 + 0.1) / 2
    assert lr_factor(35, kind="cosine", **PLAIN) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(110, kind="cosine", **PLAIN) == pytest.approx(0.1)
    assert lr_factor(500, kind="cosine", **PLAIN) == pytest.approx(0.1)  # stays at the floor


def test_linear_and_constant_values():
    assert lr_factor(60, kind="linear", **PLAIN) == pytest.approx(0.55)
    assert lr_factor(110, kind="linear", **PLAIN) == pytest.approx(0.1)
    assert lr_factor(85, kind="constant", **PLAIN) == 1.0


def test_unknown_kind():
    with pytest.raises(ValueError, match="unknown schedule 'step'"):
        lr_factor(50, kind="step", **PLAIN)


JAGGED = dict(kind="cosine", restart_every=30, restart_warmup=5, **PLAIN)


def test_jagged_cosine_rewarms_after_each_restart():
    for restart in (30, 60, 90):
        envelope = [lr_factor(restart + i, kind="cosine", **PLAIN) for i in range(6)]
        jagged = [lr_factor(restart + i, **JAGGED) for i in range(6)]
        # linear ramp up to the plain cosine, then back on it
        assert jagged == pytest.approx([envelope[i] * (i + 1) / 5 for i in range(5)] + [envelope[5]])
        assert lr_factor(restart - 1, **JAGGED) == pytest.approx(lr_factor(restart - 1, kind="cosine", **PLAIN))


def test_jagged_keeps_global_warmup_and_skips_step_zero():
    for step in range(0, 30):
        assert lr_factor(step, **JAGGED) == lr_factor(step, kind="cosine", **PLAIN)


def test_restart_inside_global_warmup_is_skipped():
    schedule = dict(JAGGED, restart_every=8)  # restart at 8 falls inside the 10-step warm-up
    assert lr_factor(8, **schedule) == lr_factor(8, kind="cosine", **PLAIN)
    assert lr_factor(16, **schedule) == pytest.approx(lr_factor(16, kind="cosine", **PLAIN) / 5)


def test_restart_offset_moves_the_restarts():
    schedule = dict(JAGGED, restart_offset=25)  # ReLoRA warm start: attach at 25, merges at 55, 85
    for restart in (25, 55, 85):
        assert lr_factor(restart, **schedule) == pytest.approx(lr_factor(restart, kind="cosine", **PLAIN) / 5)
    assert lr_factor(30, **schedule) == pytest.approx(lr_factor(30, kind="cosine", **PLAIN))


def new_optimizer() -> torch.optim.Optimizer:
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))], lr=2.0)


def test_scheduler_follows_lr_factor():
    optimizer = new_optimizer()
    scheduler = build_scheduler(optimizer, **JAGGED)
    for step in range(100):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(2.0 * lr_factor(step, **JAGGED))
        optimizer.step()
        scheduler.step()


def test_scheduler_can_start_mid_run():
    optimizer = new_optimizer()
    scheduler = build_scheduler(optimizer, start_step=40, **JAGGED)
    assert scheduler.last_epoch == 40
    for step in range(40, 70):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(2.0 * lr_factor(step, **JAGGED))
        optimizer.step()
        scheduler.step()
