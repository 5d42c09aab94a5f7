"""The registry, build_optimizer, resolve_optimizer_name: names, --8bit, param grouping, user errors, resume for every
optimizer, each optimizer's own state layout, and an optim package that stands on its own."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_LLAMA
from transformers import LlamaConfig

from galore_train.config import TrainConfig
from galore_train.errors import UserError
from galore_train.model import build_model
from galore_train.optim import GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit
from galore_train.optimizers import build_optimizer, galore_parameter_split
from galore_train.registry import (
    FSDP_NAMES,
    METHOD_NAMES,
    MOMENTS_NAMES,
    OPTIMIZER_NAMES,
    OPTIMIZERS,
    resolve_optimizer_name,
)

ROOT = Path(__file__).resolve().parents[1]

# The shared tiny LLaMA with a small vocabulary: optimizer tests do not need 32,000 embedding rows.
SMALL_LLAMA = LlamaConfig(**{**TINY_LLAMA, "vocab_size": 512})
TARGET_SUFFIXES = (
    "q_proj.weight",
    "k_proj.weight",
    "v_proj.weight",
    "o_proj.weight",
    "gate_proj.weight",
    "up_proj.weight",
    "down_proj.weight",
)


@pytest.fixture(scope="module")
def tiny_model() -> torch.nn.Module:
    return build_model(SMALL_LLAMA, seed=0)


def _cfg(**changes) -> TrainConfig:
    return TrainConfig(**{"num_training_steps": 10, "rank": 8, "gap": 3, **changes})


@pytest.mark.parametrize(
    "name, eightbit, expected",
    [
        ("adamw", False, "adamw"),
        ("adamw", True, "adam8bit"),
        ("adam", True, "adam8bit"),
        ("galore_adamw", True, "galore_adamw8bit"),
        ("adam8bit", True, "adam8bit"),
        ("galore_adamw8bit", True, "galore_adamw8bit"),
        ("galore_adafactor", False, "galore_adafactor"),
    ],
)
def test_resolve_optimizer_name(name: str, eightbit: bool, expected: str) -> None:
    assert resolve_optimizer_name(name, eightbit) == expected


def test_resolve_rejects_unknown_names_and_8bit_without_variant() -> None:
    with pytest.raises(UserError, match="unknown optimizer 'sgd'; known: adamw, adam, adafactor"):
        resolve_optimizer_name("sgd", False)
    with pytest.raises(UserError, match="--8bit has no variant of 'galore_adafactor'"):
        resolve_optimizer_name("galore_adafactor", True)


def test_galore_split_puts_exactly_the_target_weights_in_the_galore_group(tiny_model) -> None:
    galore, plain = galore_parameter_split(tiny_model, ["attn", "mlp"])
    galore_names = [name for name, _ in galore]
    assert len(galore_names) == 7 * TINY_LLAMA["num_hidden_layers"]
    assert all(name.endswith(TARGET_SUFFIXES) for name in galore_names)
    plain_names = {name for name, _ in plain}
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= plain_names
    assert len(galore) + len(plain) == len(list(tiny_model.parameters()))
    attn_only, _ = galore_parameter_split(tiny_model, ["attn"])
    assert len(attn_only) == 4 * TINY_LLAMA["num_hidden_layers"]


@pytest.mark.parametrize(
    "name, cls",
    [("galore_adamw", GaLoreAdamW), ("galore_adafactor", GaLoreAdafactor), ("galore_adamw8bit", GaLoreAdamW8bit)],
)
def test_galore_optimizers_get_a_galore_group_with_the_config(tiny_model, name, cls) -> None:
    cfg = _cfg(optimizer=name, scale=0.5, proj_type="reverse_std", svd="randomized", stagger_refresh=True, lr=2e-3)
    optimizer = build_optimizer(tiny_model, cfg)
    assert type(optimizer) is cls
    plain, galore = optimizer.param_groups
    assert "rank" not in plain and "model.embed_tokens.weight" in plain["param_names"]
    assert all(n.endswith(TARGET_SUFFIXES) for n in galore["param_names"])
    assert {
        k: galore[k] for k in ("rank", "update_proj_gap", "scale", "proj_type", "svd", "stagger_refresh", "lr")
    } == {
        "rank": 8,
        "update_proj_gap": 3,
        "scale": 0.5,
        "proj_type": "reverse_std",
        "svd": "randomized",
        "stagger_refresh": True,
        "lr": 2e-3,
    }


def test_full_rank_baselines_and_hyperparameters(tiny_model) -> None:
    import bitsandbytes as bnb

    adamw = build_optimizer(tiny_model, _cfg(optimizer="adamw", beta2=0.95, weight_decay=0.1))
    assert type(adamw) is torch.optim.AdamW and adamw.param_groups[0]["betas"] == (0.9, 0.95)
    assert adamw.param_groups[0]["weight_decay"] == 0.1
    assert type(build_optimizer(tiny_model, _cfg(optimizer="adam"))) is torch.optim.Adam
    eightbit = build_optimizer(tiny_model, _cfg(optimizer="adamw", eightbit=True, beta1=0.8))
    assert type(eightbit) is bnb.optim.AdamW8bit and eightbit.param_groups[0]["betas"] == (0.8, 0.999)
    adafactor = build_optimizer(tiny_model, _cfg(optimizer="adafactor"))
    assert type(adafactor) is GaLoreAdafactor and adafactor.param_groups[0]["beta1"] is None
    assert all("rank" not in group for group in adafactor.param_groups)


def test_only_trainable_parameters_are_optimized(tiny_model) -> None:
    model = build_model(SMALL_LLAMA, seed=0)
    model.model.embed_tokens.weight.requires_grad_(False)
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(False)
    for name in ("adamw", "galore_adamw"):
        optimized = {
            id(p) for group in build_optimizer(model, _cfg(optimizer=name)).param_groups for p in group["params"]
        }
        assert id(model.model.embed_tokens.weight) not in optimized
        assert id(model.model.layers[0].self_attn.q_proj.weight) not in optimized
        assert len(optimized) == sum(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"rank": 0}, "--rank must be positive"),
        ({"rank": 64}, r"--rank 64 is not below min\(64, 64\) of model.layers.0.self_attn.q_proj.weight"),
        ({"proj_type": "diagonal"}, "unknown GaLore proj_type 'diagonal'"),
        ({"galore_targets": ["no_such_layer"]}, "'no_such_layer' matches no linear layer"),
    ],
)
def test_user_errors(tiny_model, changes, message) -> None:
    with pytest.raises(UserError, match=message):
        build_optimizer(tiny_model, _cfg(optimizer="galore_adamw", **changes))


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_every_optimizer_resumes_bit_identically_from_a_saved_state_dict(name: str) -> None:
    """Train 4 steps, save (torch.save / torch.load(weights_only=True)), continue 4 more steps in a fresh
    model+optimizer: identical to the uninterrupted run (GaLore: refreshes at steps 0, 3, 6)."""
    cfg = _cfg(optimizer=name, weight_decay=0.1)

    def train(model, optimizer, steps):
        for step in steps:
            generator = torch.Generator().manual_seed(step)
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=generator) * 0.01
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    model = build_model(SMALL_LLAMA, seed=0)
    optimizer = build_optimizer(model, cfg)
    train(model, optimizer, range(4))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_model = build_model(SMALL_LLAMA, seed=1)
    resumed_model.load_state_dict(saved["model"])
    resumed = build_optimizer(resumed_model, cfg)
    resumed.load_state_dict(saved["optimizer"])
    train(model, optimizer, range(4, 8))
    train(resumed_model, resumed, range(4, 8))
    for (param_name, a), b in zip(model.named_parameters(), resumed_model.parameters()):
        assert torch.equal(a, b), param_name


# --- the registry and the optimizers' own state layouts ------------------------------------------------


def test_optim_package_imports_without_transformers_or_the_config() -> None:
    code = (
        "import galore_train.optim, sys; "
        "assert 'transformers' not in sys.modules and 'galore_train.config' not in sys.modules"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr


def test_registry_is_the_one_list_of_names() -> None:
    assert OPTIMIZER_NAMES + METHOD_NAMES == tuple(OPTIMIZERS)
    assert METHOD_NAMES == ("lora", "relora", "low_rank")
    assert FSDP_NAMES == (
        "adamw",
        "adam",
        "adafactor",
        "galore_adamw",
        "galore_adafactor",
        "galore_adamw8bit",
        "natural_galore_adamw",
        "fira_adamw",
        "apollo_adamw",
        "apollo_mini",
        "muon",
        "muon8bit",
    )
    assert len({spec.label for spec in OPTIMIZERS.values()}) == len(OPTIMIZERS)
    for spec in OPTIMIZERS.values():
        assert callable(spec.load())
        if spec.is_method:
            assert spec.base in OPTIMIZER_NAMES and spec.settings is None
        else:
            assert callable(spec.state_layout()) and spec.eightbit in (None, *OPTIMIZER_NAMES)


# Settings that change a layout: Fira's and APOLLO's limiter off, APOLLO's stored SVD projection (quantized).
LAYOUT_VARIANTS = [
    ("fira_adamw", {"fira_residual": "paper", "proj_bits": 8}),
    ("fira_adamw", {"norm_growth_limit": 0}),
    ("apollo_adamw", {"stagger_refresh": True, "norm_growth_limit": 0}),
    ("apollo_adamw", {"apollo_proj": "svd", "apollo_scale_type": "tensor", "proj_bits": 4}),
]


@pytest.mark.parametrize("name, changes", [(name, {}) for name in OPTIMIZER_NAMES] + LAYOUT_VARIANTS)
def test_state_layout_names_every_state_tensor_of_a_real_optimizer(name: str, changes: dict) -> None:
    """Key, size and element size of each parameter's state after two steps, against the optimizer's own
    description, for full-rank and GaLore groups (and, in 8-bit, moments above and below the threshold)."""
    _assert_layouts_match_real_states(
        name,
        build_model(SMALL_LLAMA, seed=0),
        _cfg(**{"optimizer": name, "gap": 1, "proj_bits": 4 if "galore" in name else 32, **changes}),
    )


@pytest.mark.parametrize("name", MOMENTS_NAMES)
def test_state_layout_counts_float32_moments_of_bf16_weights(name: str) -> None:
    """--moments-dtype fp32: 4-byte low-rank moments beside 2-byte weights, as the layout says."""
    model = build_model(SMALL_LLAMA, seed=0, dtype=torch.bfloat16)
    optimizer = _assert_layouts_match_real_states(name, model, _cfg(optimizer=name, gap=1, moments_dtype="fp32"))
    plain, matrices = optimizer.param_groups
    assert "moment_dtype" not in plain and matrices["moment_dtype"] is torch.float32
    assert all(optimizer.state[p]["exp_avg_sq"].dtype == torch.float32 for p in matrices["params"])
    assert all(optimizer.state[p]["exp_avg_sq"].dtype == torch.bfloat16 for p in plain["params"])


def _assert_layouts_match_real_states(name: str, model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    optimizer = build_optimizer(model, cfg)
    for step in range(2):
        generator = torch.Generator().manual_seed(step)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=generator).to(p.dtype)
        optimizer.step()
    layout = OPTIMIZERS[name].state_layout()
    for group in optimizer.param_groups:
        settings = {key: value for key, value in group.items() if key != "params"}
        for p in group["params"]:
            real = {key: (t.numel(), t.element_size()) for key, t in optimizer.state[p].items() if torch.is_tensor(t)}
            described = {t.key: (t.numel, t.itemsize) for t in layout(tuple(p.shape), settings, p.element_size())}
            assert described == real, (name, tuple(p.shape))
    return optimizer


def test_moments_dtype_param_adds_nothing_and_fp32_is_refused_where_it_does_not_apply(tiny_model) -> None:
    groups = build_optimizer(tiny_model, _cfg(optimizer="galore_adamw")).param_groups
    assert all("moment_dtype" not in group for group in groups)  # the default: the same groups as before
    assert MOMENTS_NAMES == ("galore_adamw", "natural_galore_adamw", "fira_adamw", "apollo_adamw", "apollo_mini")
    for changes in (
        {"optimizer": "adamw"},
        {"optimizer": "galore_adafactor"},
        {"optimizer": "muon"},
        {"optimizer": "galore_adamw", "eightbit": True},
    ):
        with pytest.raises(UserError, match="fp32 applies to the low-rank Adam moments of galore_adamw,"):
            build_optimizer(tiny_model, _cfg(moments_dtype="fp32", **changes))
