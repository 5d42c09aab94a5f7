"""Muon and 8-bit Muon under DDP and FSDP2 (CPU, gloo, 2 processes): owner-computed Newton-Schulz.

Two torchrun launches (test_distributed's worker; two, so that each stays well inside its 300 s limit on a busy
CPU): the first runs every mode for 6 steps (checkpoints at 3 and 6): DDP with shared orthogonalisation, DDP with
every rank orthogonalising every matrix itself (the behaviour before sharing: the reference it must equal bit for
bit), FSDP2, both with --layerwise, 8-bit momentum under DDP and FSDP2; the second resumes from step 3 in each mode
and across modes. Global batches as in test_distributed.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY_LLAMA
from test_distributed import (
    LOSS_RTOL,
    WEIGHT_ATOL,
    config_file,  # noqa: F401 (fixture)
    losses,
    one_process_group,  # noqa: F401 (fixture)
    rank_dumps,
    run_args,
    run_workers,
    weights,
    work,  # noqa: F401 (fixture)
)
from transformers import LlamaConfig

from galore_train.memory.estimate import estimate_memory
from galore_train.optim.muon import MuonAdamW
from galore_train.optim.orthogonalize import Orthogonalize, buckets

STEPS, SAVE_AT = 6, 3
MATRICES = 14  # 2 layers x (q, k, v, o, gate, up, down)
ADAMW_PARAMS = 7  # the embeddings, lm_head, 2 x 2 layer norms and the final norm
MUON = dict(optimizer="muon", lr=1e-2, grad_clipping=0.0)  # no clipping: the layer-wise runs are compared too
MODES = {
    "ddp": dict(MUON, distributed="ddp"),
    "ddp-replicated": dict(MUON, distributed="ddp"),  # every rank runs every Newton-Schulz (worker flag below)
    "fsdp": dict(MUON, distributed="fsdp"),
    "ddp-layerwise": dict(MUON, distributed="ddp", layerwise=True),
    "fsdp-layerwise": dict(MUON, distributed="fsdp", layerwise=True),
    "ddp-8bit": dict(MUON, distributed="ddp", eightbit=True),
    "fsdp-8bit": dict(MUON, distributed="fsdp", eightbit=True),
}
RESUMES = {  # run -> the run whose step-3 checkpoint it resumes, in the mode of the first
    "ddp-resumed": "ddp",
    "fsdp-resumed": "fsdp",
    "ddp-8bit-resumed": "ddp-8bit",
    "fsdp-8bit-resumed": "fsdp-8bit",
    "fsdp-8bit-from-ddp": "ddp-8bit",
    "ddp-from-fsdp": "fsdp",
}


def _settings(name: str) -> dict:
    return MODES[name.removesuffix("-resumed").removesuffix("-from-ddp").removesuffix("-from-fsdp")] | (
        {"distributed": "ddp"} if name.startswith("ddp") else {"distributed": "fsdp"}
    )


def _args(folder: Path, config: str, name: str, **more) -> dict:
    return run_args(
        folder / f"muon-{name}",
        config,
        num_training_steps=STEPS,
        save_every=SAVE_AT,
        eval_every=STEPS,
        **_settings(name),
        **more,
    )


@pytest.fixture(scope="module")
def straight(work: Path, config_file: str, shared_data) -> dict[str, Path]:  # noqa: F811
    """One launch: every mode, 6 steps."""
    plan = [
        {
            "config": _args(work, config_file, name),
            "dump": str(work / f"muon-{name}"),
            "replicated_refresh": name == "ddp-replicated",
        }
        for name in MODES
    ]
    run_workers(work, plan)
    return {name: work / f"muon-{name}" for name in MODES}


@pytest.fixture(scope="module")
def runs(work: Path, config_file: str, straight: dict[str, Path]) -> dict[str, Path]:  # noqa: F811
    """A second launch: the resumes from step 3."""
    checkpoint = lambda source: str(straight[source] / "checkpoints" / f"step_{SAVE_AT:08d}")  # noqa: E731
    plan = [
        {"config": _args(work, config_file, name, resume_from=checkpoint(source)), "dump": str(work / f"muon-{name}")}
        for name, source in RESUMES.items()
    ]
    run_workers(work, plan)
    return {**straight, **{name: work / f"muon-{name}" for name in RESUMES}}


def calls(output: Path) -> list[int]:
    return [dump["newton_schulz_calls"] for dump in rank_dumps(output)]


@pytest.mark.slow
def test_each_newton_schulz_runs_once_on_its_owner(straight):
    """Shared orthogonalisation equals every rank orthogonalising every matrix, bit for bit, with half the
    Newton-Schulz runs on each rank: matrices / processes per rank and step, under DDP and FSDP2, plain and
    layer-wise."""
    runs = straight
    assert list(losses(runs["ddp"])) == list(range(1, STEPS + 1))
    assert losses(runs["ddp"]) == losses(runs["ddp-replicated"])
    a, b = weights(runs["ddp"], STEPS), weights(runs["ddp-replicated"], STEPS)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert calls(runs["ddp-replicated"]) == [MATRICES * STEPS] * 2
    for name in ("ddp", "fsdp", "ddp-layerwise", "fsdp-layerwise", "ddp-8bit", "fsdp-8bit"):
        assert calls(runs[name]) == [MATRICES // 2 * STEPS] * 2, name


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fsdp", "fsdp-layerwise", "fsdp-8bit", "ddp-layerwise"])
def test_fsdp_and_layerwise_equal_ddp(straight, name):
    """Every step's loss equals the 2-process DDP run's within 1e-5 relative (fp32 summation order)."""
    runs = straight
    reference = runs["ddp-8bit" if "8bit" in name else "ddp"]
    assert list(losses(runs[name])) == list(range(1, STEPS + 1))
    assert losses(runs[name]) == pytest.approx(losses(reference), rel=LOSS_RTOL)
    a, b = weights(runs[name], STEPS), weights(reference, STEPS)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < WEIGHT_ATOL


@pytest.mark.slow
@pytest.mark.parametrize("name", ["", "-8bit"])
def test_fsdp_rank_holds_half_the_optimizer_state_which_the_estimate_gives(straight, name):
    """The meter's optimizer-state bytes on each FSDP rank are half a DDP rank's (= one process's) and
    `galore-train memory --nproc 2 --distributed fsdp`'s, but for AdamW's step counters (4 bytes each, whole on each
    rank); a DDP rank's equal the 1-process estimate."""
    ddp, fsdp = rank_dumps(straight[f"ddp{name}"]), rank_dumps(straight[f"fsdp{name}"])
    whole = ddp[0]["state_bytes"]
    assert ddp[1]["state_bytes"] == whole
    options = dict(dtype="fp32", eightbit=bool(name))
    config = LlamaConfig(**TINY_LLAMA)
    assert estimate_memory(config, "muon", 0, **options).optimizer_states == whole
    per_gpu = estimate_memory(config, "muon", 0, nproc=2, distributed="fsdp", **options).optimizer_states
    steps = ADAMW_PARAMS * 4  # AdamW's float32 step counters: whole on each rank (the estimate divides them too)
    for dump in fsdp:
        assert dump["state_bytes"] == (whole - steps) // 2 + steps
        assert dump["state_bytes"] == per_gpu + steps // 2


@pytest.mark.slow
def test_resume_is_bit_exact_in_each_mode_and_crosses_modes(runs):
    """3 steps + resume + 3 steps equals 6 straight steps bit for bit under DDP and FSDP2, 32- and 8-bit; a
    checkpoint written in one mode resumes in the other, giving that mode's straight run within summation order."""
    for resumed, straight in (("ddp-resumed", "ddp"), ("fsdp-resumed", "fsdp"), ("ddp-8bit-resumed", "ddp-8bit")):
        assert losses(runs[resumed]) == {s: losses(runs[straight])[s] for s in range(SAVE_AT + 1, STEPS + 1)}, resumed
        a, b = weights(runs[resumed], STEPS), weights(runs[straight], STEPS)
        assert all(torch.equal(a[k], b[k]) for k in a), resumed
    for resumed, straight in (
        ("fsdp-8bit-resumed", "fsdp-8bit"),
        ("fsdp-8bit-from-ddp", "fsdp-8bit"),
        ("ddp-from-fsdp", "ddp"),
    ):
        expected = {s: losses(runs[straight])[s] for s in range(SAVE_AT + 1, STEPS + 1)}
        assert losses(runs[resumed]) == pytest.approx(expected, rel=LOSS_RTOL), resumed


def test_buckets_keep_order_and_hold_at_most_the_limit():
    items = [Orthogonalize(torch.empty(rows, 4), torch.empty(rows, 4), {}) for rows in (2, 2, 4, 1, 8)]
    cut = buckets(items, limit=8 * 4 * 2)  # 8 rows of bfloat16 results
    assert [[item.param.shape[0] for item in bucket] for bucket in cut] == [[2, 2, 4], [1], [8]]
    assert [item for bucket in buckets(items, limit=1) for item in bucket] == items  # one each when too large


@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.usefixtures("one_process_group")
def test_row_shard_path_is_the_plain_update(bits):
    """In-process, on a 1-rank mesh: DTensor row shards take the FSDP path (momentum on the local rows, the
    matrix gathered to its owner, the result scattered back) and give the plain optimizer's weights and state."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (1,))
    generator = torch.Generator().manual_seed(0)
    shapes = [(160, 64), (64, 160), (32, 16), (64,)]  # Muon matrices (8-bit, 8-bit, below the threshold), AdamW
    start = [torch.randn(shape, generator=generator) for shape in shapes]
    gradients = [[torch.randn(shape, generator=generator) for shape in shapes] for _ in range(3)]
    params = {
        "plain": [torch.nn.Parameter(p.clone()) for p in start],
        "sharded": [torch.nn.Parameter(distribute_tensor(p.clone(), mesh, [Shard(0)])) for p in start],
    }
    optimizers = {
        mode: MuonAdamW([{"params": ps[:3], "muon": True, "momentum_bits": bits}, {"params": ps[3:]}], lr=1e-2)
        for mode, ps in params.items()
    }
    for step_gradients in gradients:
        for mode, optimizer in optimizers.items():
            for p, g in zip(params[mode], step_gradients):
                p.grad = distribute_tensor(g.clone(), mesh, [Shard(0)]) if mode == "sharded" else g.clone()
            optimizer.step()
    local = lambda t: t.to_local() if isinstance(t, DTensor) else t  # noqa: E731
    for plain, sharded in zip(params["plain"], params["sharded"]):
        assert torch.equal(local(sharded.detach()), plain.detach())
        s, p = optimizers["sharded"].state[sharded], optimizers["plain"].state[plain]
        assert s.keys() == p.keys() and all(torch.equal(local(s[k]), p[k]) for k in p)
    assert optimizers["sharded"].newton_schulz_calls == optimizers["plain"].newton_schulz_calls == 3 * 3
