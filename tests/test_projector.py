"""The GaLore projector: sides, refresh schedule, staggering, randomized SVD, SVD failure handling."""

from __future__ import annotations

import collections

import pytest
import torch

from galore_train.optim import GaLoreAdamW, projector
from galore_train.optim.projector import (
    GaLoreProjector,
    RefreshStats,
    randomized_svd_top,
    stagger_offsets,
    subspace_similarity,
    svd_top,
)


def _orthonormal_columns(t: torch.Tensor) -> bool:
    return torch.allclose(t.mT @ t, torch.eye(t.shape[1]), atol=1e-5)


@pytest.mark.parametrize(
    "proj_type, shape, side",
    [
        ("std", (40, 24), "right"),
        ("std", (24, 40), "left"),
        ("std", (30, 30), "right"),
        ("reverse_std", (40, 24), "left"),
        ("reverse_std", (24, 40), "right"),
        ("left", (40, 24), "left"),
        ("right", (24, 40), "right"),
        ("full", (40, 24), "full"),
    ],
)
def test_side_follows_proj_type_and_shape(proj_type: str, shape: tuple[int, int], side: str) -> None:
    assert GaLoreProjector(rank=4, update_proj_gap=10, proj_type=proj_type).side(torch.Size(shape)) == side


@pytest.mark.parametrize("proj_type, low_rank_shape", [("left", (6, 24)), ("right", (40, 6)), ("full", (6, 6))])
def test_project_uses_top_singular_vectors_and_back_projection_is_their_span(
    proj_type: str, low_rank_shape: tuple
) -> None:
    torch.manual_seed(0)
    grad = torch.randn(40, 24)
    proj = GaLoreProjector(rank=6, update_proj_gap=10, proj_type=proj_type)
    state: dict = {}
    low = proj.project(grad, state, step=0, stats=RefreshStats())
    assert low.shape == low_rank_shape
    u, s, vh = torch.linalg.svd(grad, full_matrices=False)
    best = u[:, :6] @ torch.diag(s[:6]) @ vh[:6]
    if proj_type == "full":  # the two-sided projection of G onto its own top singular vectors is diag(s)
        torch.testing.assert_close(low, torch.diag(s[:6]), atol=1e-4, rtol=1e-5)
    back = torch.zeros(40, 24)
    proj.project_back_add_(back, low, state, alpha=1.0, beta=0.0)
    torch.testing.assert_close(back, best, atol=1e-4, rtol=1e-4)  # rank-6 truncation of G (Eckart-Young)
    # stored compactly: a slice of U must not keep the whole U alive
    stored = state["projection"]
    assert stored.untyped_storage().nbytes() == stored.numel() * stored.element_size()


def test_project_back_add_is_beta_param_plus_alpha_update() -> None:
    torch.manual_seed(0)
    proj = GaLoreProjector(rank=3, update_proj_gap=10, proj_type="left")
    state: dict = {}
    low = proj.project(torch.randn(8, 5), state, step=0, stats=RefreshStats())
    param = torch.randn(8, 5)
    expected = 0.9 * param - 0.5 * (state["projection"] @ low)
    proj.project_back_add_(param, low, state, alpha=-0.5, beta=0.9)
    torch.testing.assert_close(param, expected)


def test_refresh_due_at_first_step_then_every_gap_shifted_by_offset() -> None:
    proj = GaLoreProjector(rank=2, update_proj_gap=4)
    assert proj.refresh_due({}, step=3)  # no projection yet
    due = [step for step in range(12) if proj.refresh_due({"projection": None}, step)]
    assert due == [0, 4, 8]
    due = [step for step in range(12) if proj.refresh_due({"projection": None, "refresh_offset": 1}, step)]
    assert due == [3, 7, 11]


