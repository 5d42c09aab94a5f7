"""Fira, APOLLO, APOLLO-Mini, Muon and the norm-growth limiter: updates pinned to float64 references written
from the papers' equations, the degenerate cases, APOLLO's state sizes, bit-exact resume, layer-wise steps, errors."""

from __future__ import annotations

import hashlib
import io
import math

import pytest
import torch
from conftest import TINY_LLAMA, tiny_run_args
from transformers import LlamaConfig

from galore_train.config import TrainConfig
from galore_train.errors import UserError
from galore_train.model import build_model
from galore_train.optim.apollo import MINI_SCALE, ApolloAdamW, gaussian_projection, projection_seed
from galore_train.optim.fira import FiraAdamW
from galore_train.optim.galore_adamw import GaLoreAdamW
from galore_train.optim.muon import MuonAdamW
from galore_train.optim.norm_growth import PREVIOUS_NORM, limit_norm_growth_, norm_growth_factor
from galore_train.optimizers import build_optimizer

BETAS, EPS, LR, WD, GAMMA = (0.9, 0.999), 1e-8, 0.01, 0.1, 1.01
SMALL_LLAMA = LlamaConfig(**{**TINY_LLAMA, "vocab_size": 256})


def _gradients(shape: tuple[int, int], steps: int, seed: int = 0, growth: float = 1.3) -> list[torch.Tensor]:
    """Random gradients whose size grows step by step, so that the norm-growth limiter has work to do."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) * growth**t for t in range(steps)]


def _run(optimizer_cls, shape, grads, group: dict, **kwargs) -> torch.Tensor:
    weight = torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(99)))
    optimizer = optimizer_cls([{"params": [weight], **group}], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, **kwargs)
    for g in grads:
        weight.grad = g.clone()
        optimizer.step()
    return weight.detach()


# --- references from the papers' equations (float64) -------------------------------------------


def _svd_basis(g: torch.Tensor, rank: int, side: str) -> torch.Tensor:
    """GaLore's basis at a refresh: the top singular vectors of the (float32) gradient."""
    u, _, vh = torch.linalg.svd(g.float(), full_matrices=False)
    return (u[:, :rank] if side == "left" else vh[:rank]).double()


def _project(g, basis, side):
    return basis.T @ g if side == "left" else g @ basis.T


def _back(n, basis, side):
    return basis @ n if side == "left" else n @ basis


def _channel_norms(t, side, tensor_wise=False):
    if tensor_wise:
        return t.norm()
    return t.norm(dim=0, keepdim=True) if side == "left" else t.norm(dim=1, keepdim=True)


class _Reference:
    """Adam moments of a projected gradient and the norm-growth limiter, as the authors run them: the raw
    direction M / (sqrt(V) + eps) and the limiter before the bias correction k = sqrt(1 - b2^t) / (1 - b1^t)."""

    def __init__(self, gamma):
        self.m = self.v = None
        self.previous = None
        self.gamma = gamma
        self.limited = 0

    def direction(self, r, t):
        if self.m is None:
            self.m, self.v = torch.zeros_like(r), torch.zeros_like(r)
        self.m = BETAS[0] * self.m + (1 - BETAS[0]) * r
        self.v = BETAS[1] * self.v + (1 - BETAS[1]) * r**2
        return self.m / (self.v.sqrt() + EPS)

    @staticmethod
    def correction(t):
        return math.sqrt(1 - BETAS[1] ** t) / (1 - BETAS[0] ** t)

    def limit(self, u):
        norm = u.norm()
        if self.gamma is not None and self.previous is not None and norm > self.gamma * self.previous:
            u = u * (self.gamma * self.previous / norm)
            self.limited += 1
        self.previous = u.norm()
        return u


