"""bf16 weights with stochastic rounding (--dtype bf16 --stochastic-rounding): the rounding, updates below bf16's
spacing, every optimizer, bit-exact resume, and the one-line refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY_LLAMA, run_straight_and_crashed, tiny_run_args
from safetensors.torch import load_file
from transformers import LlamaConfig

from galore_train.config import TrainConfig
from galore_train.errors import UserError
from galore_train.memory.estimate import estimate_memory, parameter_shapes
from galore_train.memory.meter import GIB, MemoryMeter
from galore_train.model import build_model, load_model_config
from galore_train.optim.layerwise import LayerwiseUpdater
from galore_train.optimizers import build_optimizer
from galore_train.weights.bf16 import stochastic_round_to_bf16_
from galore_train.weights.stepping import BF16StochasticRounding, rounded_weights_for_run

CONFIG = LlamaConfig(**{**TINY_LLAMA, "vocab_size": 256})


def _neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 values just below and above each fp32 value (truncation toward -inf and +inf)."""
    toward_zero = (x.view(torch.int32) & -(1 << 16)).view(torch.float32)
    away = (toward_zero.view(torch.int32) + (1 << 16)).view(torch.float32)
    exact = toward_zero == x
    away = torch.where(exact, x, away)
    return torch.minimum(toward_zero, away), torch.maximum(toward_zero, away)


def test_stochastic_rounding_to_bf16_is_unbiased() -> None:
    x = torch.randn(64, 128, generator=torch.Generator().manual_seed(0)) * torch.logspace(-6, 3, 128)
    low, high = _neighbours(x)
    generator = torch.Generator().manual_seed(1)
    draws = 1000
    total = torch.zeros_like(x, dtype=torch.float64)
    for _ in range(draws):
        rounded = stochastic_round_to_bf16_(x.clone(), torch.empty_like(x, dtype=torch.bfloat16), generator).float()
        assert ((rounded == low) | (rounded == high)).all()  # always one of the two neighbours
        total += rounded
    mean = (total / draws).float()
    spacing = (high - low).clamp_min(torch.finfo(torch.float32).tiny)
    # unbiased: P(up) = (x - low) / spacing, so the mean of the draws is within 5 standard errors of x
    p_up = (x - low) / spacing
    standard_error = spacing * (p_up * (1 - p_up) / draws).sqrt()
    assert ((mean - x).abs() <= 5 * standard_error + 1e-12 * spacing).all()
    nearest_error = ((x.to(torch.bfloat16).float() - x).abs() / spacing).mean()
    assert ((mean - x).abs() / spacing).mean() < nearest_error / 4  # nearest rounding's error does not average out
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0])
    out = stochastic_round_to_bf16_(specials.clone(), torch.empty(5, dtype=torch.bfloat16), generator).float()
    assert out[0].isnan() and out[1:].tolist() == [float("inf"), -float("inf"), 0.0, 0.0]


def _sgd_on_ones(stochastic: bool, steps: int, lr: float) -> torch.Tensor:
    """SGD on a bf16 vector of ones with a constant gradient of -1: each update is lr, far below bf16's spacing
    at 1.0 (2^-7 = 0.0078). A negligible momentum gives it a state (its momentum buffer, in bf16: exactly -1)."""
    weight = torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
    optimizer = torch.optim.SGD([weight], lr=lr, momentum=1e-9)
    model = torch.nn.Module()
    model.weight = weight
    if stochastic:
        BF16StochasticRounding(model, seed=0).attach(optimizer)
    for _ in range(steps):
        weight.grad = torch.full_like(weight, -1.0)
        optimizer.step()
    assert weight.dtype == torch.bfloat16
    assert optimizer.state[weight]["momentum_buffer"].dtype == torch.bfloat16  # the state keeps the weight's dtype
    return weight.float()


def test_updates_below_bf16_spacing_accumulate_in_expectation() -> None:
    steps, lr = 400, 1e-4
    nearest = _sgd_on_ones(stochastic=False, steps=steps, lr=lr)
    stochastic = _sgd_on_ones(stochastic=True, steps=steps, lr=lr)
    assert torch.equal(nearest, torch.ones(4096))  # every update rounded away
    # the first update creates the state in bf16 and rounds to nearest; the other 399 move by lr in expectation
    expected = (steps - 1) * lr
    assert (stochastic.mean() - 1.0).item() == pytest.approx(expected, rel=0.05)


MATRIX_OPTIMIZERS = [  # (name, --8bit)
    ("galore_adamw", False),
    ("galore_adamw", True),
    ("galore_adafactor", False),
    ("fira_adamw", False),
    ("apollo_mini", False),
    ("muon", False),
    ("adamw", False),
]


def _sr_cfg(**options) -> TrainConfig:
    values = {"dtype": "bf16", "stochastic_rounding": True, "rank": 8, "gap": 2, "num_training_steps": 3, "lr": 1e-2}
    return TrainConfig(**{**values, **options})


