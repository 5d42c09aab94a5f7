"""Fira, APOLLO and APOLLO-Mini under FSDP2 (`--distributed fsdp`, right-side projections on row shards) on CPU,
gloo, 2 processes.

As in test_fsdp_galore.py, each FSDP run is compared with the plain 2-process DDP run of the same settings (same
global batches): the same losses up to fp32 summation order, for 8 steps with refreshes at steps 0, 3 and 6 (Fira:
a shared SVD; APOLLO: a new random projection). Their norms over rows (the limiters' whole-matrix norms, APOLLO-Mini's
tensor-wise scale) are all-reduced sums of squares (row_shards.sum_over_rows). The straight runs share one torchrun
launch; a second one (for the resume test only) resumes their step-4 checkpoints in FSDP and across modes.
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
    states_equal,
    weights,
    work,  # noqa: F401 (fixture)
)
from test_fsdp_galore import MATRICES, STEPS, plain_and_row_sharded, replicated, step_four
from torch.distributed.tensor import DTensor
from transformers import LlamaConfig

from galore_train.memory.estimate import estimate_memory
from galore_train.optim import ApolloAdamW, FiraAdamW

RIGHT = dict(rank=8, gap=3, proj_type="right")  # refreshes at steps 0, 3, 6
METHODS = {
    "fira": dict(RIGHT, optimizer="fira_adamw"),
    "apollo": dict(RIGHT, optimizer="apollo_adamw"),
    "apollo_mini": dict(RIGHT, optimizer="apollo_mini", rank=1),
}
RESUMES = {  # run -> (mode, the run whose step-4 checkpoint it resumes)
    "fsdp-resumed": ("fsdp", "fsdp"),
    "ddp-from-fsdp": ("ddp", "fsdp"),
    "fsdp-from-ddp": ("fsdp", "ddp"),
}


def output(folder: Path, run: str, name: str) -> Path:
    return folder / f"fira-apollo-{run}-{name}"


def launch(folder: Path, config: str, runs: dict[tuple[str, str], dict]) -> None:
    """One 2-process launch of these (run, method) -> extra settings, 8 steps each, checkpoints at 4 and 8."""
    run_workers(
        folder,
        [
            {
                "config": run_args(
                    output(folder, run, name),
                    config,
                    num_training_steps=STEPS,
                    save_every=4,
                    eval_every=4,
                    **METHODS[name],
                    **settings,
                ),
                "dump": str(output(folder, run, name)),
            }
            for (run, name), settings in runs.items()
        ],
    )


@pytest.fixture(scope="module")
def runs(work: Path, config_file: str, shared_data) -> dict[str, Path]:  # noqa: F811
    """One launch: each method under DDP and under FSDP."""
    launch(work, config_file, {(mode, name): {"distributed": mode} for name in METHODS for mode in ("ddp", "fsdp")})
    return {f"{mode}-{name}": output(work, mode, name) for name in METHODS for mode in ("ddp", "fsdp")}


@pytest.fixture(scope="module")
def resumed(runs: dict[str, Path], work: Path, config_file: str) -> dict[str, Path]:  # noqa: F811
    """A second launch (each stays well inside torchrun's time limit on this machine): each method resumed from
    its step-4 checkpoint in FSDP (from FSDP) and across modes (FSDP -> DDP, DDP -> FSDP)."""
    plan = {
        (run, name): {"distributed": mode, "resume_from": step_four(runs[f"{source}-{name}"])}
        for name in METHODS
        for run, (mode, source) in RESUMES.items()
    }
    launch(work, config_file, plan)
    return {**runs, **{f"{run}-{name}": output(work, run, name) for run, name in plan}}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(METHODS))
def test_fsdp_equals_ddp(runs, name):
    """Every step's loss (8 steps, 3 refreshes) equals the 2-process DDP run's within 1e-5 relative, and the weights
    after them agree; what every rank keeps whole (Fira's projections, the limiters' norms) is the same on both."""
    fsdp, ddp = runs[f"fsdp-{name}"], runs[f"ddp-{name}"]
    assert list(losses(fsdp)) == list(range(1, STEPS + 1))
    assert losses(fsdp) == pytest.approx(losses(ddp), rel=LOSS_RTOL)
    a, b = weights(fsdp, STEPS), weights(ddp, STEPS)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < WEIGHT_ATOL
    assert states_equal(*(replicated(dump["states"]) for dump in rank_dumps(fsdp)))


def whole_bytes(states: dict[str, dict]) -> int:
    """Bytes of the state tensors every rank holds whole (not DTensor shards)."""
    tensors = [v for s in replicated(states).values() for v in s.values() if isinstance(v, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(METHODS))
def test_fsdp_rank_holds_half_the_optimizer_state(runs, name):
    """The meter's optimizer-state bytes on each FSDP rank: what it keeps whole (Fira's projections, the limiters'
    float32 norms) plus half of the rest of what a DDP rank holds (a 1-process run's state: the same tensors)."""
    ddp_dumps, fsdp_dumps = rank_dumps(runs[f"ddp-{name}"]), rank_dumps(runs[f"fsdp-{name}"])
    whole, ddp_states = ddp_dumps[0]["state_bytes"], ddp_dumps[0]["states"]
    assert ddp_dumps[1]["state_bytes"] == whole
    for dump in fsdp_dumps:
        kept_whole = whole_bytes(dump["states"])
        assert kept_whole < whole / 20
        assert dump["state_bytes"] == pytest.approx(kept_whole + (whole - kept_whole) / 2, rel=1e-3)
        moments = {  # the projected matrices' (most bytes above are the embeddings' and lm_head's AdamW moments)
            (param, key): value
            for param, state in dump["states"].items()
            for key, value in state.items()
            if key.startswith("exp_avg") and "norm_growth_prev" in state
        }
        assert len(moments) == 2 * MATRICES
        for (param, key), value in moments.items():
            assert isinstance(value, DTensor) and 2 * value.to_local().numel() == ddp_states[param][key].numel()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(METHODS))