def fira_reference(w0, grads, rank, gap, scale, residual, side, gamma=GAMMA):
    """Fira: W <- (1 - lr wd) W - lr k (scale P N + limit(phi * (G - c P R))), phi = ||N_j|| / ||R_j||."""
    w, ref = w0.double(), _Reference(gamma)
    for t, g in enumerate(grads, 1):
        if (t - 1) % gap == 0:
            basis = _svd_basis(g, rank, side)
        g = g.double()
        r = _project(g, basis, side)
        n = ref.direction(r, t)
        c = 1.0 if residual == "paper" else scale
        phi = _channel_norms(n, side) / _channel_norms(r, side)
        u = ref.limit(phi * (g - c * _back(r, basis, side)))
        w = (1 - LR * WD) * w - LR * ref.correction(t) * (scale * _back(n, basis, side) + u)
    return w, ref.limited


def _gaussian_basis(shape, side, rank, window, seed=0, position=0):
    """APOLLO's projection for (seed, position, window), as its docstring defines it; oriented like SVD's basis."""
    digest = hashlib.blake2b(f"{seed}:{position}:{window}".encode(), digest_size=8).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
    size = (shape[0], rank) if side == "left" else (rank, shape[1])
    return (torch.randn(size, generator=generator, dtype=torch.float32) / math.sqrt(rank)).double()