@pytest.mark.parametrize("count, gap", [(7, 7), (3, 10), (10, 4), (56, 200)])
def test_stagger_offsets_spread_evenly(count: int, gap: int) -> None:
    offsets = stagger_offsets(count, gap)
    per_step = collections.Counter((-offset) % gap for offset in offsets)  # the step within the window
    assert sum(per_step.values()) == count
    assert max(per_step.values()) == -(-count // gap)  # ceil(count / gap): as flat as possible
    assert len(per_step) == min(count, gap)


def _galore_setup(count: int, gap: int, stagger: bool) -> tuple[GaLoreAdamW, list[torch.nn.Parameter]]:
    params = [torch.nn.Parameter(torch.randn(12, 8)) for _ in range(count)]
    group = {"params": params, "rank": 2, "update_proj_gap": gap, "scale": 1.0, "stagger_refresh": stagger}
    return GaLoreAdamW([group], lr=1e-3), params


@pytest.mark.parametrize("stagger", [False, True])
def test_refreshes_per_step_with_and_without_stagger(stagger: bool) -> None:
    torch.manual_seed(0)
    count, gap = 6, 6
    optimizer, params = _galore_setup(count, gap, stagger)
    counts = []
    for _ in range(3 * gap):
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer.step()
        counts.append(optimizer.svd_metrics()["svd_refreshes"])
    assert counts[0] == count  # every matrix needs a projection at the first step
    steady = counts[1:]
    if stagger:
        assert steady == [1] * len(steady)  # one SVD per step instead of a spike every gap steps
    else:
        assert steady == [count if step % gap == 0 else 0 for step in range(1, 3 * gap)]


def test_stagger_offsets_survive_state_dict_round_trip() -> None:
    optimizer, params = _galore_setup(4, 8, stagger=True)
    assert [optimizer.state[p]["refresh_offset"] for p in params] == [0, 2, 4, 6]
    fresh, fresh_params = _galore_setup(4, 8, stagger=False)
    fresh.load_state_dict(optimizer.state_dict())
    assert [fresh.state[p]["refresh_offset"] for p in fresh_params] == [0, 2, 4, 6]


def _decaying_spectrum(m: int, n: int, seed: int = 0) -> torch.Tensor:
    """A gradient-like matrix: singular values decaying like 1/i (real gradients are far from white noise)."""
    generator = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, n, generator=generator)).Q
    v = torch.linalg.qr(torch.randn(n, n, generator=generator)).Q
    s = 1.0 / torch.arange(1, n + 1, dtype=torch.float32)
    return u @ torch.diag(s) @ v.mT


def test_randomized_svd_subspace_is_close_to_the_exact_one_and_seeded() -> None:
    matrix = _decaying_spectrum(200, 120)
    u_full, vh_full = svd_top(matrix, 16)
    u_rand, vh_rand = randomized_svd_top(matrix, 16, seed=3)
    assert _orthonormal_columns(u_rand) and _orthonormal_columns(vh_rand.mT)
    assert subspace_similarity(u_full, u_rand) > 0.99
    assert subspace_similarity(vh_full.mT, vh_rand.mT) > 0.99
    unrelated = torch.linalg.qr(torch.randn(200, 16)).Q
    assert subspace_similarity(u_full, unrelated) < 0.3  # the measure does discriminate
    again, _ = randomized_svd_top(matrix, 16, seed=3)
    assert torch.equal(u_rand, again)


def test_randomized_option_is_used_for_refreshes() -> None:
    matrix = _decaying_spectrum(64, 48)
    state: dict = {}
    GaLoreProjector(rank=8, update_proj_gap=10, proj_type="left", svd="randomized").project(
        matrix, state, 5, RefreshStats()
    )
    expected, _ = randomized_svd_top(matrix, 8, seed=5)
    torch.testing.assert_close(state["projection"], expected)


def test_bf16_gradient_svd_runs_in_float32_and_projection_keeps_the_gradient_dtype() -> None:
    torch.manual_seed(0)
    grad = torch.randn(16, 10).to(torch.bfloat16)
    state: dict = {}
    low = GaLoreProjector(rank=4, update_proj_gap=10).project(grad, state, 0, RefreshStats())
    assert state["projection"].dtype == torch.bfloat16 and low.dtype == torch.bfloat16
    _, vh = svd_top(grad.float(), 4)
    torch.testing.assert_close(state["projection"], vh.to(torch.bfloat16))


def test_svd_metrics_report_time_and_refreshes_since_last_read() -> None:
    torch.manual_seed(0)
    optimizer, params = _galore_setup(3, 5, stagger=False)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    first = optimizer.svd_metrics()
    assert first["svd_refreshes"] == 3 and first["svd_seconds"] > 0 and first["svd_failures_total"] == 0
    optimizer.step()  # step 1: no refresh
    assert optimizer.svd_metrics() == {"svd_seconds": 0.0, "svd_refreshes": 0, "svd_failures_total": 0}


# --- robustness (issue 10): a refresh never crashes the run or poisons the weights -----------------


def _one_matrix(gap: int = 2, rank: int = 3) -> tuple[GaLoreAdamW, torch.nn.Parameter]:
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(10, 6))
    group = {"params": [("block.weight", p)], "rank": rank, "update_proj_gap": gap, "scale": 1.0, "proj_type": "left"}
    return GaLoreAdamW([group], lr=1e-2), p


