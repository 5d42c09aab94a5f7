"""--accumulate-projected: layer-wise accumulation of R = P^T G instead of G (optim/layerwise.py)."""

from __future__ import annotations

import functools

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


def _backward(model: torch.nn.Module, batches: list[torch.Tensor]) -> None:
    for ids in batches:
        model(input_ids=ids, labels=ids).loss.backward()


def _train(
    projected: bool,
    optimizer: str = "galore_adamw",
    gap: int = 100,
    stagger: bool = False,
    steps: int = 4,
    first: int = 4,
):
    """Steps of 4 micro-batches (step 0: `first`), as the training loop drives them (step 0's first projections
    from replays)."""
    model = build_model(CONFIG, seed=0)
    cfg = TrainConfig(optimizer=optimizer, rank=8, gap=gap, stagger_refresh=stagger, lr=1e-2, num_training_steps=steps)
    updater = LayerwiseUpdater(model, build_optimizer(model, cfg), projected=projected)
    history = []
    for step in range(steps):
        batches = _batches(step, first if step == 0 else MICRO_BATCHES)
        replays = updater.take_first_bases(functools.partial(_backward, model, batches), len(batches))
        assert replays == (projected and step == 0 and len(batches) > 1) * (1 + stagger)  # gap 2 staggered: 2 groups
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
    """8-bit moments: step 0 on one micro-batch. Summed as R, its 4 micro-batches differ from the summed G by fp32
    rounding (~1e-7), which can move a first moment across an 8-bit code boundary (1e-3 two steps later)."""
    first = 1 if optimizer == "galore_adamw8bit" else MICRO_BATCHES
    _assert_same_runs(_train(False, optimizer, first=first), _train(True, optimizer, first=first))


@pytest.mark.parametrize("stagger", [False, True])
def test_refresh_steps_take_the_summed_gradient(stagger: bool) -> None:
    """gap 2: every matrix refreshes at steps 2 and 4 (or, staggered, half of them at each step): the refreshing
    matrices sum G, so their SVD sees the step's whole gradient and the run equals full accumulation throughout."""
    _assert_same_runs(_train(False, gap=2, stagger=stagger, steps=6), _train(True, gap=2, stagger=stagger, steps=6))


@pytest.mark.parametrize("replayed", [True, False])
def test_the_first_projection_comes_from_the_whole_step(replayed: bool) -> None:
    """With the training loop's replay, step 0's projection is the SVD of the summed gradient (exact); driven
    without it (the updater used on its own), of the first micro-batch's."""
    model = build_model(CONFIG, seed=0)
    cfg = TrainConfig(optimizer="galore_adamw", rank=8, gap=100, num_training_steps=1)
    optimizer = build_optimizer(model, cfg)
    updater = LayerwiseUpdater(model, optimizer, projected=True)
    down_proj = model.model.layers[0].mlp.down_proj.weight  # 64 x 160: projected on the left, R = P^T G
    grads = []
    down_proj.register_hook(lambda grad: grads.append(grad.clone()))
    batches = _batches(1, MICRO_BATCHES)
    if replayed:
        assert updater.take_first_bases(lambda: _backward(model, batches), len(batches)) == 1
    for ids in batches[:-1]:
        with updater.accumulating():
            model(input_ids=ids, labels=ids).loss.backward()
    held = updater._held_low_rank[down_proj]
    assert held.shape == (8, 160)  # r x n, not the m x n gradient
    model(input_ids=batches[-1], labels=batches[-1]).loss.backward()
    projection = optimizer.state[down_proj]["projection"]
    basis_of = torch.stack(grads[:MICRO_BATCHES]).sum(0) if replayed else grads[0]
    expected = torch.linalg.svd(basis_of.float(), full_matrices=False)[0][:, :8]
    assert torch.allclose(projection.abs(), expected.abs(), atol=1e-4)


@pytest.mark.parametrize("stagger", [False, True])
def test_replays_hold_no_more_than_the_worst_step(stagger: bool, gap: int = 2) -> None:
    """The full gradients a replay sums fit in what the worst step holds between micro-batches (the estimator's
    count), so step 0's exact projections do not raise the peak; every matrix gets one, each in one replay."""
    model = build_model(CONFIG, seed=0)
    cfg = TrainConfig(optimizer="galore_adamw", rank=8, gap=gap, stagger_refresh=stagger, num_training_steps=4)
    optimizer = build_optimizer(model, cfg)
    updater = LayerwiseUpdater(model, optimizer, projected=True)
    batches, summed, groups = _batches(0, 2), [], []

    def replay() -> None:
        _backward(model, batches)
        summed.append(unique_nbytes(list(updater._basis.values())))
        groups.append(list(updater._basis))
        assert all(p.grad is None for p in model.parameters())  # nothing else is kept, nothing stepped

    before = [p.detach().clone() for p in model.parameters()]
    assert updater.take_first_bases(replay, len(batches)) == len(groups) == 1 + stagger
    options = {"dtype": "fp32", "layerwise": True, "total_batch_size": 2, "gap": gap, "stagger_refresh": stagger}
    estimate = estimate_memory(CONFIG, "galore_adamw", 8, accumulate_projected=True, **options)
    largest = max(p.numel() for p in model.parameters()) * 4
    assert max(summed) <= estimate.gradients - largest
    assert sorted(map(id, sum(groups, []))) == sorted(map(id, optimizer.projected_params()))
    assert all("projection" in optimizer.state[p] for p in optimizer.projected_params())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


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
