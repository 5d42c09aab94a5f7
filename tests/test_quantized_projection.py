"""Q-GaLore-style projections: group-wise INT8/INT4 quantization (error bounds, bytes, packing), the
projector storing them quantized, and the adaptive (lazy) refresh interval on synthetic streams."""

from __future__ import annotations

import io

import pytest
import torch
from conftest import TINY_LLAMA
from transformers import LlamaConfig

from galore_train.config import TrainConfig
from galore_train.model import build_model
from galore_train.optim import GaLoreAdamW
from galore_train.optim.projector import MAX_GAP_FACTOR, STABLE_REFRESHES, GaLoreProjector, RefreshStats
from galore_train.optim.quantize import QuantizedMatrix, dequantize, quantize, quantized_nbytes
from galore_train.optimizers import build_optimizer

QMAX = {8: 127, 4: 7}


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("shape, group_size", [((64, 8), 256), ((37, 5), 16), ((3, 7), 4), ((128, 32), 256)])
def test_dequantize_error_is_at_most_half_a_step_per_group(bits: int, shape: tuple[int, int], group_size: int) -> None:
    generator = torch.Generator().manual_seed(bits * shape[0])
    matrix = torch.randn(shape, generator=generator) * torch.logspace(
        -3, 1, shape[1]
    )  # groups of very different ranges
    quantized = quantize(matrix, bits, group_size)
    restored = dequantize(quantized, bits, group_size, shape)
    numel, groups = matrix.numel(), -(-matrix.numel() // group_size)
    padded = torch.cat([matrix.reshape(-1), torch.zeros(groups * group_size - numel)]).view(groups, group_size)
    torch.testing.assert_close(quantized.scales, padded.abs().amax(dim=1) / QMAX[bits])
    per_value_scale = quantized.scales.repeat_interleave(group_size)[:numel].view(shape)
    error = (matrix - restored).abs()
    assert (error <= per_value_scale / 2 * (1 + 1e-6) + 1e-12).all()
    assert error.max() > 0  # a real quantization happened (no fp32 pass-through)


def test_storage_types_and_packing_two_codes_per_byte() -> None:
    matrix = torch.tensor([[-1.0, -0.6, 0.0], [0.4, 1.0, 0.2], [0.8, -0.8, 0.1]])  # 9 values: odd; no ties
    codes8 = quantize(matrix, 8, group_size=9).codes
    assert codes8.dtype == torch.int8 and codes8.tolist() == [-127, -76, 0, 51, 127, 25, 102, -102, 13]
    codes4 = quantize(matrix, 4, group_size=9).codes
    assert codes4.dtype == torch.uint8 and codes4.numel() == 5
    # codes -7, -4, 0, 3, 7, 1, 6, -6, 1 (+8 each), low nibble first, a padding nibble of code 0 (= 8)
    nibbles = [1, 4, 8, 11, 15, 9, 14, 2, 9, 8]
    assert codes4.tolist() == [low | (high << 4) for low, high in zip(nibbles[::2], nibbles[1::2])]


@pytest.mark.parametrize("bits", [8, 4])
def test_zero_and_constant_groups_round_trip_exactly(bits: int) -> None:
    matrix = torch.cat([torch.zeros(8), torch.full((8,), -0.3)]).view(4, 4)
    restored = dequantize(quantize(matrix, bits, 8), bits, 8, (4, 4))
    torch.testing.assert_close(restored, matrix, rtol=1e-6, atol=0)
    values = torch.randn(3, 5)  # groups of one value: each is its group's maximum, code +-qmax
    torch.testing.assert_close(dequantize(quantize(values, bits, 1), bits, 1, (3, 5)), values, rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    "bits, numel, group_size, expected",
    [
        (8, 768, 256, 768 + 3 * 4),
        (4, 768, 256, 384 + 3 * 4),
        (4, 769, 256, 385 + 4 * 4),
        (8, 100, 7, 100 + 15 * 4),
    ],
)
def test_quantized_nbytes_counts_codes_and_fp32_scales(bits: int, numel: int, group_size: int, expected: int) -> None:
    quantized = quantize(torch.randn(numel), bits, group_size)
    actual = sum(t.untyped_storage().nbytes() for t in quantized)
    assert quantized_nbytes(numel, bits, group_size) == expected == actual


def test_invalid_quantization_settings_are_rejected() -> None:
    with pytest.raises(ValueError, match="supports"):
        quantize(torch.randn(4, 4), 2, 4)
    with pytest.raises(ValueError, match="group size"):
        quantize(torch.randn(4, 4), 8, 0)


# --- the projector storing quantized matrices ------------------------------------------------------


def _state_bytes(state: dict) -> int:
    return sum(
        v.untyped_storage().nbytes() for k, v in state.items() if k.startswith("projection") and torch.is_tensor(v)
    )


@pytest.mark.parametrize("bits, expected_bytes", [(32, 96 * 8 * 4), (8, 768 + 3 * 4), (4, 384 + 3 * 4)])
def test_projector_stores_quantized_projection_with_expected_bytes(bits: int, expected_bytes: int) -> None:
    grad = torch.randn(96, 200, generator=torch.Generator().manual_seed(0))
    proj = GaLoreProjector(rank=8, update_proj_gap=10, proj_bits=bits, proj_group_size=256)  # std: left, P is 96 x 8
    state: dict = {}
    low = proj.project(grad, state, 0, RefreshStats())
    assert _state_bytes(state) == expected_bytes
    exact = torch.linalg.svd(grad, full_matrices=False).U
    stored = QuantizedMatrix(state["projection"], state.get("projection_scales"))
    dequantized = exact[:, :8] if bits == 32 else dequantize(stored, bits, 256, (96, 8))
    torch.testing.assert_close(low, dequantized.mT @ grad, rtol=1e-5, atol=1e-5)  # the low-rank R uses the stored P
    relative = (dequantized - exact[:, :8]).norm() / exact[:, :8].norm()
    assert relative < {32: 1e-5, 8: 0.01, 4: 0.15}[bits]


@pytest.mark.parametrize("proj_type", ["right", "full"])
def test_right_and_two_sided_projections_are_quantized_too(proj_type: str) -> None:
    grad = torch.randn(40, 30, generator=torch.Generator().manual_seed(1))
    state: dict = {}
    proj = GaLoreProjector(rank=4, update_proj_gap=10, proj_type=proj_type, proj_bits=4, proj_group_size=32)
    low = proj.project(grad, state, 0, RefreshStats())
    keys = {
        "right": {"projection", "projection_scales"},
        "full": {"projection", "projection_scales", "projection_right", "projection_right_scales"},
    }[proj_type]
    assert {k for k in state if k.startswith("projection") and torch.is_tensor(state[k])} == keys
    assert state["projection"].dtype == torch.uint8
    back = torch.zeros(40, 30)
    proj.project_back_add_(back, low, state, alpha=1.0, beta=0.0)
    u, s, vh = torch.linalg.svd(grad, full_matrices=False)
    best = u[:, :4] @ torch.diag(s[:4]) @ vh[:4]
    assert (back - best).norm() / best.norm() < 0.3  # the rank-4 truncation, up to INT4 error


def _stream_params(shape=(24, 40)) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(2)))


