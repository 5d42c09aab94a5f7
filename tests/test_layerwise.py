"""LayerwiseUpdater: same weights as normal training (steps, accumulation, checkpointing, resume),
one gradient at a time, refusals, and the gradient norm it still reports."""

from __future__ import annotations

import io

import pytest
import torch
from conftest import TINY_LLAMA
from transformers import LlamaConfig

from galore_train.config import TrainConfig
from galore_train.errors import UserError
from galore_train.memory.meter import MemoryMeter
from galore_train.model import build_model
from galore_train.optim.layerwise import LayerwiseUpdater
from galore_train.optimizers import build_optimizer
from galore_train.registry import OPTIMIZER_NAMES
from galore_train.schedule import build_scheduler

CONFIG = LlamaConfig(**{**TINY_LLAMA, "vocab_size": 256})
BATCH, LENGTH = 2, 16


def _setup(optimizer: str, layerwise: bool, checkpointing: bool = False):
    model = build_model(CONFIG, seed=0)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    cfg = TrainConfig(optimizer=optimizer, rank=8, gap=2, lr=1e-2, num_training_steps=10)
    opt = build_optimizer(model, cfg)
    scheduler = build_scheduler(opt, kind="cosine", total_steps=10, warmup_steps=2, min_ratio=0.1)
    updater = LayerwiseUpdater(model, opt) if layerwise else None
    return model, opt, scheduler, updater


def _batches(steps: int, accumulation: int, seed: int = 1) -> list[list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        [torch.randint(0, CONFIG.vocab_size, (BATCH, LENGTH), generator=generator) for _ in range(accumulation)]
        for _ in range(steps)
    ]


def _train(model, opt, scheduler, updater, batches) -> list[float]:
    """The training loop's step, normal or layer-wise; returns the gradient norm of each step."""
    norms = []
    for micro_batches in batches:
        for index, ids in enumerate(micro_batches):
            loss = model(input_ids=ids, labels=ids).loss / len(micro_batches)
            if updater is not None and index < len(micro_batches) - 1:
                with updater.accumulating():
                    loss.backward()
            else:
                loss.backward()
        if updater is None:
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))))
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            norms.append(float(updater.finish()))
        scheduler.step()
    return norms


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """Bit-identical, as docs/memory.md says (every optimizer of the registry, with and without accumulation)."""
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), f"{name}: max difference {(p - q).abs().max().item():.3g}"


@pytest.mark.parametrize("optimizer", OPTIMIZER_NAMES)
@pytest.mark.parametrize("steps", [1, 3])
def test_layerwise_gives_the_weights_of_normal_training(optimizer: str, steps: int) -> None:
    normal, layerwise = _setup(optimizer, False), _setup(optimizer, True)
    batches = _batches(steps, accumulation=1)
    norms = _train(*normal, batches)
    layerwise_norms = _train(*layerwise, batches)
    _assert_same_weights(normal[0], layerwise[0])
    assert layerwise[2].last_epoch == normal[2].last_epoch == steps  # LR schedule: once per step
    assert layerwise_norms == pytest.approx(norms, rel=1e-3)  # the norm is still there for logging


@pytest.mark.parametrize("optimizer", ["adamw", "galore_adamw", "galore_adamw8bit"])
def test_accumulation_with_layerwise_equals_normal_accumulation(optimizer: str) -> None:
    normal, layerwise = _setup(optimizer, False), _setup(optimizer, True)
    batches = _batches(steps=3, accumulation=3)
    _train(*normal, batches)
    _train(*layerwise, batches)
    _assert_same_weights(normal[0], layerwise[0])


def test_accumulating_micro_batches_leave_weights_and_grads_alone() -> None:
    model, opt, _, updater = _setup("adamw", True)
    before = [p.detach().clone() for p in model.parameters()]
    ids = _batches(1, 1)[0][0]
    with updater.accumulating():
        model(input_ids=ids, labels=ids).loss.backward()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert all(p.grad is None for p in model.parameters())
    assert not opt.state