@pytest.mark.parametrize("layerwise", [False, True])
@pytest.mark.parametrize("name, eightbit", MATRIX_OPTIMIZERS)
def test_every_optimizer_steps_on_fp32_copies_and_keeps_its_state_dtypes(name, eightbit, layerwise) -> None:
    """With and without --stochastic-rounding the optimizer state has the same dtypes and bytes; the weights stay
    bf16 tensors (the same objects) and every one of them moves."""
    if name == "muon" and not hasattr(torch.optim, "Muon"):
        pytest.skip("torch.optim.Muon needs torch >= 2.9")
    states = {}
    for stochastic in (False, True):
        cfg = _sr_cfg(optimizer=name, eightbit=eightbit, layerwise=layerwise, stochastic_rounding=stochastic)
        model = build_model(CONFIG, seed=0, dtype=torch.bfloat16)
        optimizer = build_optimizer(model, cfg)
        rounded = rounded_weights_for_run(model, cfg)
        if rounded is not None:
            rounded.attach(optimizer)
        updater = LayerwiseUpdater(model, optimizer) if layerwise else None
        tensors = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
        ids = torch.randint(0, CONFIG.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
        for _ in range(3):
            model(input_ids=ids, labels=ids).loss.backward()
            if updater is None:
                rounded.step(optimizer) if rounded is not None else optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        for n, p in model.named_parameters():
            assert p is tensors[n][0] and p.dtype == torch.bfloat16, n
            assert torch.isfinite(p).all() and not torch.equal(p, tensors[n][1]), n
        names = {p: n for n, p in model.named_parameters()}
        states[stochastic] = {
            names[p]: [(key, value.dtype, value.nbytes) for key, value in state.items() if torch.is_tensor(value)]
            for p, state in optimizer.state.items()
        }
    assert states[True] == states[False]


def test_the_estimate_counts_one_fp32_copy_of_the_largest_parameter() -> None:
    options = dict(dtype="bf16", layerwise=True)
    plain = estimate_memory(CONFIG, "galore_adamw", 8, **options)
    rounded = estimate_memory(CONFIG, "galore_adamw", 8, stochastic_rounding=True, **options)
    largest = max(torch.Size(shape).numel() for _, shape, _ in parameter_shapes(CONFIG, ["attn", "mlp"]))
    assert rounded.peak - plain.peak == rounded.dequantized == 4 * largest
    assert "stochastic rounding" in rounded.label


@pytest.mark.slow
def test_the_meter_measures_what_the_estimate_adds_at_llama_20m_shapes() -> None:
    """One optimizer step (its state in place) on random bf16 gradients, with and without --stochastic-rounding,
    side by side: the measured peak grows by the estimate's fp32 copy of the largest parameter (the embedding)."""
    config = load_model_config("llama_20m")
    peaks = {}
    for stochastic in (False, True):
        cfg = TrainConfig(optimizer="galore_adamw", rank=64, dtype="bf16", stochastic_rounding=stochastic)
        model = build_model(config, seed=0, dtype=torch.bfloat16)
        optimizer = build_optimizer(model, cfg.replace(num_training_steps=2))
        rounded = rounded_weights_for_run(model, cfg)
        if rounded is not None:
            rounded.attach(optimizer)
        meter = MemoryMeter(model, optimizer, "cpu")
        generator = torch.Generator().manual_seed(0)
        for _ in range(2):  # the first step creates the state (and rounds to nearest)
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=generator).to(torch.bfloat16)
            with meter.track():
                rounded.step(optimizer) if rounded is not None else optimizer.step()
            reading = meter.read_and_reset()
            optimizer.zero_grad(set_to_none=True)
        peaks[stochastic] = reading["peak_memory_gb"] * GIB
    estimate = estimate_memory(config, "galore_adamw", 64, dtype="bf16", stochastic_rounding=True)
    assert peaks[True] - peaks[False] == pytest.approx(estimate.dequantized, rel=0.01)  # measured: equal


def _run_args(config_file: str, output_dir: Path, **options) -> TrainConfig:
    values = dict(optimizer="galore_adamw", rank=16, gap=2, dtype="bf16", stochastic_rounding=True, warmup_steps=1)
    values.update(num_training_steps=4, eval_every=100, save_every=2, batch_size=2, total_batch_size=2, max_length=32)
    return TrainConfig(**tiny_run_args(config_file, output_dir, **{**values, **options}))


@pytest.mark.slow
@pytest.mark.parametrize("layerwise", [False, True])
def test_resume_is_bit_exact(layerwise, tiny_config_file, tmp_path, monkeypatch, shared_data) -> None:
    """A crash after step 3 (nothing saved since step 2) and --resume: the same bf16 weights at step 4 (bf16 matmuls
    are slow on CPUs: a tiny run)."""
    run_straight_and_crashed(
        lambda name: _run_args(tiny_config_file, tmp_path / name, layerwise=layerwise), 3, monkeypatch
    )
    straight, split = (
        load_file(str(d / "checkpoints/step_00000004/model.safetensors"))
        for d in (tmp_path / "straight", tmp_path / "split")
    )
    assert all(t.dtype == torch.bfloat16 for t in straight.values())
    assert straight.keys() == split.keys() and all(torch.equal(straight[k], split[k]) for k in straight)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"dtype": "fp32"}, "--stochastic-rounding rounds updated weights to bf16; it needs --dtype bf16"),
        ({"dtype": "auto"}, "it needs --dtype bf16"),
        ({"int8_weights": True}, "--int8-weights rounds its own"),
        ({"distributed": "fsdp"}, "--stochastic-rounding does not run under --distributed fsdp"),
        ({"optimizer": "adamw", "eightbit": True}, "bitsandbytes' adamw --8bit steps the weight in its own kernel"),
    ],
)
def test_bad_combinations_are_one_line_errors(options: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        TrainConfig(**{"dtype": "bf16", "stochastic_rounding": True, "num_training_steps": 1, **options}).validate()