def test_int8_galore_tracks_fp32_galore() -> None:
    grads = [torch.randn(24, 40, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    results = []
    for bits in (32, 8):
        w = _stream_params()
        optimizer = GaLoreAdamW([{"params": [w], "rank": 6, "update_proj_gap": 4, "proj_bits": bits}], lr=1e-2)
        for grad in grads:
            w.grad = grad.clone()
            optimizer.step()
        results.append(w.detach().clone())
    start = _stream_params().detach()
    drift = (results[1] - results[0]).norm() / (results[0] - start).norm()
    assert 0 < drift < 0.05


# --- adaptive (lazy) refresh -----------------------------------------------------------------------

GAP = 4


def _stream(steps: int, fixed: bool, m: int = 32, n: int = 48, r: int = 4) -> list[torch.Tensor]:
    """Gradients whose top-r left singular subspace is fixed (plus small noise) or redrawn at every step."""
    generator = torch.Generator().manual_seed(5)
    basis = torch.linalg.qr(torch.randn(m, r, generator=generator)).Q
    grads = []
    for _ in range(steps):
        if not fixed:
            basis = torch.linalg.qr(torch.randn(m, r, generator=generator)).Q
        signal = basis @ torch.diag(torch.tensor([8.0, 6.0, 4.0, 3.0])) @ torch.randn(r, n, generator=generator)
        grads.append(signal + 0.05 * torch.randn(m, n, generator=generator))
    return grads


def _refresh_steps(grads: list[torch.Tensor], offset: int = 0) -> tuple[list[int], GaLoreAdamW, torch.nn.Parameter]:
    w = torch.nn.Parameter(torch.zeros(grads[0].shape))
    group = {
        "params": [w],
        "rank": 4,
        "update_proj_gap": GAP,
        "proj_type": "left",
        "adaptive_gap": True,
        "cos_threshold": 0.4,
    }
    optimizer = GaLoreAdamW([group], lr=1e-3)
    if offset:
        optimizer.state[w]["refresh_offset"] = offset
    steps = []
    for step, grad in enumerate(grads):
        w.grad = grad
        optimizer.step()
        if optimizer.svd_metrics()["svd_refreshes"]:
            steps.append(step)
    return steps, optimizer, w


def _lazy_schedule(total: int, offset: int = 0) -> list[int]:
    """The documented rule: every STABLE_REFRESHES similar refreshes in a row double the interval (on
    the fixed grid), capped at MAX_GAP_FACTOR x gap."""
    steps, interval, stable, step = [0], GAP, 0, GAP - offset
    while step < total:
        steps.append(step)
        stable += 1
        if stable == STABLE_REFRESHES:
            interval, stable = min(2 * interval, MAX_GAP_FACTOR * GAP), 0
        step += interval
    return steps


def test_fixed_subspace_doubles_the_interval_up_to_the_cap() -> None:
    total = 200
    steps, optimizer, w = _refresh_steps(_stream(total, fixed=True))
    assert steps == _lazy_schedule(total)
    intervals = [b - a for a, b in zip(steps, steps[1:])]
    assert intervals[0] == GAP and max(intervals) == MAX_GAP_FACTOR * GAP  # grew, and stopped at the cap
    grid = len(range(0, total, GAP))
    assert optimizer.state[w]["svd_skipped"] == grid - len(steps)
    assert optimizer.svd_metrics()["svd_skipped_total"] == grid - len(steps) > 0


def test_rotating_subspace_keeps_the_interval() -> None:
    total = 60
    steps, optimizer, w = _refresh_steps(_stream(total, fixed=False))
    assert steps == list(range(0, total, GAP))
    assert optimizer.svd_metrics()["svd_skipped_total"] == 0 and optimizer.state[w]["proj_gap"] == GAP


def test_lazy_refreshes_stay_on_the_staggered_grid() -> None:
    steps, _, _ = _refresh_steps(_stream(100, fixed=True), offset=3)
    assert steps == _lazy_schedule(100, offset=3)
    assert all((step + 3) % GAP == 0 for step in steps[1:])


def test_without_adaptive_gap_no_skip_metric_is_reported() -> None:
    w = torch.nn.Parameter(torch.zeros(8, 6))
    optimizer = GaLoreAdamW([{"params": [w], "rank": 2}], lr=1e-3)
    w.grad = torch.randn(8, 6)
    optimizer.step()
    assert "svd_skipped_total" not in optimizer.svd_metrics()


def test_quantized_lazy_state_round_trip_resumes_bit_identically() -> None:
    grads = _stream(40, fixed=True)

    def build(weights: torch.Tensor) -> tuple[GaLoreAdamW, torch.nn.Parameter]:
        w = torch.nn.Parameter(weights.clone())
        group = {
            "params": [w],
            "rank": 4,
            "update_proj_gap": GAP,
            "adaptive_gap": True,
            "proj_bits": 4,
            "proj_group_size": 16,
        }
        return GaLoreAdamW([group], lr=1e-2), w

    reference, w_ref = build(torch.zeros(32, 48))
    for grad in grads:
        w_ref.grad = grad.clone()
        reference.step()
    optimizer, w = build(torch.zeros(32, 48))
    for grad in grads[:25]:  # the interval has doubled by now
        w.grad = grad.clone()
        optimizer.step()
    assert optimizer.state[w]["proj_gap"] == 2 * GAP
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    resumed, w2 = build(w.detach())
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert (
        resumed.state[w2]["projection"].dtype == torch.uint8
        and resumed.state[w2]["projection_scales"].dtype == torch.float32
    )
    for grad in grads[25:]:
        w2.grad = grad.clone()
        resumed.step()
    assert torch.equal(w2.detach(), w_ref.detach())
    assert resumed.state[w2]["svd_skipped"] == reference.state[w_ref]["svd_skipped"]


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("proj_bits", 16, "proj_bits"),
        ("proj_group_size", 0, "proj_group_size"),
        ("cos_threshold", 1.5, "cos_threshold"),
    ],
)
def test_invalid_projection_settings_are_rejected(key: str, value, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GaLoreAdamW([{"params": [torch.nn.Parameter(torch.zeros(6, 6))], "rank": 2, key: value}])


def test_registry_passes_quantization_and_adaptive_settings() -> None:
    model = build_model(LlamaConfig(**{**TINY_LLAMA, "vocab_size": 512}), seed=0)
    cfg = TrainConfig(
        num_training_steps=10,
        rank=8,
        gap=3,
        optimizer="galore_adamw",
        proj_bits=4,
        proj_group_size=64,
        adaptive_gap=True,
        cos_threshold=0.5,
    )
    group = next(group for group in build_optimizer(model, cfg).param_groups if "rank" in group)
    assert (group["proj_bits"], group["proj_group_size"], group["adaptive_gap"], group["cos_threshold"]) == (
        4,
        64,
        True,
        0.5,
    )
