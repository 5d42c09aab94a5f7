"""GaLoreAdamW / GaLoreAdafactor / GaLoreAdamW8bit: the paper's math, state shapes, resume, and the
cross-check against the reference package galore-torch (a dev dependency, imported here only)."""

from __future__ import annotations

import importlib.util
import io
import math
import warnings
from pathlib import Path

import galore_torch  # a dev dependency: a broken import must fail these tests, not skip them
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from galore_train.optim import GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit, NaturalGaLoreAdamW

LR, BETAS, EPS = 1e-2, (0.9, 0.999), 1e-8


def _grads(shape: tuple[int, int], count: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for _ in range(count)]


def _run(
    optimizer_cls, w0: torch.Tensor, grads: list[torch.Tensor], group: dict, **kwargs
) -> tuple[torch.Tensor, torch.optim.Optimizer]:
    p = torch.nn.Parameter(w0.clone())
    optimizer = optimizer_cls([{"params": [p], **group}], **kwargs)
    for g in grads:
        p.grad = g.clone()
        optimizer.step()
    return p.detach(), optimizer


def paper_galore_adamw(w0, grads, rank, gap, scale, lr, betas, eps, weight_decay, side):
    """GaLore-AdamW written out plainly from the paper's Algorithm 2 (+ AdamW's decoupled weight decay)."""
    w, m, v = w0.clone(), 0.0, 0.0
    beta1, beta2 = betas
    for t, g in enumerate(grads, start=1):
        if (t - 1) % gap == 0:  # refresh at the first step and every `gap` steps
            u, _, vh = torch.linalg.svd(g, full_matrices=False)
            p_left, q_right = u[:, :rank], vh[:rank]
        r = p_left.T @ g if side == "left" else g @ q_right.T  # project
        m = beta1 * m + (1 - beta1) * r  # Adam moments of R
        v = beta2 * v + (1 - beta2) * r * r
        m_hat, v_hat = m / (1 - beta1**t), v / (1 - beta2**t)  # bias correction
        n = m_hat / (v_hat.sqrt() + eps)
        g_tilde = p_left @ n if side == "left" else n @ q_right  # project back
        w = w - lr * weight_decay * w - lr * scale * g_tilde  # decoupled decay, alpha, lr
    return w


@pytest.mark.parametrize(
    "shape, proj_type, side",
    [
        ((24, 40), "std", "left"),
        ((40, 24), "std", "right"),
        ((40, 24), "reverse_std", "left"),
        ((24, 40), "right", "right"),
    ],
)
@pytest.mark.parametrize("steps", [1, 8])  # 8 steps with gap 3: refreshes at steps 0, 3, 6
def test_galore_adamw_equals_the_papers_algorithm(shape, proj_type, side, steps) -> None:
    w0, grads = torch.randn(shape, generator=torch.Generator().manual_seed(1)), _grads(shape, steps)
    settings = dict(rank=5, gap=3, scale=0.25, lr=LR, betas=BETAS, eps=EPS, weight_decay=0.1)
    group = {"rank": 5, "update_proj_gap": 3, "scale": 0.25, "proj_type": proj_type}
    ours, optimizer = _run(GaLoreAdamW, w0, grads, group, lr=LR, betas=BETAS, eps=EPS, weight_decay=0.1)
    torch.testing.assert_close(ours, paper_galore_adamw(w0, grads, side=side, **settings))
    low_rank = (5, shape[1]) if side == "left" else (shape[0], 5)
    assert optimizer.state[optimizer.param_groups[0]["params"][0]]["exp_avg"].shape == low_rank


def test_projection_changes_exactly_every_gap_steps() -> None:
    p = torch.nn.Parameter(torch.randn(20, 12))
    optimizer = GaLoreAdamW([{"params": [p], "rank": 4, "update_proj_gap": 4}], lr=LR)
    previous, changed = None, []
    for g in _grads((20, 12), 13):
        p.grad = g
        optimizer.step()
        current = optimizer.state[p]["projection"].clone()
        changed.append(previous is None or not torch.equal(current, previous))
        previous = current
    assert [step for step, flag in enumerate(changed) if flag] == [0, 4, 8, 12]


