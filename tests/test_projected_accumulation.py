"""--accumulate-projected: layer-wise accumulation of R = P^T G instead of G (optim/layerwise.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_LLAMA
from transformers import LlamaConfig

from galore_train.config import TrainConfig
from galore_train.errors import UserError
from galore_train.memory.estimate import estimate_memory
from galore_train.memory.meter import unique_nbytes
from galore_train.model import build_model
from galore_train.optim.layerwise import LayerwiseUpdater
from galore_train.optimizers import build_optimizer

CONFIG = LlamaConfig(**{**TINY_LLAMA, "vocab_size": 256})
MICRO_BATCHES = 4


def _batches(step: int, count: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    return [torch.randint(0, CONFIG.vocab_size, (2, 16), generator=generator) for _ in range(count)]


def _train(projected: bool, optimizer: str = "galore_adamw", gap: int = 100, stagger: bool = False, steps: int = 4):
    """Step 0 on one micro-batch (its first projection sees the same gradient either way), then steps of 4."""
    model = build_model(CONFIG, seed=0)
    cfg = TrainConfig(optimizer=optimizer, rank=8, gap=gap, stagger_refresh=stagger, lr=1e-2, num_training_steps=steps)
    updater = LayerwiseUpdater(model, build_optimizer(model, cfg), projected=projected)
    history = []
    for step in range(steps):
        batches = _batches(step, 1 if step == 0 else MICRO_BATCHES)
        for ids in batches[:-1]:
            with updater.accumulating():
                model(input_ids=ids, labels=ids).loss.backward()
        model(input_ids=batches[-1], labels=batches[-1]).loss.backward()
        updater.finish()
        history.append({name: p.detach().clone() for name, p in model.named_parameters()})
    return history


def _assert_same_runs(full: list[dict[str, torch.Tensor]], projected: list[dict[str, torch.Tensor]]) -> None:
    for step, (a, b) in enumerate(zip(full, projected)):
        worst = max((a[name] - b[name]).abs().max().item() for name in a)
        assert worst <= 1e-5, f"step {step}: {worst}"
    assert any(not torch.equal(full[0][n], full[-1][n]) for n in full[0])  # the weights did move


@pytest.mark.parametrize("optimizer", ["galore_adamw", "galore_adamw8bit", "natural_galore_adamw"])
def test_projected_accumulation_equals_full_gradient_accumulation_between_refreshes(optimizer: str) -> None:
    _assert_same_runs(_train(False, optimizer), _train(True, optimizer))


@pytest.mark.parametrize("stagger", [False, True])
def test_refresh_steps_take_the_summed_gradient(stagger: bool) -> None:
    """gap 2: every matrix refreshes at steps 2 and 4 (or, staggered, half of them at each step): the refreshing
    matrices sum G, so their SVD sees the step's whole gradient and the run equals full accumulation throughout."""
    _assert_same_runs(_train(False, gap=2, stagger=stagger, steps=6), _train(True, gap=2, stagger=stagger, steps=6))


def test_the_first_projection_comes_from_the_first_micro_batch() -> None:
    model = build_model(CONFIG, seed=0)
    cfg = TrainConfig(optimizer="galore_adamw", rank=8, gap=100, num_training_steps=1)
    optimizer = build_optimizer(model, cfg)
    updater = LayerwiseUpdater(model, optimizer, projected=True)
    down_proj = model.model.layers[0].mlp.down_proj.weight  # 64 x 160: projected on the left, R = P^T G
    first = {}
    down_proj.register_hook(lambda grad: first.setdefault("grad", grad.clone()))
    batches = _batches(1, MICRO_BATCHES)
    for ids in batches[:-1]:
        with updater.accumulating():
            model(input_ids=ids, labels=ids).loss.backward()
    held = updater._held_low_rank[down_proj]
    assert held.shape == (8, 160)  # r x n, not the m x n gradient
    model(input_ids=batches[-1], labels=batches[-1]).loss.backward()
    projection = optimizer.state[down_proj]["projection"]
    expected = torch.linalg.svd(first["grad"].float(), full_matrices=False)[0][:, :8]
    assert torch.allclose(projection.abs(), expected.abs(), atol=1e-4)


@pytest.mark.parametrize("stagger, step", [(True, 1), (False, 2)])
def test_held_bytes_equal_the_estimate(stagger: bool, step: int, gap: int = 2) -> None:
    """Between micro-batches the updater holds each target's R and every other gradient, and the full gradient
    of the matrices the step refreshes (gap 2 staggered: one layer's at step 1; unstaggered: all at step 2): the
    estimator's count at its worst step (its gradient part adds the one full gradient being formed, the
    largest)."""
    model = build_model(CONFIG, seed=0)
    cfg = TrainConfig(optimizer="galore_adamw", rank=8, gap=gap, stagger_refresh=stagger, num_training_steps=4)
    updater = LayerwiseUpdater(model, build_optimizer(model, cfg), projected=True)
    for ids in _batches(0, step):  # steps of one micro-batch up to `step`
        model(input_ids=ids, labels=ids).loss.backward()
        updater.finish()
    ids = _batches(step, 1)[0]
    with updater.accumulating():
        model(input_ids=ids, labels=ids).loss.backward()
    held = unique_nbytes([*updater._held.values(), *updater._held_low_rank.values()])
    options = {"dtype": "fp32", "layerwise": True, "total_batch_size": 2, "gap": gap, "stagger_refresh": stagger}
    estimate = estimate_memory(CONFIG, "galore_adamw", 8, accumulate_projected=True, **options)
    largest = max(p.numel() for p in model.parameters()) * 4
    assert estimate.gradients == held + largest
    full = estimate_memory(CONFIG, "galore_adamw", 8, **options)
    assert estimate.gradients < full.gradients if stagger else estimate.gradients >= full.gradients  # no saving


def test_projected_accumulation_is_refused_where_it_cannot_work() -> None:
    with pytest.raises(UserError, match="reads the full gradient"):
        estimate_memory(CONFIG, "fira_adamw", 8, layerwise=True, accumulate_projected=True)
    with pytest.raises(UserError, match="runs on one process"):
        estimate_memory(CONFIG, "galore_adamw", 8, layerwise=True, accumulate_projected=True, nproc=2)
    model = build_model(CONFIG, seed=0)
    optimizer = build_optimizer(model, TrainConfig(optimizer="galore_adamw", rank=8, num_training_steps=1))
    with pytest.raises(UserError, match="runs on one process"):
        LayerwiseUpdater(model, optimizer, projected=True, reduce=lambda grad: None)
