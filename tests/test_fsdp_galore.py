"""The GaLore family under FSDP2 (`--distributed fsdp`, right-side projections on row shards) on CPU, gloo, 2 processes.

Each FSDP run is compared with the plain 2-process DDP run of the same settings (same global batches, see
test_distributed.py's docstring): the same losses up to fp32 summation order, for 8 steps with refreshes at
steps 0, 3 and 6. One torchrun launch (test_distributed's worker) runs them all, in plan order: checkpoints
written by earlier runs are resumed by later ones, in the same mode and in the other one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

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
    records,
    run_args,
    run_workers,
    states_equal,
    weights,
    work,  # noqa: F401 (fixture)
)
from torch.distributed.tensor import DTensor
from transformers import LlamaConfig

from galore_train.memory.estimate import estimate_memory
from galore_train.optim import GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit, NaturalGaLoreAdamW, projector
from galore_train.optim.galore_adamw8bit import _check_blocks_follow_rows
from galore_train.optim.natural_galore import _check_history_follows_rows

STEPS = 8
MATRICES = 14  # 2 layers x (q, k, v, o, gate, up, down)
RIGHT = dict(optimizer="galore_adamw", rank=8, gap=3, proj_type="right")  # refreshes at steps 0, 3, 6
# Rank 32: gate and up (160 x 64) keep 160 x 32 = 5120 >= 4096 values, so 8-bit moments (each rank's 80 rows x 32
# = 10 blocks of 256); the other matrices' 64 x 32 stay below bitsandbytes' threshold (unquantized moments), and
# the embeddings and lm_head (32000 x 64) get full-rank 8-bit moments.
EIGHTBIT = dict(RIGHT, rank=32, eightbit=True)
FAMILY = {
    "right": RIGHT,
    "8bit": EIGHTBIT,
    "adafactor": dict(RIGHT, optimizer="galore_adafactor"),
    "natural": dict(RIGHT, optimizer="natural_galore_adamw", fisher_history=3),
    # 4-bit projections, randomized SVD, lazy refresh: every step until the interval doubles after 3 (threshold 0)
    "8bit-4bit-lazy": dict(
        EIGHTBIT, gap=1, proj_bits=4, proj_group_size=16, adaptive_gap=True, cos_threshold=0.0, svd="randomized"
    ),
}
MEASURED = ["right", "8bit", "adafactor", "natural"]


def step_four(output: Path) -> str:
    return str(output / "checkpoints" / "step_00000004")


@pytest.fixture(scope="module")
def runs(work: Path, config_file: str, shared_data) -> dict[str, Path]:  # noqa: F811
    """One launch: each family member under DDP and under FSDP (8 steps, checkpoints at 4 and 8); then 8-bit
    GaLore resumed from step 4 in its own mode (DDP, FSDP) and in the other one (FSDP -> DDP, DDP -> FSDP)."""
    out = {f"{mode}-{name}": work / f"family-{mode}-{name}" for name in FAMILY for mode in ("ddp", "fsdp")}
    resumes = {  # run -> (mode, the run whose step-4 checkpoint it resumes)
        "fsdp-8bit-resumed": ("fsdp", "fsdp-8bit"),
        "ddp-8bit-resumed": ("ddp", "ddp-8bit"),
        "ddp-from-fsdp": ("ddp", "fsdp-8bit"),
        "fsdp-from-ddp": ("fsdp", "ddp-8bit"),
    }
    out.update({name: work / f"family-{name}" for name in resumes})
    args = lambda name, mode, **more: run_args(  # noqa: E731
        out[name], config_file, num_training_steps=STEPS, save_every=4, eval_every=4, distributed=mode, **more
    )
    # DDP here is the full all-reduce, the reference FSDP is compared with: with low-rank sync (the DDP default,
    # tests/test_lowrank_sync.py) the sum order differs, and 8-bit moments can turn that rounding into a different
    # quantization code (measured: 1.06e-4 relative at step 7 of "8bit-4bit-lazy").
    full = {"ddp": {"lowrank_sync": False}, "fsdp": {}}
    plan = [
        {"config": args(f"{mode}-{name}", mode, **settings, **full[mode]), "dump": str(out[f"{mode}-{name}"])}
        for name, settings in FAMILY.items()
        for mode in ("ddp", "fsdp")
    ]
    plan += [
        {
            "config": args(name, mode, **EIGHTBIT, **full[mode], resume_from=step_four(out[source])),
            "dump": str(out[name]),
        }
        for name, (mode, source) in resumes.items()
    ]
    run_workers(work, plan)
    return out


def replicated(states: dict[str, dict]) -> dict[str, dict]:
    """What every rank holds whole of each parameter's state (not its DTensor shards)."""
    return {name: {k: v for k, v in s.items() if not isinstance(v, DTensor)} for name, s in states.items()}