def test_full_rank_identity_like_projection_reduces_to_adamw() -> None:
    """rank = n with a first gradient whose singular vectors are a signed permutation: Adam is
    elementwise, so GaLore-AdamW with scale 1 must then follow torch.optim.AdamW exactly."""
    shape = (7, 5)
    first = torch.zeros(shape)
    first[torch.arange(5), torch.arange(5)] = torch.tensor([5.0, -4.0, 3.0, 2.5, -1.0])
    grads = [first] + _grads(shape, 6)
    w0 = torch.randn(shape)
    group = {"rank": 5, "update_proj_gap": 1000, "scale": 1.0, "proj_type": "std"}
    ours, _ = _run(GaLoreAdamW, w0, grads, group, lr=LR, betas=BETAS, eps=EPS, weight_decay=0.1)
    reference, _ = _run(torch.optim.AdamW, w0, grads, {}, lr=LR, betas=BETAS, eps=EPS, weight_decay=0.1)
    torch.testing.assert_close(ours, reference)


def test_plain_groups_are_adamw() -> None:
    w0, grads = torch.randn(6, 4), _grads((6, 4), 5)
    ours, _ = _run(GaLoreAdamW, w0, grads, {}, lr=LR, betas=BETAS, eps=EPS, weight_decay=0.1)
    reference, _ = _run(torch.optim.AdamW, w0, grads, {}, lr=LR, betas=BETAS, eps=EPS, weight_decay=0.1)
    torch.testing.assert_close(ours, reference)


@pytest.mark.parametrize("optimizer_cls", [GaLoreAdamW, GaLoreAdafactor, GaLoreAdamW8bit])
@pytest.mark.parametrize(
    "proj_type, low_rank",
    [("std", (80, 16)), ("reverse_std", (16, 64)), ("left", (16, 64)), ("right", (80, 16)), ("full", (16, 16))],
)
def test_moments_have_the_low_rank_shape(optimizer_cls, proj_type, low_rank) -> None:
    kwargs = (
        {"beta1": 0.9}
        if optimizer_cls is GaLoreAdafactor
        else {"min_8bit_size": 1}
        if optimizer_cls is GaLoreAdamW8bit
        else {}
    )
    _, optimizer = _run(
        optimizer_cls,
        torch.randn(80, 64),
        _grads((80, 64), 2),
        {"rank": 16, "update_proj_gap": 10, "proj_type": proj_type},
        **kwargs,
    )
    state = next(iter(optimizer.state.values()))
    assert state["exp_avg"].shape == low_rank
    if optimizer_cls is GaLoreAdafactor:
        assert state["exp_avg_sq_row"].shape == low_rank[:1] and state["exp_avg_sq_col"].shape == low_rank[1:]
    else:
        assert state["exp_avg_sq"].shape == low_rank
    if optimizer_cls is GaLoreAdamW8bit:
        blocks = math.ceil(low_rank[0] * low_rank[1] / 256)
        assert state["exp_avg"].dtype == torch.uint8 and state["exp_avg_absmax"].shape == (blocks,)


def test_8bit_galore_tracks_32bit_galore_without_touching_param_storage() -> None:
    w0, grads = torch.randn(160, 64), _grads((160, 64), 6)
    group = {"rank": 32, "update_proj_gap": 4, "scale": 0.25}
    p = torch.nn.Parameter(w0.clone())
    optimizer = GaLoreAdamW8bit([{"params": [p], **group}], lr=LR, weight_decay=0.1)
    storage = p.data_ptr()
    for g in grads:
        p.grad = g.clone()
        optimizer.step()
    assert p.data_ptr() == storage and p.shape == (160, 64)
    assert optimizer.state[p]["exp_avg"].dtype == torch.uint8  # 160 x 32 low-rank moments >= 4096 elements
    full_precision, _ = _run(GaLoreAdamW, w0, grads, group, lr=LR, weight_decay=0.1)
    moved = (full_precision - w0).norm()
    assert (p.detach() - full_precision).norm() < 0.05 * moved  # 8-bit moments: close, not exact
    assert (p.detach() - w0).norm() > 0.5 * moved


def test_8bit_full_rank_groups_match_bitsandbytes_adamw8bit_and_small_tensors_stay_fp32() -> None:
    import bitsandbytes as bnb

    w0, grads = torch.randn(80, 64), _grads((80, 64), 4)
    ours, optimizer = _run(GaLoreAdamW8bit, w0, grads, {}, lr=LR, weight_decay=0.1)
    reference, _ = _run(bnb.optim.AdamW8bit, w0, grads, {}, lr=LR, weight_decay=0.1)
    assert torch.equal(ours, reference)  # the same bitsandbytes kernel, called on the parameter
    small, small_optimizer = _run(GaLoreAdamW8bit, w0[:10, :10], [g[:10, :10] for g in grads], {}, lr=LR)
    assert next(iter(small_optimizer.state.values()))["exp_avg"].dtype == torch.float32
    torch.testing.assert_close(small, _run(GaLoreAdamW, w0[:10, :10], [g[:10, :10] for g in grads], {}, lr=LR)[0])