def test_layerwise_with_activation_checkpointing_equals_normal() -> None:
    normal, layerwise = (
        _setup("galore_adamw", False, checkpointing=True),
        _setup("galore_adamw", True, checkpointing=True),
    )
    batches = _batches(steps=2, accumulation=2)
    _train(*normal, batches)
    _train(*layerwise, batches)
    _assert_same_weights(normal[0], layerwise[0])


@pytest.mark.parametrize("optimizer", ["adamw", "adam8bit", "galore_adamw8bit"])
def test_each_optimizer_step_sees_exactly_one_gradient(optimizer: str) -> None:
    """The design's invariant: inside a hook every other .grad is None, so step() updates one parameter."""
    model, opt, scheduler, updater = _setup(optimizer, True)
    seen: list[int] = []
    opt.register_step_pre_hook(lambda *_: seen.append(sum(p.grad is not None for p in model.parameters())))
    _train(model, opt, scheduler, updater, _batches(steps=1, accumulation=2))
    assert seen == [1] * sum(1 for _ in model.parameters())


def test_layerwise_peak_gradient_is_one_parameter() -> None:
    model, opt, scheduler, updater = _setup("galore_adamw", True)
    meter = MemoryMeter(model, opt, "cpu")
    with meter.track():
        _train(model, opt, scheduler, updater, _batches(steps=1, accumulation=1))
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    peak_grads = meter.read_and_reset()["peak_grads_gb"] * 2**30
    assert 0 < peak_grads <= 1.05 * largest


@pytest.mark.parametrize("optimizer", ["adamw", "galore_adamw", "adam8bit", "galore_adamw8bit"])
def test_layerwise_optimizer_state_round_trips_through_a_checkpoint(optimizer: str) -> None:
    batches = _batches(steps=4, accumulation=1)
    straight = _setup(optimizer, True)
    _train(*straight, batches)

    first = _setup(optimizer, True)
    _train(*first, batches[:2])
    buffer = io.BytesIO()
    torch.save(
        {"model": first[0].state_dict(), "optimizer": first[1].state_dict(), "scheduler": first[2].state_dict()}, buffer
    )
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = _setup(optimizer, True)
    resumed[0].load_state_dict(saved["model"])
    resumed[1].load_state_dict(saved["optimizer"])
    resumed[2].load_state_dict(saved["scheduler"])
    _train(*resumed, batches[2:])
    _assert_same_weights(straight[0], resumed[0])


def test_abandon_drops_held_micro_batches() -> None:
    """An abandoned step (e.g. a NaN loss in a later micro-batch) must not leak into the next one."""
    clean, dirty = _setup("adamw", True), _setup("adamw", True)
    ids = _batches(1, 1, seed=7)[0][0]
    with dirty[3].accumulating():
        dirty[0](input_ids=ids, labels=ids).loss.backward()
    dirty[3].abandon()
    batches = _batches(steps=1, accumulation=1)
    _train(*clean, batches)
    _train(*dirty, batches)
    _assert_same_weights(clean[0], dirty[0])


def test_close_restores_normal_backward() -> None:
    model, _, _, updater = _setup("adamw", True)
    updater.close()
    ids = _batches(1, 1)[0][0]
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_global_gradient_clipping_is_refused() -> None:
    model = build_model(CONFIG, seed=0)
    with pytest.raises(UserError, match="--grad-clipping"):
        LayerwiseUpdater(model, torch.optim.AdamW(model.parameters()), grad_clipping=1.0)


def test_multi_process_training_needs_a_gradient_reduction(monkeypatch: pytest.MonkeyPatch) -> None:
    model = build_model(CONFIG, seed=0)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    with pytest.raises(UserError, match="gradient reduction across processes"):
        LayerwiseUpdater(model, torch.optim.AdamW(model.parameters()))
    LayerwiseUpdater(model, torch.optim.AdamW(model.parameters()), reduce=lambda grad: None)
