"""8-bit Muon momentum (optim/muon_momentum.py): block-wise codes that follow the full-precision momentum."""

from __future__ import annotations

import pytest
import torch

from galore_train.optim.galore_adamw8bit import _quantization_maps
from galore_train.optim.muon import MuonAdamW
from galore_train.optim.muon_momentum import ABSMAX, BUFFER, import_bitsandbytes


def _run(bits: int, steps: int = 10) -> tuple[torch.nn.Parameter, MuonAdamW]:
    generator = torch.Generator().manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(96, 128, generator=generator))
    optimizer = MuonAdamW([{"params": [weight], "muon": True, "momentum_bits": bits}], lr=1e-2)
    for _ in range(steps):
        weight.grad = torch.randn(weight.shape, generator=generator)
        optimizer.step()
    return weight, optimizer


def test_8bit_momentum_follows_the_full_precision_momentum():
    """After 10 steps the dequantized 8-bit momentum is as close to the fp32 one as requantizing every step allows
    (relative Frobenius norm), and the weights moved the same way (orthogonalisation of nearly the same matrices:
    cosine 0.99987 measured)."""
    full_weight, full = _run(32)
    weight, eightbit = _run(8)
    state = eightbit.state[weight]
    assert state[BUFFER].dtype == torch.uint8 and state[ABSMAX].dtype == torch.float32
    assert state[ABSMAX].numel() == 96 * 128 // 256
    functional, signed_map = import_bitsandbytes().functional, _quantization_maps(weight.device)[0]
    momentum = functional.dequantize_blockwise(state[BUFFER], absmax=state[ABSMAX], code=signed_map, blocksize=256)
    reference = full.state[full_weight][BUFFER]
    codes, quantized = functional.quantize_blockwise(reference, code=signed_map, blocksize=256)
    once = functional.dequantize_blockwise(codes, absmax=quantized.absmax, code=signed_map, blocksize=256)
    error = lambda m: ((m - reference).norm() / reference.norm()).item()  # noqa: E731
    # each step's requantization error decays by mu = 0.95 per step: independent ones add up to at most
    # sqrt(1 / (1 - mu^2)) = 3.2 times one quantization's (measured: 2.36% after 10 steps, 1.07% once)
    assert error(momentum) < 3.2 * error(once)
    start = _run(32, steps=0)[0]
    moved, moved_8bit = full_weight - start, weight - start
    assert torch.nn.functional.cosine_similarity(moved.flatten(), moved_8bit.flatten(), dim=0) > 0.999


def test_momentum_bits_must_be_8_or_32():
    with pytest.raises(ValueError, match="momentum_bits must be 8 or 32"):
        MuonAdamW([{"params": [torch.nn.Parameter(torch.zeros(64, 64))], "muon": True, "momentum_bits": 4}])