def apollo_reference(w0, grads, rank, gap, scale, side, proj, tensor_wise, gamma=GAMMA):
    """APOLLO: W <- (1 - lr wd) W - lr k limit(scale * G diag(s)), s = ||N_j|| / ||R_j|| (or whole-tensor norms).
    The random projection is re-derived from apollo.py's documented rule (blake2b seed of "seed:position:window",
    N(0, 1/r) from a CPU generator), not imported."""
    w, ref = w0.double(), _Reference(gamma)
    for t, g in enumerate(grads, 1):
        if (t - 1) % gap == 0:
            if proj == "svd":
                basis = _svd_basis(g, rank, side)
            else:  # position 0 in the optimizer, refresh window (t - 1) // gap
                basis = _gaussian_basis(g.shape, side, rank, window=(t - 1) // gap)
        g = g.double()
        r = _project(g, basis, side)
        n = ref.direction(r, t)
        s = _channel_norms(n, side, tensor_wise) / _channel_norms(r, side, tensor_wise)
        w = (1 - LR * WD) * w - LR * ref.correction(t) * ref.limit(scale * g * s)
    return w, ref.limited


def _initial(shape):
    return torch.randn(shape, generator=torch.Generator().manual_seed(99))


# --- updates against the references --------------------------------------------------------------

SHAPES = {"left": (8, 12), "right": (12, 8)}  # std projects the smaller side


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("residual", ["code", "paper"])
def test_fira_matches_the_paper_equations(side, residual):
    shape, grads = SHAPES[side], _gradients(SHAPES[side], steps=7)
    group = {"rank": 3, "update_proj_gap": 3, "scale": 0.25, "proj_type": "std"}
    got = _run(FiraAdamW, shape, grads, group, residual=residual)
    expected, limited = fira_reference(_initial(shape), grads, 3, 3, 0.25, residual, side)
    assert limited > 0  # the limiter took part
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("proj", ["random", "svd"])
@pytest.mark.parametrize("scale_type", ["channel", "tensor"])
def test_apollo_matches_the_paper_equations(side, proj, scale_type):
    shape, grads = SHAPES[side], _gradients(SHAPES[side], steps=7)
    group = {"rank": 3, "update_proj_gap": 3, "proj_type": "std", "proj": proj, "scale_type": scale_type}
    got = _run(ApolloAdamW, shape, grads, group)  # scale defaults to APOLLO's 1
    expected, limited = apollo_reference(_initial(shape), grads, 3, 3, 1.0, side, proj, scale_type == "tensor")
    assert limited > 0
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_apollo_mini_is_rank_one_tensor_wise_with_the_paper_scale():
    shape, grads = (8, 12), _gradients((8, 12), steps=5)
    group = {"rank": 1, "update_proj_gap": 2, "scale": MINI_SCALE, "scale_type": "tensor"}
    got = _run(ApolloAdamW, shape, grads, group)
    expected, _ = apollo_reference(_initial(shape), grads, 1, 2, math.sqrt(128), "left", "random", True)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_limiter_off_is_the_plain_update():
    shape, grads = (8, 12), _gradients((8, 12), steps=5)
    group = {"rank": 3, "update_proj_gap": 2, "scale": 0.25, "norm_growth_limit": None}
    expected, limited = fira_reference(_initial(shape), grads, 3, 2, 0.25, "code", "left", gamma=None)
    assert limited == 0
    torch.testing.assert_close(_run(FiraAdamW, shape, grads, group).double(), expected, rtol=1e-5, atol=1e-6)


# --- degenerate cases -------------------------------------------------------------------------------


def test_fira_on_gradients_inside_the_subspace_at_scale_one_is_galore_adamw():
    generator = torch.Generator().manual_seed(1)
    basis = torch.linalg.qr(torch.randn(8, 3, generator=generator)).Q  # every gradient lies in span(basis)
    inside = [basis @ torch.randn(3, 12, generator=generator) for _ in range(6)]
    group = {"rank": 3, "update_proj_gap": 2, "scale": 1.0}
    galore = _run(GaLoreAdamW, (8, 12), inside, group)
    for residual in ("code", "paper"):
        fira = _run(FiraAdamW, (8, 12), inside, group, residual=residual)
        torch.testing.assert_close(fira, galore, rtol=0, atol=1e-6)
    outside = _gradients((8, 12), steps=6)  # the check can fail: general gradients have a residual
    assert not torch.allclose(_run(FiraAdamW, (8, 12), outside, group), _run(GaLoreAdamW, (8, 12), outside, group))


def test_apollo_mini_state_is_order_m_plus_n():
    for m, n in [(64, 160), (160, 64), (512, 1376)]:
        weight = torch.nn.Parameter(torch.zeros(m, n))
        optimizer = ApolloAdamW([{"params": [weight], "rank": 1, "scale": MINI_SCALE, "scale_type": "tensor"}])
        weight.grad = torch.randn(m, n)
        optimizer.step()
        stored = sum(v.numel() for v in optimizer.state[weight].values() if isinstance(v, torch.Tensor))
        assert stored == 2 * max(m, n) + 1  # two 1 x max(m, n) moments and the limiter's scalar


def test_norm_growth_limiter():
    state: dict = {}
    assert norm_growth_factor(torch.tensor(5.0), state, None) is None and not state  # off: no state
    assert norm_growth_factor(torch.tensor(5.0), state, 1.01) == 1.0  # the first update is never limited
    assert norm_growth_factor(torch.tensor(10.0), state, 1.01) == pytest.approx(5.05 / 10.0)
    assert state[PREVIOUS_NORM] == pytest.approx(5.05)  # the limited norm is the next reference
    assert norm_growth_factor(torch.tensor(1.0), state, 1.01) == 1.0  # shrinking is free
    update = torch.full((2, 2), 3.0)  # norm 6 after 1: limited to 1.01
    assert torch.linalg.vector_norm(limit_norm_growth_(update, state, 1.01)) == pytest.approx(1.01)
    zero: dict = {PREVIOUS_NORM: torch.tensor(0.0)}  # an all-zero update does not freeze the parameter
    assert norm_growth_factor(torch.tensor(3.0), zero, 1.01) == 1.0


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_a_non_finite_norm_does_not_turn_the_limiter_off(bad):
    state: dict = {}
    norm_growth_factor(torch.tensor(5.0), state, 1.01)
    assert norm_growth_factor(torch.tensor(bad), state, 1.01) == 1.0  # passed through (the step guard's job)
    assert state[PREVIOUS_NORM] == 5.0  # not recorded: the history survives
    assert norm_growth_factor(torch.tensor(10.0), state, 1.01) == pytest.approx(5.05 / 10.0)  # still limiting
    first: dict = {}
    norm_growth_factor(torch.tensor(bad), first, 1.01)
    assert first[PREVIOUS_NORM] == 0.0  # a bad first update leaves "no history"


def test_gaussian_projection_is_seeded_by_seed_position_and_window():
    shape = torch.Size((64, 96))

    def draw(*key):
        return gaussian_projection(shape, "left", 8, projection_seed(*key), torch.device("cpu"), torch.float32)

    assert torch.equal(draw(0, 3, 5), draw(0, 3, 5))  # every process, every resume
    assert not torch.equal(draw(0, 3, 5), draw(0, 3, 6)) and not torch.equal(draw(0, 3, 5), draw(0, 4, 5))
    assert not torch.equal(draw(0, 3, 5), draw(1, 3, 5))
    assert draw(0, 0, 0).var().item() == pytest.approx(1 / 8, rel=0.1)  # N(0, 1/r): E[P P^T] = I


# --- through the registry: groups, state layouts, resume, layer-wise, errors -------------------------

NAMES = ["fira_adamw", "apollo_adamw", "apollo_mini", "muon"]


def _cfg(name: str, **changes) -> TrainConfig:
    return TrainConfig(
        **{"optimizer": name, "rank": 8, "gap": 3, "lr": 1e-2, "weight_decay": 0.1, "num_training_steps": 10, **changes}
    )


def test_registry_groups_carry_each_method_defaults():
    model = build_model(SMALL_LLAMA, seed=0)
    fira = build_optimizer(model, _cfg("fira_adamw", scale=0.5)).param_groups[-1]
    assert (fira["rank"], fira["scale"], fira["residual"], fira["norm_growth_limit"]) == (8, 0.5, "code", 1.01)
    apollo = build_optimizer(model, _cfg("apollo_adamw", norm_growth_limit=0)).param_groups[-1]
    assert (apollo["rank"], apollo["scale"], apollo["proj"], apollo["scale_type"]) == (8, 1.0, "random", "channel")
    assert apollo["norm_growth_limit"] is None  # 0 = off
    mini = build_optimizer(model, _cfg("apollo_mini", apollo_scale_type="channel")).param_groups[-1]
    assert (mini["rank"], mini["scale"], mini["scale_type"]) == (1, math.sqrt(128), "tensor")
    muon = build_optimizer(model, _cfg("muon"))
    plain, matrices = muon.param_groups
    assert type(muon) is MuonAdamW and matrices["muon"] and "model.embed_tokens.weight" in plain["param_names"]
    assert all(p.dim() == 2 for p in matrices["params"])
    assert len(matrices["params"]) == 7 * TINY_LLAMA["num_hidden_layers"]


def _train(model, optimizer, steps):
    for step in steps:
        generator = torch.Generator().manual_seed(step)
        for p in model.parameters():
            p.grad = (torch.randn(p.shape, generator=generator) * 0.01 * (1 + step)).to(p.dtype)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_apollo_stores_no_projection_and_mini_keeps_o_of_m_plus_n():
    """The layouts (tests/test_optim_registry.py checks them against real states): the random projection is
    regenerated, and APOLLO-Mini keeps two rank-1 moments plus the limiter's scalar, 2 max(m, n) + 1 values."""
    for shape in ((32, 64), (64, 32)):
        assert not any(t.projection for t in ApolloAdamW.state_layout(shape, {"rank": 4}, 4))
        assert any(t.projection for t in ApolloAdamW.state_layout(shape, {"rank": 4, "proj": "svd"}, 4))
        mini = ApolloAdamW.state_layout(shape, {"rank": 1, "scale_type": "tensor"}, 2)
        assert sum(t.numel for t in mini) == 2 * max(shape) + 1


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_continues_bit_identically(name, dtype):
    """4 steps, save, torch.load(weights_only=True) into a fresh model + optimizer, 4 more steps (a refresh
    at step 6 happens after the resume): identical to the uninterrupted run, state dtypes included."""
    cfg = _cfg(name, stagger_refresh=name != "muon")
    model = build_model(SMALL_LLAMA, seed=0, dtype=dtype)
    optimizer = build_optimizer(model, cfg)
    _train(model, optimizer, range(4))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_model = build_model(SMALL_LLAMA, seed=1, dtype=dtype)
    resumed_model.load_state_dict(saved["model"])
    resumed = build_optimizer(resumed_model, cfg)
    resumed.load_state_dict(saved["optimizer"])
    for p, q in zip(model.parameters(), resumed_model.parameters(), strict=True):
        for key, value in optimizer.state[p].items():
            if isinstance(value, torch.Tensor):
                assert resumed.state[q][key].dtype == value.dtype, key
    _train(model, optimizer, range(4, 8))
    _train(resumed_model, resumed, range(4, 8))
    for (param_name, a), b in zip(model.named_parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(a, b), param_name


@pytest.mark.parametrize("name", NAMES)
def test_a_layerwise_step_with_one_gradient_updates_only_that_parameter(name):
    model = build_model(SMALL_LLAMA, seed=0)
    optimizer = build_optimizer(model, _cfg(name))
    target = model.model.layers[0].mlp.down_proj.weight
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    target.grad = torch.randn(target.shape) * 0.01
    optimizer.step()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert changed == ["model.layers.0.mlp.down_proj.weight"]
    assert [p for p in optimizer.state if optimizer.state[p]] == [target]


@pytest.mark.parametrize(
    "name, changes, message",
    [
        ("apollo_adamw", {"proj_type": "full"}, "proj_type 'full' projects both"),
        ("fira_adamw", {"norm_growth_limit": 0.5}, "norm_growth_limit must be a number >= 1"),
        ("galore_adamw", {"norm_growth_limit": 1.01}, "--norm-growth-limit applies to fira_adamw"),
        ("muon", {"norm_growth_limit": 1.01}, "not muon"),
        ("apollo_adamw", {"proj_bits": 8}, "regenerated, not stored"),
        ("apollo_mini", {"svd": "randomized"}, "takes no SVD"),
    ],
)
def test_bad_settings_are_user_errors(name, changes, message):
    with pytest.raises(UserError, match=message):
        build_optimizer(build_model(SMALL_LLAMA, seed=0), _cfg(name, **changes))


@pytest.mark.parametrize(
    "flag, value", [("fira_residual", "both"), ("apollo_proj", "qr"), ("apollo_scale_type", "row")]
)
def test_bad_choices_are_refused_with_the_config(flag, value):
    with pytest.raises(UserError, match=f"--{flag.replace('_', '-')} must be one of"):
        _cfg("adamw", **{flag: value}).validate()


def test_muon_runs_without_torch_optim_muon(monkeypatch):
    """MuonAdamW steps its Muon groups itself (optim/orthogonalize.py): torches before 2.9 run it too."""
    monkeypatch.delattr(torch.optim, "Muon", raising=False)
    model = build_model(SMALL_LLAMA, seed=0)
    optimizer = build_optimizer(model, _cfg("muon"))
    before = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, before)


# --- end to end ----------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES + ["swan", "sinkgd"])
def test_trainer_runs_each_new_optimizer(name, tiny_config_file, tmp_path, shared_data, capsys):
    from galore_train.train import Trainer

    summary = Trainer(
        TrainConfig(
            **tiny_run_args(
                tiny_config_file, tmp_path / name, optimizer=name, rank=8, gap=3, lr=1e-2, num_training_steps=6
            )
        )
    ).run()
    assert summary["steps"] == 6 and math.isfinite(summary["val_perplexity"])
    rank_note = "rank=1 (apollo_mini's own; --rank 8 does not apply)"  # the start-up line: the rank it uses
    assert (rank_note in " ".join(capsys.readouterr().err.split())) == (name == "apollo_mini")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["apollo_adamw", "muon", "swan"])
def test_trainer_resume_is_bit_exact(name, tiny_config_file, tmp_path, monkeypatch, shared_data):
    from test_train import final_weights, interrupt_after, records

    from galore_train.errors import TrainingStopped
    from galore_train.train import Trainer

    def run(output_dir, **overrides):
        values = tiny_run_args(
            tiny_config_file,
            output_dir,
            optimizer=name,
            rank=8,
            gap=3,
            lr=1e-2,
            num_training_steps=6,
            save_every=100,
            eval_every=100,
            **overrides,
        )
        return Trainer(TrainConfig(**values)).run()

    run(tmp_path / "straight")
    interrupt_after(monkeypatch, 4)
    with pytest.raises(TrainingStopped, match="SIGINT: stopped after step 4; checkpoint saved"):
        run(tmp_path / "split")
    monkeypatch.undo()
    run(tmp_path / "split", resume=True)
    assert [r["loss"] for r in records(tmp_path / "split") if "loss" in r] == [
        r["loss"] for r in records(tmp_path / "straight") if "loss" in r
    ]
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "split")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