@pytest.mark.parametrize("beta1", [None, 0.9])
def test_plain_adafactor_matches_transformers_with_paper_settings(beta1) -> None:
    from transformers.optimization import Adafactor

    w0, grads = torch.randn(12, 8), _grads((12, 8), 5)
    bias0, bias_grads = torch.randn(8), _grads((8,), 5, seed=1)
    ours = GaLoreAdafactor(
        [torch.nn.Parameter(w0.clone()), torch.nn.Parameter(bias0.clone())], lr=LR, beta1=beta1, weight_decay=0.1
    )
    reference = Adafactor(
        [torch.nn.Parameter(w0.clone()), torch.nn.Parameter(bias0.clone())],
        lr=LR,
        beta1=beta1,
        weight_decay=0.1,
        relative_step=False,
        scale_parameter=False,
        warmup_init=False,
    )
    for g, bias_grad in zip(grads, bias_grads):
        for optimizer in (ours, reference):
            weight, bias = optimizer.param_groups[0]["params"]
            weight.grad, bias.grad = g.clone(), bias_grad.clone()
            optimizer.step()
    for a, b in zip(ours.param_groups[0]["params"], reference.param_groups[0]["params"]):
        torch.testing.assert_close(a, b)


# --- cross-check against the reference package ------------------------------------------------------