def test_rank_deficient_gradient_gives_a_valid_projection_and_finite_training() -> None:
    optimizer, p = _one_matrix(rank=4)
    for _ in range(5):
        p.grad = torch.outer(torch.randn(10), torch.randn(6))  # rank 1 < rank 4
        optimizer.step()
    projection = optimizer.state[p]["projection"]
    assert _orthonormal_columns(projection) and torch.isfinite(p).all()
    assert optimizer.svd_metrics()["svd_failures_total"] == 0


def test_nan_gradient_at_refresh_keeps_projection_skips_update_and_counts() -> None:
    optimizer, p = _one_matrix(gap=2)
    p.grad = torch.randn(10, 6)
    optimizer.step()
    p.grad = torch.randn(10, 6)
    optimizer.step()
    kept, weights = optimizer.state[p]["projection"].clone(), p.detach().clone()
    p.grad = torch.full((10, 6), float("nan"))
    with pytest.warns(RuntimeWarning, match="block.weight.*non-finite gradient"):
        optimizer.step()  # step 2 is a refresh step
    assert torch.equal(optimizer.state[p]["projection"], kept) and torch.equal(p, weights)
    assert optimizer.state[p]["step"] == 2 and optimizer.svd_metrics()["svd_failures_total"] == 1
    p.grad = torch.randn(10, 6)
    optimizer.step()  # the refresh is retried with the next, finite gradient
    assert not torch.equal(optimizer.state[p]["projection"], kept)
    assert torch.isfinite(p).all() and not torch.equal(p, weights)


def _failing_svd(*args, **kwargs):
    raise torch.linalg.LinAlgError("simulated: the algorithm failed to converge")


def test_svd_failure_keeps_previous_projection_and_still_updates(monkeypatch: pytest.MonkeyPatch) -> None:
    optimizer, p = _one_matrix(gap=2)
    for _ in range(2):
        p.grad = torch.randn(10, 6)
        optimizer.step()
    kept, weights = optimizer.state[p]["projection"].clone(), p.detach().clone()
    monkeypatch.setattr(torch.linalg, "svd", _failing_svd)
    p.grad = torch.randn(10, 6)
    with pytest.warns(RuntimeWarning, match="block.weight: SVD failed.*keeping the previous projection"):
        optimizer.step()
    assert torch.equal(optimizer.state[p]["projection"], kept)
    assert torch.isfinite(p).all() and not torch.equal(p, weights)  # the update went through the old basis
    assert optimizer.svd_metrics()["svd_failures_total"] == 1


def test_svd_returning_nan_counts_as_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    optimizer, p = _one_matrix(gap=2)
    for _ in range(2):
        p.grad = torch.randn(10, 6)
        optimizer.step()
    kept = optimizer.state[p]["projection"].clone()
    monkeypatch.setattr(
        projector,
        "svd_top",
        lambda matrix, rank: (torch.full((10, rank), float("nan")), torch.full((rank, 6), float("nan"))),
    )
    p.grad = torch.randn(10, 6)
    with pytest.warns(RuntimeWarning, match="non-finite singular vectors"):
        optimizer.step()
    assert torch.equal(optimizer.state[p]["projection"], kept) and torch.isfinite(p).all()


def test_first_refresh_falls_back_to_randomized_range_finder(monkeypatch: pytest.MonkeyPatch) -> None:
    optimizer, p = _one_matrix()
    monkeypatch.setattr(projector, "svd_top", _failing_svd)
    grad = _decaying_spectrum(10, 6)
    p.grad = grad
    with pytest.warns(RuntimeWarning, match="falling back"):
        optimizer.step()
    expected, _ = randomized_svd_top(grad, 3, seed=0)
    torch.testing.assert_close(optimizer.state[p]["projection"], expected)
    assert optimizer.svd_metrics()["svd_failures_total"] == 1


def test_first_refresh_without_any_svd_uses_a_random_orthonormal_basis(monkeypatch: pytest.MonkeyPatch) -> None:
    optimizer, p = _one_matrix()
    monkeypatch.setattr(torch.linalg, "svd", _failing_svd)  # the randomized finder needs a (small) SVD too
    p.grad = torch.randn(10, 6)
    with pytest.warns(RuntimeWarning):
        optimizer.step()
    projection = optimizer.state[p]["projection"]
    assert projection.shape == (10, 3) and _orthonormal_columns(projection) and torch.isfinite(p).all()