def refreshes_per_rank(output: Path) -> list[list[int]]:
    """The SVDs each rank ran, at each step that refreshed."""
    return [r["svd_refreshes_per_rank"] for r in records(output) if "loss" in r and r["svd_refreshes"]]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILY))
def test_fsdp_equals_ddp_with_projections_equal_on_both_ranks(runs, name):
    """Every step's loss (8 steps, 3 refreshes) equals the 2-process DDP run's within 1e-5 relative; the projections
    are identical on both ranks (each SVD computed once, on its owner, and broadcast); each rank ran
    matrices / processes SVDs per refresh."""
    fsdp, ddp = runs[f"fsdp-{name}"], runs[f"ddp-{name}"]
    assert list(losses(fsdp)) == list(range(1, STEPS + 1))
    assert losses(fsdp) == pytest.approx(losses(ddp), rel=LOSS_RTOL)
    a, b = weights(fsdp, STEPS), weights(ddp, STEPS)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < WEIGHT_ATOL
    dumps = rank_dumps(fsdp)
    rank0, rank1 = (dump["projections"] for dump in dumps)
    assert len(rank0) == MATRICES and all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert states_equal(*(replicated(dump["states"]) for dump in dumps))  # codes, scales, intervals, Gram, ...
    refreshed = refreshes_per_rank(fsdp)
    assert refreshed == [[MATRICES // 2] * 2] * len(refreshes_per_rank(ddp))  # 7 SVDs on each rank per refresh
    assert len(refreshed) == (6 if name == "8bit-4bit-lazy" else 3)  # lazy: 0-3, then 5, 7 (interval 2); 0, 3, 6


@pytest.mark.slow
@pytest.mark.parametrize("name", ["right", "8bit"])
def test_fsdp_rank_holds_half_the_optimizer_state(runs, name):
    """The meter's optimizer-state bytes on each FSDP rank: the projections (kept whole) plus half of the rest
    of what a DDP rank holds, which is exactly a 1-process run's state (the same tensors)."""
    ddp_dumps, fsdp_dumps = rank_dumps(runs[f"ddp-{name}"]), rank_dumps(runs[f"fsdp-{name}"])
    whole = ddp_dumps[0]["state_bytes"]
    projections = sum(p.numel() * p.element_size() for p in ddp_dumps[0]["projections"].values())
    assert ddp_dumps[1]["state_bytes"] == whole and projections < whole / 20
    for dump in fsdp_dumps:
        assert dump["state_bytes"] == pytest.approx(projections + (whole - projections) / 2, rel=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("name", MEASURED)
def test_per_gpu_estimate_is_the_measured_state(runs, name):
    """`galore-train memory --nproc 2 --distributed fsdp`: states + projections per GPU = the meter's bytes on each
    rank (exactly for the Adam variants; Adafactor's column statistics and Natural GaLore's Gram matrices are
    replicated, a few hundred bytes the estimate divides by 2)."""
    settings = {**FAMILY[name]}
    optimizer, rank = settings.pop("optimizer"), settings.pop("rank")
    options = {key: settings[key] for key in ("eightbit", "fisher_history") if key in settings}
    estimate = estimate_memory(
        LlamaConfig(**TINY_LLAMA),
        optimizer,
        rank,
        dtype="fp32",
        proj_type="right",
        nproc=2,
        distributed="fsdp",
        **options,
    )
    for dump in rank_dumps(runs[f"fsdp-{name}"]):
        exact = name in ("right", "8bit")
        expected = pytest.approx(dump["state_bytes"], abs=0 if exact else 1000)
        assert estimate.optimizer_states + estimate.projections == expected


def saved_optimizer(output: Path, step: int = STEPS) -> dict:
    saved = torch.load(output / "checkpoints" / f"step_{step:08d}" / "trainer_state.pt", weights_only=True)
    return saved["optimizer"]["state"]


@pytest.mark.slow
def test_8bit_resumes_bit_exactly_in_each_mode_and_across_modes(runs):
    """4 steps + resume + 4 steps equals 8 straight steps bit for bit under DDP and under FSDP; a checkpoint
    written under one mode resumes under the other (the same format: gathered 8-bit codes and absmax blocks,
    whole projections), giving that mode's straight run within fp32 summation order."""
    for resumed, straight in (("fsdp-8bit-resumed", "fsdp-8bit"), ("ddp-8bit-resumed", "ddp-8bit")):
        assert losses(runs[resumed]) == {s: losses(runs[straight])[s] for s in range(5, STEPS + 1)}
        a, b = weights(runs[resumed], STEPS), weights(runs[straight], STEPS)
        assert all(torch.equal(a[k], b[k]) for k in a)
    for crossed, straight in (("ddp-from-fsdp", "ddp-8bit"), ("fsdp-from-ddp", "fsdp-8bit")):
        expected = {s: losses(runs[straight])[s] for s in range(5, STEPS + 1)}
        assert losses(runs[crossed]) == pytest.approx(expected, rel=LOSS_RTOL)
    assert refreshes_per_rank(runs["fsdp-8bit-resumed"]) == [[MATRICES // 2] * 2]  # step 6 only
    rank0, rank1 = (dump["states"] for dump in rank_dumps(runs["fsdp-8bit-resumed"]))
    assert states_equal(
        *({n: {k: v for k, v in s.items() if k.startswith("projection")} for n, s in r.items()} for r in (rank0, rank1))
    )
    ddp, fsdp = saved_optimizer(runs["ddp-8bit"]), saved_optimizer(runs["fsdp-8bit"])
    layout = lambda state: {  # noqa: E731
        i: {k: (v.shape, v.dtype) if isinstance(v, torch.Tensor) else type(v) for k, v in s.items()}
        for i, s in state.items()
    }
    assert layout(ddp) == layout(fsdp)
    codes = [s["exp_avg"] for s in fsdp.values() if s["exp_avg"].dtype == torch.uint8]
    assert [tuple(c.shape) for c in codes].count((160, 32)) == 4  # gate and up of 2 layers, all rows gathered


def test_8bit_blocks_must_not_straddle_two_ranks():
    _check_blocks_follow_rows("up", (160, 32), 2)  # 80 x 32 = 10 blocks per rank
    _check_blocks_follow_rows("embed", (32000, 64), 8)
    with pytest.raises(ValueError, match="whole blocks of 256 values"):
        _check_blocks_follow_rows("up", (160, 24), 2)  # 80 x 24 = 7.5 blocks
    with pytest.raises(ValueError, match="whole blocks of 256 values"):
        _check_blocks_follow_rows("gate", (5461, 64), 2)  # rank 1's rows start at value 2731 x 64, inside a block


def test_natural_galore_history_must_shard_like_the_rows():
    _check_history_follows_rows("up", (160, 8), 2)
    with pytest.raises(ValueError, match="rows must divide evenly"):
        _check_history_follows_rows("up", (5, 2), 2)  # 3 + 2 rows: 6 + 4 values, torch.chunk splits 5 + 5


def plain_and_row_sharded(
    shapes: list[tuple[int, ...]], make: Callable[[list[torch.Tensor]], torch.optim.Optimizer], steps: int = 4
) -> tuple[dict[str, list[torch.Tensor]], dict[str, torch.optim.Optimizer]]:
    """The same start and gradients (seed 0) as plain tensors and as row shards on a 1-rank mesh, each set stepped
    `steps` times by its own optimizer `make(params)` (refreshes shared): ({mode: params}, {mode: optimizer})."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (1,))
    generator = torch.Generator().manual_seed(0)
    start = [torch.randn(shape, generator=generator) for shape in shapes]
    gradients = [[torch.randn(shape, generator=generator) for shape in shapes] for _ in range(steps)]
    params = {
        "plain": [p.clone() for p in start],
        "sharded": [torch.nn.Parameter(distribute_tensor(p.clone(), mesh, [Shard(0)])) for p in start],
    }
    optimizers = {mode: make(ps) for mode, ps in params.items()}
    for optimizer in optimizers.values():
        optimizer.share_refresh()
    for step_gradients in gradients:
        for mode, optimizer in optimizers.items():
            for p, g in zip(params[mode], step_gradients):
                p.grad = distribute_tensor(g.clone(), mesh, [Shard(0)]) if mode == "sharded" else g.clone()
            optimizer.step()
    return params, optimizers


@pytest.mark.parametrize("optimizer_class", [GaLoreAdamW, GaLoreAdamW8bit, GaLoreAdafactor, NaturalGaLoreAdamW])
@pytest.mark.usefixtures("one_process_group")
def test_row_shard_path_is_the_plain_update_with_svd_fallbacks(monkeypatch, optimizer_class):
    """In-process, on a 1-rank mesh: DTensor row shards take the FSDP path (local rows, RowShard sums, state
    wrapped as DTensors, refresh gathered to the owner) and give the plain optimizer's weights and state while
    every SVD fails (first refresh: the randomized fallback; later ones keep the projection)."""

    def failing_svd(*args, **kwargs):
        raise torch.linalg.LinAlgError("injected")

    monkeypatch.setattr(projector, "svd_top", failing_svd)
    shapes = [(160, 64), (128, 64), (64,)]  # a GaLore matrix (8-bit: 160 x 32), an 8-bit and an fp32 full-rank one

    def make(ps: list[torch.Tensor]) -> torch.optim.Optimizer:
        galore = {"params": ps[:1], "rank": 32, "update_proj_gap": 2, "proj_type": "right"}
        return optimizer_class([galore, {"params": ps[1:]}], lr=1e-2)

    with pytest.warns(RuntimeWarning, match="injected"):
        params, optimizers = plain_and_row_sharded(shapes, make)
    local = lambda t: t.to_local() if isinstance(t, DTensor) else t  # noqa: E731
    for plain, sharded in zip(params["plain"], params["sharded"]):
        torch.testing.assert_close(local(sharded.detach()), plain, rtol=1e-6, atol=1e-7)
        a, b = optimizers["plain"].state[plain], optimizers["sharded"].state[sharded]
        assert a.keys() == b.keys()
        for key in a:
            value = b[key]
            if isinstance(value, torch.Tensor):
                sharded_state = value.dim() > 0 and not key.startswith("projection")
                assert isinstance(value, DTensor) == (
                    sharded_state and optimizer_class.STATE_SHARDING.get(key, 0) is not None
                )
                torch.testing.assert_close(local(value), a[key], rtol=1e-6, atol=1e-7)
            else:
                assert value == a[key]
    assert optimizers["sharded"].refresh_stats.failures == optimizers["plain"].refresh_stats.failures == 2
