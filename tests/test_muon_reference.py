"""MuonAdamW against torch's own optimizers: torch.optim.Muon (Moonlight's adjust_lr_fn "match_rms_adamw",
momentum 0.95, as optim/muon.py documents) on the hidden matrices and torch.optim.AdamW elsewhere, bit for bit,
through a warm-up + cosine schedule and a state_dict round trip in the middle of the run."""

from __future__ import annotations

import pytest
import torch

from galore_train.optim.muon import MuonAdamW

LR, BETAS, EPS, WD, STEPS, SAVE_AT = 0.02, (0.9, 0.95), 1e-8, 0.1, 12, 5
pytestmark = pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")


def _params() -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """(hidden matrices, the rest: an embedding-like matrix and a norm's vector), the same numbers every call."""
    generator = torch.Generator().manual_seed(0)
    matrices = [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in [(16, 24), (24, 16)]]
    others = [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in [(32, 16), (16,)]]
    return matrices, others


def _schedule(step: int) -> float:
    return min(1.0, (step + 1) / 3) * (0.55 + 0.45 * torch.cos(torch.tensor(step / STEPS * torch.pi)).item())


def _gradients(params: list[torch.nn.Parameter], step: int) -> None:
    generator = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator)


def _ours(matrices, others, state=None) -> tuple[MuonAdamW, torch.optim.lr_scheduler.LambdaLR]:
    optimizer = MuonAdamW(
        [{"params": others}, {"params": matrices, "muon": True}], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule)
    if state is not None:
        optimizer.load_state_dict(state[0])
        scheduler.load_state_dict(state[1])
    return optimizer, scheduler


def test_muon_adamw_is_torch_muon_plus_adamw_bit_for_bit():
    matrices, others = _params()
    optimizer, scheduler = _ours(matrices, others)
    ref_matrices, ref_others = _params()
    muon = torch.optim.Muon(ref_matrices, lr=LR, weight_decay=WD, momentum=0.95, adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW(ref_others, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    references = [torch.optim.lr_scheduler.LambdaLR(inner, _schedule) for inner in (muon, adamw)]
    for step in range(STEPS):
        if step == SAVE_AT:  # a resume: a fresh optimizer and schedule from the saved state dicts
            saved = (optimizer.state_dict(), scheduler.state_dict())
            optimizer, scheduler = _ours(matrices, others, state=saved)
        _gradients(matrices + others, step)
        _gradients(ref_matrices + ref_others, step)
        optimizer.step()
        muon.step()
        adamw.step()
        scheduler.step()
        for reference in references:
            reference.step()
        for ours, theirs in zip(matrices + others, ref_matrices + ref_others):
            assert torch.equal(ours, theirs), f"step {step}: {tuple(ours.shape)} differs"
    assert not torch.equal(matrices[0], _params()[0][0])  # they moved
