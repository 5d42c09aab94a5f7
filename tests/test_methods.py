"""LoRA, ReLoRA and low-rank factorization on a tiny LLaMA (fp32): trainable sets, ReLoRA restarts,
bit-exact resume and the merged save_pretrained checkpoint."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from galore_train.config import TrainConfig
from galore_train.errors import UserError
from galore_train.methods import METHOD_NAMES, base_optimizer_name, build_method, method_class, scheduler_kwargs
from galore_train.methods.lora import adapter_layers, adapter_parameters
from galore_train.methods.relora import prune_optimizer_state_
from galore_train.model import build_model, target_linear_modules
from galore_train.schedule import build_scheduler, lr_factor

HIDDEN, INTERMEDIATE, LAYERS, VOCAB, RANK = 64, 128, 2, 1000, 8


def tiny_config() -> LlamaConfig:
    return LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        vocab_size=VOCAB,
        max_position_embeddings=64,
    )


def method_config(optimizer: str, **changes) -> TrainConfig:
    values = dict(optimizer=optimizer, rank=RANK, num_training_steps=12, warmup_steps=2, lr=1e-2, seed=0)
    values.update(changes)
    return TrainConfig(**values)


def batches(count: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (2, 16), generator=generator) for _ in range(count)]


# --- dimensions of the tiny model, written out by hand ------------------------------------------
# Each layer's target matrices (out, in): q, k, v, o (hidden x hidden), gate, up (inter x hidden), down.
TARGET_SHAPES = [(HIDDEN, HIDDEN)] * 4 + [(INTERMEDIATE, HIDDEN)] * 2 + [(HIDDEN, INTERMEDIATE)]
NON_TARGET = 2 * VOCAB * HIDDEN + (2 * LAYERS + 1) * HIDDEN  # embed + lm_head (untied) + RMSNorm weights
DENSE_TARGETS = LAYERS * sum(m * n for m, n in TARGET_SHAPES)
ADAPTERS = LAYERS * sum((m + n) * RANK for m, n in TARGET_SHAPES)


def counts(model: torch.nn.Module) -> tuple[int, int]:
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def test_hand_formula_matches_plain_model():
    assert counts(build_model(tiny_config(), seed=0)) == (NON_TARGET + DENSE_TARGETS,) * 2


def test_lora_freezes_exactly_the_target_weights():
    model = build_model(tiny_config(), seed=0)
    targets = list(target_linear_modules(model, ["attn", "mlp"]))
    build_method(method_config("lora")).prepare(model)
    assert counts(model) == (NON_TARGET + DENSE_TARGETS + ADAPTERS, NON_TARGET + ADAPTERS)
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {f"{name}.base_layer.weight" for name in targets}
    assert len(targets) == LAYERS * len(TARGET_SHAPES)


def test_low_rank_replaces_targets_by_two_factors():
    model = build_model(tiny_config(), seed=0)
    targets = target_linear_modules(model, ["attn", "mlp"])
    build_method(method_config("low_rank")).prepare(model)
    assert counts(model) == (NON_TARGET + ADAPTERS,) * 2
    for name, dense in targets.items():
        factorized = model.get_submodule(name)
        assert factorized.a.shape == (RANK, dense.in_features) and factorized.b.shape == (dense.out_features, RANK)


def test_low_rank_init_matches_dense_init_scale():
    config = tiny_config()
    model = build_model(config, seed=0)
    method = build_method(method_config("low_rank"))
    method.prepare(model)
    weight, _ = method.merged_linear(model.model.layers[0].mlp.up_proj)
    assert weight.std().item() == pytest.approx(config.initializer_range, rel=0.15)


def test_relora_warm_start_trains_full_rank_then_attaches():
    model = build_model(tiny_config(), seed=0)
    method = build_method(method_config("relora", relora_warm_start=3, relora_reset=4, restart_warmup_steps=1))
    method.prepare(model, completed_steps=0)
    assert counts(model) == (NON_TARGET + DENSE_TARGETS,) * 2
    optimizer = torch.optim.AdamW(model.parameters())
    assert method.after_optimizer_step(2, model, optimizer) is False
    assert method.after_optimizer_step(3, model, optimizer) is True
    assert counts(model) == (NON_TARGET + DENSE_TARGETS + ADAPTERS, NON_TARGET + ADAPTERS)


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_memory_helper_agrees_with_the_prepared_model(name):
    model = build_model(tiny_config(), seed=0)
    build_method(method_config(name)).prepare(model)
    per_layer = [method_class(name).matrix_parameter_counts(m, n, RANK) for m, n in TARGET_SHAPES]
    stored = NON_TARGET + LAYERS * sum(c.stored for c in per_layer)
    trainable = NON_TARGET + LAYERS * sum(c.trainable for c in per_layer)
    assert counts(model) == (stored, trainable)


def test_registry_and_loop_helpers():
    full = build_method(method_config("adamw"))
    assert not full.changes_model and full.optimizer_name() == "adamw" and full.merged_model(model := object()) is model
    assert build_method(method_config("galore_adamw")).optimizer_name() == "galore_adamw"
    assert build_method(method_config("relora")).optimizer_name() == "adamw"
    assert base_optimizer_name(method_config("lora")) == "adamw"
    assert scheduler_kwargs(method_config("lora")) == {}
    assert scheduler_kwargs(method_config("relora", relora_reset=50, restart_warmup_steps=5, relora_warm_start=7)) == {
        "restart_every": 50,
        "restart_warmup": 5,
        "restart_offset": 7,
    }


@pytest.mark.parametrize("reset, warmup", [(5000, 100), (1000, 100), (300, 30), (10, 1), (5, 0)])
def test_default_restart_warmup_fits_every_reset(reset, warmup):
    """`--relora-reset 10` alone once stopped on the default warm-up of 100: the default is now derived."""
    cfg = method_config("relora", relora_reset=reset)
    assert cfg.restart_warmup_steps is None
    build_method(cfg)  # no UserError
    assert scheduler_kwargs(cfg)["restart_warmup"] == warmup


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            dict(optimizer="relora", relora_reset=10, restart_warmup_steps=10),  # an explicit value must fit
            r"--restart-warmup-steps must be >= 0 and smaller than --relora-reset \(10\), got 10",
        ),
        (dict(optimizer="relora", relora_reset=10, restart_warmup_steps=-1), "--restart-warmup-steps .* got -1"),
        (dict(optimizer="relora", relora_warm_start=-1), "--relora-warm-start must be >= 0, got -1"),
        (dict(optimizer="lora", lora_dropout=1.0), r"--lora-dropout must be within \[0, 1\), got 1.0"),
        (dict(optimizer="relora", lora_alpha=0.0), "--lora-alpha must be positive, got 0.0"),
    ],
)
def test_bad_options_are_user_errors(changes, message):
    with pytest.raises(UserError, match=message):
        build_method(method_config(**changes))


# --- training helpers ---------------------------------------------------------------------------


def new_optimizer(model: torch.nn.Module, cfg: TrainConfig, completed_steps: int):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    scheduler = build_scheduler(
        optimizer,
        kind=cfg.scheduler,
        total_steps=cfg.num_training_steps,
        warmup_steps=cfg.warmup_steps,
        min_ratio=cfg.min_lr_ratio,
        start_step=completed_steps,
        **scheduler_kwargs(cfg),
    )
    return optimizer, scheduler


def train(method, model, optimizer, scheduler, cfg, data, start: int, stop: int):
    """The loop contract in miniature: step, schedule, then the method's hook."""
    model.train()
    for step in range(start, stop):
        model(input_ids=data[step], labels=data[step]).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if method.after_optimizer_step(step + 1, model, optimizer):
            optimizer, scheduler = new_optimizer(model, cfg, step + 1)
    return optimizer, scheduler