def _galore_torch_adamw(w0, grads, group, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return _run(galore_torch.GaLoreAdamW, w0, grads, group, no_deprecation_warning=True, **kwargs)


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right"])
@pytest.mark.parametrize("shape", [(40, 24), (24, 40)])
def test_galore_adamw_matches_galore_torch(proj_type, shape) -> None:
    """Same weights, gradients, rank, gap, scale -> same weights after 7 steps (refreshes at 0, 3, 6).

    Deliberate difference: galore-torch adds eps to sqrt(V) before the bias correction, we after it
    (the paper's and torch.optim.AdamW's placement); with eps = 1e-8 and O(1) gradients it is below
    fp32 tolerance. Weight decay (not used here) is applied before the step by us (torch.optim.AdamW),
    after it by galore-torch: an O(lr^2 wd) difference.
    """
    w0, grads = torch.randn(shape), _grads(shape, 7)
    group = {"rank": 6, "update_proj_gap": 3, "scale": 0.25, "proj_type": proj_type}
    ours, _ = _run(GaLoreAdamW, w0, grads, group, lr=LR, eps=EPS)
    reference, _ = _galore_torch_adamw(w0, grads, group, lr=LR, eps=EPS)
    torch.testing.assert_close(ours, reference)
    assert not torch.allclose(ours, w0)


def test_galore_adamw_full_projection_matches_galore_torch() -> None:
    """Two-sided projection: same projections and second moments. The weights are not compared: at a
    refresh step R = P^T G Q^T is exactly diag(s) up to ~1e-7 rounding noise off the diagonal, and
    Adam's first step (M/sqrt(V) = sign R) turns that noise into +-1 updates in both implementations,
    so any difference in matmul rounding order flips their signs."""
    w0, grads = torch.randn(40, 24), _grads((40, 24), 7)
    group = {"rank": 6, "update_proj_gap": 3, "scale": 0.25, "proj_type": "full"}
    _, ours = _run(GaLoreAdamW, w0, grads, group, lr=LR, eps=EPS)
    _, reference = _galore_torch_adamw(w0, grads, group, lr=LR, eps=EPS)
    state, reference_state = next(iter(ours.state.values())), next(iter(reference.state.values()))
    left, right = reference_state["projector"].ortho_matrix
    assert torch.equal(state["projection"], left) and torch.equal(state["projection_right"], right)
    torch.testing.assert_close(state["exp_avg_sq"], reference_state["exp_avg_sq"])


@pytest.mark.parametrize("beta1", [None, 0.9])
def test_galore_adafactor_matches_galore_torch(beta1) -> None:
    w0, grads = torch.randn(40, 24), _grads((40, 24), 7)
    group = {"rank": 6, "update_proj_gap": 3, "scale": 0.25, "proj_type": "std"}
    ours, _ = _run(GaLoreAdafactor, w0, grads, group, lr=LR, beta1=beta1, weight_decay=0.1)
    reference, _ = _run(
        galore_torch.GaLoreAdafactor,
        w0,
        grads,
        group,
        lr=LR,
        beta1=beta1,
        weight_decay=0.1,
        relative_step=False,
        scale_parameter=False,
        warmup_init=False,
    )
    torch.testing.assert_close(ours, reference)


# --- state dicts -----------------------------------------------------------------------------------

OPTIMIZER_CASES = {
    "adamw": (GaLoreAdamW, {"weight_decay": 0.1}, {}),
    "adamw_full_randomized_stagger": (
        GaLoreAdamW,
        {},
        {"proj_type": "full", "svd": "randomized", "stagger_refresh": True},
    ),
    "adafactor": (GaLoreAdafactor, {"weight_decay": 0.1}, {}),
    "adafactor_beta1": (GaLoreAdafactor, {"beta1": 0.9}, {"proj_type": "reverse_std"}),
    "adamw8bit": (GaLoreAdamW8bit, {"weight_decay": 0.1, "min_8bit_size": 64}, {}),
}


def _model_like_params(seed: int) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    shapes = [(48, 32), (32, 48), (32, 32), (32,), (100, 32)]
    return [torch.nn.Parameter(torch.randn(s, generator=generator)) for s in shapes]


def _build(case: str, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    optimizer_cls, kwargs, galore = OPTIMIZER_CASES[case]
    groups = [{"params": params[:3], "rank": 8, "update_proj_gap": 3, "scale": 0.25, **galore}, {"params": params[3:]}]
    return optimizer_cls(groups, lr=LR, **kwargs)


def _train(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], steps: range) -> None:
    for step in steps:
        generator = torch.Generator().manual_seed(1000 + step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator).to(p.dtype)
        optimizer.step()


@pytest.mark.parametrize("case", list(OPTIMIZER_CASES))
def test_state_dict_round_trip_resumes_bit_identically(case: str) -> None:
    params = _model_like_params(0)
    optimizer = _build(case, params)
    _train(optimizer, params, range(4))  # past one refresh (steps 0 and 3)
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    resumed_params = [torch.nn.Parameter(t.clone()) for t in saved["params"]]
    resumed = _build(case, resumed_params)
    resumed.load_state_dict(saved["optimizer"])
    for before, after in zip(optimizer.state.values(), resumed.state.values()):
        assert {k: (v.dtype, v.shape) if torch.is_tensor(v) else v for k, v in before.items()} == {
            k: (v.dtype, v.shape) if torch.is_tensor(v) else v for k, v in after.items()
        }
    _train(optimizer, params, range(4, 11))  # two more refreshes (steps 6 and 9)
    _train(resumed, resumed_params, range(4, 11))
    for a, b in zip(params, resumed_params):
        assert torch.equal(a, b)


@pytest.mark.parametrize("case", list(OPTIMIZER_CASES))
def test_bf16_parameters_stay_bf16_and_finite(case: str) -> None:
    params = [torch.nn.Parameter(p.detach().to(torch.bfloat16)) for p in _model_like_params(0)]
    optimizer = _build(case, params)
    grads = [torch.randn(p.shape).to(torch.bfloat16) for p in params]
    for _ in range(2):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        optimizer.step()
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in params)


def test_invalid_groups_are_rejected() -> None:
    p = torch.nn.Parameter(torch.randn(8, 6))
    with pytest.raises(ValueError, match="rank 7 exceeds"):
        GaLoreAdamW([{"params": [p], "rank": 7}])
    with pytest.raises(ValueError, match="proj_type"):
        GaLoreAdamW([{"params": [p], "rank": 2, "proj_type": "diagonal"}])
    with pytest.raises(ValueError, match="2-D"):
        GaLoreAdamW([{"params": [torch.nn.Parameter(torch.randn(8))], "rank": 2}])
    with pytest.raises(ValueError, match="rank must be a positive"):
        GaLoreAdafactor([{"params": [p], "rank": 0}])


# --- float32 moments of bf16 weights (--moments-dtype fp32) -------------------------------------------


def test_a_bf16_second_moment_cannot_decay_and_a_float32_one_does() -> None:
    """The tensor-level cause: 0.999 v rounds back to v in bf16 (8 significant bits), for any v."""
    v = torch.logspace(-12, 2, 15).to(torch.bfloat16)
    decayed = v.clone()
    for _ in range(100):
        decayed.mul_(0.999).addcmul_(torch.zeros_like(v), torch.zeros_like(v), value=0.001)
    assert torch.equal(decayed, v)
    v32 = v.float()
    for _ in range(100):
        v32.mul_(0.999)
    torch.testing.assert_close(v32, v.float() * 0.999**100)


