"""SWAN and SinkGD: their updates against float64 re-derivations of the papers' equations, no state on the
hidden matrices (AdamW elsewhere, as torch.optim.AdamW), bit-exact resume, bad groups refused. Layer-wise
equality and state bytes = estimate: tests/test_layerwise.py and tests/test_memory.py (every registry name)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TINY_LLAMA
from transformers import LlamaConfig

from galore_train.config import TrainConfig
from galore_train.model import build_model
from galore_train.optim.sinkgd import SINKHORN_STEPS, SinkGDAdamW
from galore_train.optim.swan import NS_STEPS, SwanAdamW, swan_direction
from galore_train.optimizers import build_optimizer

LR, WD = 0.01, 0.1
SMALL_LLAMA = LlamaConfig(**{**TINY_LLAMA, "vocab_size": 256})


def swan_reference(g: torch.Tensor) -> torch.Tensor:
    """float64: rows standardized, then the polar factor (G G^T)^(-1/2) G = G (G^T G)^(-1/2) by an
    eigendecomposition of the smaller Gram matrix (the exact inverse square root the Newton-Schulz iterations
    approach), rescaled to the standardized gradient's Frobenius norm."""
    g = g.double()
    centered = g - g.mean(dim=1, keepdim=True)
    normalized = centered / centered.pow(2).mean(dim=1, keepdim=True).sqrt()
    wide = normalized.shape[0] <= normalized.shape[1]
    values, vectors = torch.linalg.eigh(normalized @ normalized.T if wide else normalized.T @ normalized)
    kept = values > values.max() * 1e-10  # row standardization makes a tall G~ rank-deficient (G~ 1 = 0)
    inverse_sqrt = vectors @ torch.diag(torch.where(kept, values, 1).rsqrt() * kept) @ vectors.T
    whitened = inverse_sqrt @ normalized if wide else normalized @ inverse_sqrt
    return whitened * normalized.norm() / whitened.norm()


def sinkgd_reference(g: torch.Tensor, passes: int = SINKHORN_STEPS) -> torch.Tensor:
    """float64: `passes` times, rows to norm sqrt(n), then columns to norm sqrt(m)."""
    x = g.double()
    m, n = x.shape
    for _ in range(passes):
        x = x / x.norm(dim=1, keepdim=True) * math.sqrt(n)
        x = x / x.norm(dim=0, keepdim=True) * math.sqrt(m)
    return x


def _well_conditioned(shape, seed):
    """A gradient whose standardized rows are far from rank-deficient (Newton-Schulz converges in NS_STEPS)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator) * (1 + torch.rand(shape[0], 1, generator=generator))


@pytest.mark.parametrize("shape", [(12, 40), (40, 12)])
@pytest.mark.parametrize("optimizer_cls, reference", [(SwanAdamW, swan_reference), (SinkGDAdamW, sinkgd_reference)])
def test_update_matches_the_float64_rederivation(optimizer_cls, reference, shape):
    weight = torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(9)))
    optimizer = optimizer_cls([{"params": [weight], "stateless": True}], lr=LR, weight_decay=WD)
    expected = weight.detach().double().clone()
    for step in range(3):
        grad = _well_conditioned(shape, step)
        weight.grad = grad.clone()
        optimizer.step()
        expected = (1 - LR * WD) * expected - LR * reference(grad)
    torch.testing.assert_close(weight.detach().double(), expected, rtol=0, atol=1e-5)
    assert not optimizer.state[weight]  # stateless


def test_swan_whitening_has_converged_at_the_default_steps():
    g = _well_conditioned((12, 40), 0)

    torch.testing.assert_close(swan_direction(g, NS_STEPS).double(), swan_reference(g), rtol=0, atol=1e-5)
    assert not torch.allclose(swan_direction(g, 2).double(), swan_reference(g), atol=1e-3)  # the check can fail


@pytest.mark.parametrize("name", ["swan", "sinkgd"])
def test_matrices_are_stateless_and_the_rest_is_torch_adamw(name):
    cfg = TrainConfig(optimizer=name, lr=LR, weight_decay=WD, num_training_steps=4)
    model = build_model(SMALL_LLAMA, seed=0)
    optimizer = build_optimizer(model, cfg)
    plain, matrices = optimizer.param_groups
    assert matrices["stateless"] and all(p.dim() == 2 for p in matrices["params"])
    assert "model.embed_tokens.weight" in plain["param_names"] and "lm_head.weight" in plain["param_names"]
    reference_model = build_model(SMALL_LLAMA, seed=0)
    names = set(plain["param_names"])
    others = [p for n, p in reference_model.named_parameters() if n in names]
    adamw = torch.optim.AdamW(others, lr=LR, betas=(0.9, 0.999), eps=cfg.eps, weight_decay=WD)
    _train(model, optimizer, range(3))
    _train(reference_model, adamw, range(3), only=names)
    for (n, p), q in zip(model.named_parameters(), reference_model.parameters()):
        if n in names:
            torch.testing.assert_close(p, q, rtol=0, atol=1e-6)  # to rounding (fused vs per-parameter ops)
    assert all(not optimizer.state[p] for p in matrices["params"])


def _train(model, optimizer, steps, only=None):
    for step in steps:
        generator = torch.Generator().manual_seed(step)
        for n, p in model.named_parameters():
            grad = torch.randn(p.shape, generator=generator) * 0.01 * (1 + step)
            p.grad = grad.to(p.dtype) if only is None or n in only else None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_a_stateless_group_takes_only_matrices():
    with pytest.raises(ValueError, match="normalizes 2-D gradients"):
        SwanAdamW([{"params": [torch.nn.Parameter(torch.zeros(4))], "stateless": True}])