def prepared(cfg: TrainConfig, seed: int = 0, completed_steps: int = 0):
    model = build_model(tiny_config(), seed=seed)
    method = build_method(cfg)
    method.prepare(model, completed_steps)
    torch.manual_seed(1234)  # dropout stream
    return method, model


@torch.no_grad()
def logits(model, ids):
    model.eval()
    return model(input_ids=ids).logits


# --- ReLoRA restart -----------------------------------------------------------------------------


def test_relora_reset_merges_reinits_and_prunes():
    cfg = method_config("relora", relora_reset=4, restart_warmup_steps=1, optimizer_reset_ratio=0.9)
    method, model = prepared(cfg)
    optimizer, scheduler = new_optimizer(model, cfg, 0)
    data = batches(4)
    train(method, model, optimizer, scheduler, cfg, data, 0, 3)  # one step short of the reset
    layers = adapter_layers(model)
    adapters = [p for layer in layers for p in adapter_parameters(layer)]
    assert all(adapter_parameters(layer)[1].abs().sum() > 0 for layer in layers)  # B has learned
    old_a = [adapter_parameters(layer)[0].clone() for layer in layers]
    ids = data[0]
    before = logits(model, ids)

    model.train()
    model(input_ids=data[3], labels=data[3]).loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    before_merge = logits(model, ids)
    assert not torch.allclose(before, before_merge)  # the step did something
    others = {
        n: copy.deepcopy(optimizer.state[p])
        for n, p in model.named_parameters()
        if p.requires_grad and "lora_" not in n
    }
    assert method.after_optimizer_step(4, model, optimizer) is False

    torch.testing.assert_close(logits(model, ids), before_merge, rtol=1e-5, atol=1e-5)
    for layer, a in zip(layers, old_a):
        new_a, new_b = adapter_parameters(layer)
        assert torch.count_nonzero(new_b) == 0
        assert not torch.equal(new_a, a)
        assert new_a.abs().max() <= 1 / new_a.shape[1] ** 0.5
    for p in adapters:
        for key in ("exp_avg", "exp_avg_sq"):
            zeros = (optimizer.state[p][key] == 0).float().mean().item()
            assert abs(zeros - 0.9) <= 1 / p.numel()  # the closest count of entries
    for name, p in model.named_parameters():  # embeddings, norms, lm_head keep their state
        if name in others:
            assert torch.equal(optimizer.state[p]["exp_avg"], others[name]["exp_avg"])
    assert method.state_dict() == {"merges": 1}