@pytest.mark.parametrize("moment_dtype", [None, torch.float32])
def test_galore_moments_of_bf16_weights_decay_only_in_float32(moment_dtype) -> None:
    """One step with a gradient, then zero gradients: V must shrink by beta2 per step, which bf16 moments
    (the default, the paper's pure bf16) cannot; float32 ones follow 0.999^t. The direction stays bf16."""
    p = torch.nn.Parameter(torch.randn(32, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16))
    group = {"params": [p], "rank": 4, "update_proj_gap": 1000, "moment_dtype": moment_dtype}
    optimizer = GaLoreAdamW([group], lr=1e-3, betas=(0.9, 0.999))
    p.grad = torch.randn(32, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    optimizer.step()
    state = optimizer.state[p]
    v0 = state["exp_avg_sq"].float().clone()
    for _ in range(50):
        p.grad = torch.zeros_like(p)
        optimizer.step()
    assert state["exp_avg_sq"].dtype == state["exp_avg"].dtype == (moment_dtype or torch.bfloat16)
    assert p.dtype == torch.bfloat16 and torch.isfinite(p).all()
    if moment_dtype is None:
        assert torch.equal(state["exp_avg_sq"].float(), v0)  # stuck
    else:
        torch.testing.assert_close(state["exp_avg_sq"], v0 * 0.999**50)


def test_float32_moments_of_float32_weights_change_nothing() -> None:
    w0, grads = torch.randn(24, 40, generator=torch.Generator().manual_seed(1)), _grads((24, 40), 5)
    group = {"rank": 5, "update_proj_gap": 3}
    plain, _ = _run(GaLoreAdamW, w0, grads, group, lr=LR)
    float32, _ = _run(GaLoreAdamW, w0, grads, {**group, "moment_dtype": torch.float32}, lr=LR)
    assert torch.equal(plain, float32)


@pytest.mark.parametrize(
    "optimizer_cls, kwargs",
    [(GaLoreAdamW, {}), (NaturalGaLoreAdamW, {"fisher_history": 3}), (GaLoreAdamW8bit, {"min_8bit_size": 10**6})],
)
def test_float32_moments_of_bf16_weights_resume_bit_identically(optimizer_cls, kwargs) -> None:
    """torch's load_state_dict casts states to the parameter's dtype; the float32 moments must come back as saved.
    (GaLoreAdamW8bit: its moments below min_8bit_size are GaLoreAdamW's.)"""

    def build(params):
        return optimizer_cls(
            [
                {"params": params[:3], "rank": 8, "update_proj_gap": 3, "moment_dtype": torch.float32},
                {"params": params[3:]},
            ],
            lr=LR,
            **kwargs,
        )

    params = [torch.nn.Parameter(p.detach().to(torch.bfloat16)) for p in _model_like_params(0)]
    optimizer = build(params)
    _train(optimizer, params, range(4))
    assert all(optimizer.state[p]["exp_avg_sq"].dtype == torch.float32 for p in params[:3])
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_params = [torch.nn.Parameter(t.clone()) for t in saved["params"]]
    resumed = build(resumed_params)
    resumed.load_state_dict(saved["optimizer"])
    assert all(resumed.state[p]["exp_avg_sq"].dtype == torch.float32 for p in resumed_params[:3])
    _train(optimizer, params, range(4, 8))
    _train(resumed, resumed_params, range(4, 8))
    for a, b in zip(params, resumed_params):
        assert torch.equal(a, b)


class _StateBytesAndDtypes(TorchDispatchMode):
    """Every tensor an operation makes while loading (not one of the `saved` ones): its dtype and bytes."""

    def __init__(self, saved: list[torch.Tensor]) -> None:
        super().__init__()
        self.seen = {t.untyped_storage().data_ptr() for t in saved}
        self.made: list[tuple[torch.dtype, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 (torch signature)
        out = func(*args, **(kwargs or {}))
        for leaf in torch.utils._pytree.tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and leaf.untyped_storage().data_ptr() not in self.seen:
                self.made.append((leaf.dtype, leaf.untyped_storage().nbytes()))
        return out


def test_resuming_8bit_galore_never_casts_its_state_to_the_weights_dtype() -> None:
    """torch's load_state_dict cast every state tensor to the (bf16) parameter dtype on the device before ours
    restored the 8-bit moments and float32 block maxima: at 7B ~7 GiB of transient bf16 state on the GPU. Now the
    state is taken as saved: no tensor is made while loading on the parameters' device (another device: one copy
    each, in the saved dtype), and the run continues bit for bit."""
    params = [torch.nn.Parameter(p.detach().to(torch.bfloat16)) for p in _model_like_params(0)]
    optimizer = _build("adamw8bit", params)
    _train(optimizer, params, range(4))
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    saved_dtypes = {
        v.dtype for state in saved["optimizer"]["state"].values() for v in state.values() if torch.is_tensor(v)
    }
    assert {torch.uint8, torch.float32, torch.bfloat16} <= saved_dtypes  # 8-bit moments, block maxima, projections
    resumed_params = [torch.nn.Parameter(t.clone()) for t in saved["params"]]
    resumed = _build("adamw8bit", resumed_params)
    state = saved["optimizer"]["state"]
    spy = _StateBytesAndDtypes([t for values in state.values() for t in values.values() if torch.is_tensor(t)])
    with spy:
        resumed.load_state_dict(saved["optimizer"])
    assert spy.made == []  # before the fix: a bf16 copy of every state tensor, then the restored uint8/fp32 ones
    for before, after in zip(optimizer.state.values(), resumed.state.values()):
        assert {k: v.dtype for k, v in before.items() if torch.is_tensor(v)} == {
            k: v.dtype for k, v in after.items() if torch.is_tensor(v)
        }
    _train(optimizer, params, range(4, 8))
    _train(resumed, resumed_params, range(4, 8))
    assert all(torch.equal(a, b) for a, b in zip(params, resumed_params))


def test_8bit_second_moments_decay_through_their_block_maxima() -> None:
    """Why --moments-dtype does not apply to galore_adamw8bit: a uniform decay re-quantizes to the same codes
    under a 0.999 times smaller fp32 absmax, so the 8-bit V decays (of bf16 weights too)."""
    p = torch.nn.Parameter(torch.zeros(64, 128, dtype=torch.bfloat16))
    optimizer = GaLoreAdamW8bit([{"params": [p]}], lr=0.0)
    p.grad = torch.randn(64, 128, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    optimizer.step()
    state = optimizer.state[p]
    codes, absmax = state["exp_avg_sq"].clone(), state["exp_avg_sq_absmax"].clone()
    for _ in range(50):
        p.grad = torch.zeros_like(p)
        optimizer.step()
    assert state["exp_avg_sq"].dtype == torch.uint8 and torch.equal(state["exp_avg_sq"], codes)
    torch.testing.assert_close(state["exp_avg_sq_absmax"], absmax * 0.999**50)


def test_moment_dtype_must_be_a_floating_dtype() -> None:
    with pytest.raises(ValueError, match="moment_dtype must be a floating-point torch.dtype"):
        GaLoreAdamW([{"params": [torch.nn.Parameter(torch.randn(8, 6))], "rank": 2, "moment_dtype": "fp32"}])


# --- optimizer-state bytes vs the paper's formula (the numbers scripts/bench_optimizer.py prints) -----


def test_every_optimizers_state_bytes_equal_the_formula() -> None:
    """AdamW 2mn, GaLore-AdamW mr + 2nr (m <= n), Adafactor m + n, 8-bit moments 1 B + fp32 block maxima, ...:
    measured from the state tensors after one step, with the benchmark's own code, on both sides of std."""
    bench = _load_script("bench_optimizer")
    generator = torch.Generator().manual_seed(0)
    block = [
        (f"matrix{i}", torch.randn(shape, generator=generator), torch.randn(shape, generator=generator))
        for i, shape in enumerate([(64, 512), (512, 64), (128, 128)])
    ]
    rows = bench.bench_state_bytes(block, rank=32)  # every low-rank moment >= 4096 elements: 8-bit applies
    assert [name for name, _, _ in rows] == [
        "adamw",
        "adam",
        "adafactor",
        "adam8bit",
        "galore_adamw",
        "galore_adafactor",
        "galore_adamw8bit",
    ]
    for name, measured, formula in rows:
        assert measured == formula, name
    assert (
        dict((name, measured) for name, measured, _ in rows)["galore_adamw"]
        == 4 * (64 * 32 + 2 * 512 * 32) * 2 + 4 * 3 * 128 * 32
    )


def _load_script(name: str):
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
