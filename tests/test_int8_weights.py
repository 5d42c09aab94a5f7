"""INT8 weights (--int8-weights): the codes, the layer, the update, every matrix optimizer, resume after a crash,
the plain-transformers export, and the one-line refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_LLAMA, run_straight_and_crashed, tiny_run_args
from safetensors.torch import load_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from galore_train.config import TrainConfig
from galore_train.errors import UserError
from galore_train.model import build_model
from galore_train.optim.layerwise import LayerwiseUpdater
from galore_train.optimizers import build_optimizer
from galore_train.train import Trainer
from galore_train.weights.export import INT8_FILE
from galore_train.weights.int8 import dequantize_rows, int8_nbytes, quantize_rows_
from galore_train.weights.int8_linear import Int8Linear, int8_linears
from galore_train.weights.stepping import Int8Weights, quantize_targets, rounded_weights_for_run

CONFIG = LlamaConfig(**{**TINY_LLAMA, "vocab_size": 256})
GROUP = 32  # divides hidden 64 and intermediate 160


def _codes(matrix: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    m, n = matrix.shape
    codes, scales = torch.empty(m, n, dtype=torch.int8), torch.empty(m, n // GROUP)
    quantize_rows_(matrix, codes, scales, GROUP, generator)
    return codes, scales


def test_nearest_rounding_is_within_half_a_step_and_stochastic_rounding_is_unbiased() -> None:
    matrix = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    codes, scales = _codes(matrix)
    step = scales.repeat_interleave(GROUP, dim=1)
    assert ((dequantize_rows(codes, scales, torch.float32) - matrix).abs() <= step / 2 + 1e-7).all()
    generator = torch.Generator().manual_seed(1)
    mean = sum(dequantize_rows(*_codes(matrix, generator), torch.float32) for _ in range(400)) / 400
    # unbiased: the mean of 400 draws is within 4 standard errors (at most step / 2 / sqrt(400)) of the value
    assert ((mean - matrix).abs() <= 4 * step / 2 / 400**0.5).all()
    nearest = (dequantize_rows(codes, scales, torch.float32) - matrix).abs().mean()
    assert (mean - matrix).abs().mean() < nearest / 4  # nearest rounding's error does not average out


def test_int8_bytes_and_row_groups() -> None:
    layer = Int8Linear(nn.Linear(64, 160, bias=False), GROUP)
    assert layer.weight_int8.nbytes + layer.weight_scale.nbytes == int8_nbytes((160, 64), GROUP)
    with pytest.raises(ValueError, match="must divide the row length 64"):
        Int8Linear(nn.Linear(64, 160, bias=False), 48)


def test_layer_forward_and_backward_equal_a_linear_on_the_dequantized_weight() -> None:
    torch.manual_seed(0)
    layer = Int8Linear(nn.Linear(64, 96, bias=False), GROUP)
    x = torch.randn(3, 5, 64, requires_grad=True)
    layer(x).square().sum().backward()
    weight = layer.dequantized().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    nn.functional.linear(x2, weight).square().sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-6) and torch.allclose(layer.weight.grad, weight.grad, atol=1e-5)
    assert layer.weight.untyped_storage().nbytes() == 4  # the surrogate holds one element, not the matrix


@pytest.mark.parametrize("layerwise", [False, True])
def test_update_dequantizes_steps_and_requantizes_each_matrix(layerwise: bool) -> None:
    """SGD on INT8 weights (nearest rounding) = quantize(dequantized - lr * gradient), matrix by matrix."""
    model = quantize_targets(build_model(CONFIG, seed=0), _cfg(int8_rounding="nearest"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    int8 = Int8Weights(model, stochastic=False, seed=0)
    int8.attach(optimizer)
    updater = LayerwiseUpdater(model, optimizer) if layerwise else None
    before = {name: layer.dequantized() for name, layer in int8_linears(model)}
    grads = {}
    for name, layer in int8_linears(model):
        layer.weight.register_hook(lambda grad, name=name: grads.__setitem__(name, grad.clone()))
    ids = torch.randint(0, CONFIG.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    if updater is None:
        int8.step(optimizer)
    for name, layer in int8_linears(model):
        codes, scales = _codes(before[name] - 0.5 * grads[name])
        assert torch.equal(layer.weight_int8, codes) and torch.equal(layer.weight_scale, scales), name
        assert layer.weight.untyped_storage().nbytes() == 4  # emptied again after the step


def _cfg(**options) -> TrainConfig:
    values = {"int8_weights": True, "int8_group_size": GROUP, "rank": 8, "gap": 2, "num_training_steps": 2, "lr": 1e-2}
    return TrainConfig(**{**values, **options})


MATRIX_OPTIMIZERS = [  # (name, --8bit)
    ("galore_adamw", False),
    ("galore_adamw", True),
    ("galore_adafactor", False),
    ("natural_galore_adamw", False),
    ("fira_adamw", False),
    ("apollo_adamw", False),
    ("apollo_mini", False),
    ("muon", False),
    ("adamw", False),
    ("adamw", True),
]


@pytest.mark.parametrize("name, eightbit", MATRIX_OPTIMIZERS)
def test_every_matrix_optimizer_trains_int8_weights(name: str, eightbit: bool) -> None:
    if name == "muon" and not hasattr(torch.optim, "Muon"):
        pytest.skip("torch.optim.Muon needs torch >= 2.9")
    cfg = _cfg(optimizer=name, eightbit=eightbit)
    model = quantize_targets(build_model(CONFIG, seed=0), cfg)
    optimizer = build_optimizer(model, cfg)
    int8 = rounded_weights_for_run(model, cfg)
    int8.attach(optimizer)
    codes = {name: layer.weight_int8.clone() for name, layer in int8_linears(model)}
    ids = torch.randint(0, CONFIG.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        int8.step(optimizer)
        optimizer.zero_grad(set_to_none=True)
    changed = [not torch.equal(codes[name], layer.weight_int8) for name, layer in int8_linears(model)]
    assert all(changed)
    assert all(torch.isfinite(layer.dequantized()).all() for _, layer in int8_linears(model))


# --- runs: resume after a crash, export -----------------------------------------------------------


def _run_args(config_file: str, output_dir: Path, **options) -> TrainConfig:
    values = dict(
        optimizer="galore_adamw",
        rank=16,
        gap=2,
        int8_weights=True,
        int8_group_size=GROUP,
        num_training_steps=6,
        eval_every=100,
        save_every=3,
        warmup_steps=1,
        total_batch_size=8,
    )
    return TrainConfig(**tiny_run_args(config_file, output_dir, **{**values, **options}))


def _final(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(output_dir / "checkpoints" / "step_00000006" / INT8_FILE))


@pytest.mark.slow
@pytest.mark.parametrize("layerwise", [False, True])
def test_resume_after_a_crash_is_bit_exact(layerwise, tiny_config_file, tmp_path, monkeypatch, shared_data) -> None:
    """A crash after step 4 (nothing saved since step 3, like kill -9) and --resume: the same codes at step 6."""
    run_straight_and_crashed(
        lambda name: _run_args(tiny_config_file, tmp_path / name, layerwise=layerwise), 4, monkeypatch
    )
    straight, split = _final(tmp_path / "straight"), _final(tmp_path / "split")
    assert straight.keys() == split.keys() and all(torch.equal(straight[k], split[k]) for k in straight)


@pytest.mark.slow
def test_checkpoint_loads_in_plain_transformers_and_generates(tiny_config_file, tmp_path, shared_data) -> None:
    trainer = Trainer(_run_args(tiny_config_file, tmp_path / "run", num_training_steps=3))
    trainer.run()
    folder = tmp_path / "run" / "checkpoints" / "step_00000003"
    plain = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = torch.randint(0, 1000, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, trainer.model(input_ids=ids).logits, atol=1e-5)
    assert plain.generate(ids, max_new_tokens=4, do_sample=False).shape == (1, 12)
    assert any(key.endswith("q_proj.weight_int8") for key in load_file(str(folder / INT8_FILE)))


# --- refusals -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, message",
    [
        ({"optimizer": "lora"}, "--int8-weights stores the dense target weights"),
        ({"optimizer": "low_rank"}, "--int8-weights stores the dense target weights"),
        ({"int8_group_size": 0}, "--int8-group-size must be positive"),
        ({"int8_rounding": "up"}, "--int8-rounding must be one of"),
        ({"distributed": "fsdp"}, "does not run under --distributed fsdp"),
        ({"accumulate_projected": True, "optimizer": "galore_adamw"}, "is a --layerwise option"),
        ({"accumulate_projected": True, "optimizer": "fira_adamw", "layerwise": True}, "reads the full gradient"),
        ({"accumulate_projected": True, "optimizer": "apollo_mini", "layerwise": True}, "reads the full gradient"),
    ],
)
def test_bad_combinations_are_one_line_errors(options: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        TrainConfig(**{"int8_weights": True, "num_training_steps": 1, **options}).validate()


def test_a_group_size_that_does_not_divide_a_row_is_a_user_error() -> None:
    with pytest.raises(UserError, match="--int8-group-size 48 must divide the row length 64"):
        quantize_targets(build_model(CONFIG, seed=0), _cfg(int8_group_size=48))


def test_config_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    _cfg().save(str(path))
    assert json.loads(path.read_text())["int8_weights"] is True