def test_prune_drops_state_it_cannot_prune():
    param = torch.nn.Parameter(torch.ones(4, 4))
    optimizer = torch.optim.AdamW([param])
    optimizer.state[param].update(
        step=torch.tensor(3.0), exp_avg=torch.randn(4, 4), codes=torch.zeros(4, 4, dtype=torch.uint8)
    )
    prune_optimizer_state_(optimizer, [param], 0.5)
    assert optimizer.state[param] == {}


def test_relora_lr_restarts_at_each_reset():
    cfg = method_config("relora", relora_reset=4, restart_warmup_steps=2, relora_warm_start=2, num_training_steps=12)
    kwargs = dict(kind="cosine", total_steps=12, warmup_steps=2, min_ratio=0.1)
    method, model = prepared(cfg)
    optimizer, scheduler = new_optimizer(model, cfg, 0)
    seen = []
    for step in range(12):
        seen.append(optimizer.param_groups[0]["lr"])
        model(input_ids=batches(1)[0], labels=batches(1)[0]).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        if method.after_optimizer_step(step + 1, model, optimizer):
            optimizer, scheduler = new_optimizer(model, cfg, step + 1)
    # attach at 2, merges at 6 and 10: each starts a 2-step re-warm-up (half, then full envelope)
    for restart in (2, 6, 10):
        plain = lr_factor(restart, **kwargs)
        assert seen[restart] == pytest.approx(cfg.lr * plain / 2)
        assert seen[restart + 1] == pytest.approx(cfg.lr * lr_factor(restart + 1, **kwargs))
    assert seen[5] == pytest.approx(cfg.lr * lr_factor(5, **kwargs))
    assert method.merges == 2


# --- resume -------------------------------------------------------------------------------------


def roundtrip(obj):
    """Through torch.save/torch.load(weights_only=True), like a checkpoint on disk."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize(
    "name, stop_at",
    [("relora", 1), ("relora", 3), ("relora", 7), ("lora", 5), ("low_rank", 5)],
    ids=["relora-warm-start", "relora-at-attach", "relora-mid-cycle", "lora", "low_rank"],
)
def test_resume_is_bit_exact(name, stop_at):
    # ReLoRA: warm start 3 steps, merges at 6 and 9; dropout on, so the RNG matters too.
    cfg = method_config(name, relora_warm_start=3, relora_reset=3, restart_warmup_steps=1, optimizer_reset_ratio=0.5)
    total = cfg.num_training_steps
    data = batches(total)

    method, model = prepared(cfg)
    train(method, model, *new_optimizer(model, cfg, 0), cfg, data, 0, total)
    reference = {k: v.clone() for k, v in model.state_dict().items()}

    method, model = prepared(cfg)
    optimizer, scheduler = train(method, model, *new_optimizer(model, cfg, 0), cfg, data, 0, stop_at)
    checkpoint = roundtrip(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "method": method.state_dict(),
            "rng": torch.get_rng_state(),
        }
    )
    del method, model, optimizer, scheduler

    method, model = prepared(
        cfg, seed=99, completed_steps=stop_at
    )  # other init: everything must come from the checkpoint
    model.load_state_dict(checkpoint["model"])
    method.load_state_dict(checkpoint["method"])
    optimizer, scheduler = new_optimizer(model, cfg, stop_at)
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    torch.set_rng_state(checkpoint["rng"])
    train(method, model, optimizer, scheduler, cfg, data, stop_at, total)

    resumed = model.state_dict()
    assert resumed.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(resumed[key], value), key


# --- merged checkpoint --------------------------------------------------------------------------


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_merged_model_loads_with_auto_model(name, tmp_path):
    cfg = method_config(name, relora_reset=2, restart_warmup_steps=1)
    method, model = prepared(cfg)
    data = batches(3)
    train(method, model, *new_optimizer(model, cfg, 0), cfg, data, 0, 3)  # ReLoRA: one merge + live adapters
    if name != "low_rank":
        assert all(torch.count_nonzero(adapter_parameters(layer)[1]) > 0 for layer in adapter_layers(model))
    expected = logits(model, data[0])
    state_before = {k: v.clone() for k, v in model.state_dict().items()}

    merged = method.merged_model(model)
    assert type(merged) is LlamaForCausalLM
    merged.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)

    assert type(loaded) is LlamaForCausalLM
    torch.testing.assert_close(logits(loaded, data[0]), expected, rtol=1e-5, atol=1e-5)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in state_before.items())