def test_per_gpu_estimate_is_the_measured_state(runs, name):
    """`galore-train memory --nproc 2 --distributed fsdp`: states + projections per GPU = the meter's bytes on each
    rank, up to the limiters' float32 norms (kept whole on every rank; the estimate halves them: 14 x 2 bytes)."""
    settings = METHODS[name]
    estimate = estimate_memory(
        LlamaConfig(**TINY_LLAMA),
        settings["optimizer"],
        settings["rank"],
        dtype="fp32",
        proj_type="right",
        nproc=2,
        distributed="fsdp",
    )
    for dump in rank_dumps(runs[f"fsdp-{name}"]):
        assert estimate.optimizer_states + estimate.projections == dump["state_bytes"] - MATRICES * 4 // 2


@pytest.mark.slow
@pytest.mark.parametrize("name", list(METHODS))
def test_resumes_bit_exactly_under_fsdp_and_across_modes(resumed, name):
    """4 steps + resume + 4 steps equals 8 straight steps bit for bit under FSDP; a checkpoint written under one
    mode resumes under the other (the same format), giving that mode's straight run within fp32 summation order."""
    again, straight = resumed[f"fsdp-resumed-{name}"], resumed[f"fsdp-{name}"]
    assert losses(again) == {s: losses(straight)[s] for s in range(5, STEPS + 1)}
    a, b = weights(again, STEPS), weights(straight, STEPS)
    assert all(torch.equal(a[k], b[k]) for k in a)
    for crossed, mode in (("ddp-from-fsdp", "ddp"), ("fsdp-from-ddp", "fsdp")):
        expected = {s: losses(resumed[f"{mode}-{name}"])[s] for s in range(5, STEPS + 1)}
        assert losses(resumed[f"{crossed}-{name}"]) == pytest.approx(expected, rel=LOSS_RTOL)


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: FiraAdamW(
            [{"params": ps[:1], "rank": 8, "update_proj_gap": 2, "proj_type": "right"}, {"params": ps[1:]}]
        ),
        lambda ps: ApolloAdamW(
            [{"params": ps[:1], "rank": 8, "update_proj_gap": 2, "proj_type": "right"}, {"params": ps[1:]}]
        ),
        lambda ps: ApolloAdamW(
            [{"params": ps[:1], "rank": 1, "update_proj_gap": 2, "proj_type": "right", "scale_type": "tensor"}]
            + [{"params": ps[1:]}]
        ),
        lambda ps: ApolloAdamW(
            [
                {"params": ps[:1], "rank": 8, "update_proj_gap": 2, "proj_type": "right", "proj": "svd"},
                {"params": ps[1:]},
            ]
        ),
    ],
    ids=["fira", "apollo", "apollo_mini", "apollo_svd"],
)
@pytest.mark.usefixtures("one_process_group")
def test_row_shard_path_is_the_plain_update(make):
    """In-process, on a 1-rank mesh: DTensor row shards take the FSDP path (local rows, the gradient's rows from
    RowShard, norms through sum_over_rows, moments wrapped as DTensors) and give the plain optimizer's weights and
    state over 4 steps with 2 refreshes."""
    params, optimizers = plain_and_row_sharded([(160, 64), (64,)], make)
    local = lambda t: t.to_local() if isinstance(t, DTensor) else t  # noqa: E731
    for plain, sharded in zip(params["plain"], params["sharded"]):
        torch.testing.assert_close(local(sharded.detach()), plain, rtol=1e-6, atol=1e-7)
        a, b = optimizers["plain"].state[plain], optimizers["sharded"].state[sharded]
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], torch.Tensor):
                torch.testing.assert_close(local(b[key]), a[key], rtol=1e-6, atol=1e-7)
            else:
                assert b[key] == a[key]
