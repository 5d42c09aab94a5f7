"""Layer-wise updates (`--layerwise`) under torchrun on CPU (gloo, 2 processes): DDP and FSDP2 against plain DDP.

One launch runs every Trainer (this file is the torchrun worker, see `_worker`): 8 GaLore-AdamW steps with
right-side projections refreshed at steps 0, 3 and 6 and accumulation 2 on each rank (micro-batches of 2,
global batch 8), as plain DDP, layer-wise DDP, layer-wise FSDP2, and the FSDP2 run resumed from its step-4
checkpoint; then layer-wise DDP and FSDP2 with a NaN written into rank 1's gradient (see `_poison_first_update`);
then 8-bit GaLore (scripts/paper_8x24gb_7b.sh's optimizer) as plain DDP and layer-wise FSDP2.
The run setup and helpers are tests/test_distributed.py's (same data, same global batches).
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_LLAMA
from test_distributed import (
    GALORE,
    LOSS_RTOL,
    WEIGHT_ATOL,
    losses,
    optimizer_states,
    projections,
    rank_dumps,
    records,
    run_args,
    states_equal,
    svd_counts,
    torchrun_ok,
    weights,
)

from galore_train import distributed, fsdp
from galore_train.config import TrainConfig
from galore_train.errors import UserError
from galore_train.train import Trainer

STEPS = 8
RESUME_AT = 4
POISONED_STEP = 4  # logged step 4 (0-based 3) refreshes: the NaN must stop its refresh collectives on both ranks
# Refreshes at steps 0, 3, 6 (3 x 14 matrices); micro-batches of 2 with a global batch of 8: accumulation 2.
LAYERWISE = dict(
    GALORE, gap=3, proj_type="right", num_training_steps=STEPS, batch_size=2, save_every=RESUME_AT, eval_every=4
)
EIGHTBIT = dict(eightbit=True, rank=32)  # 8-bit moments: each rank's rows hold whole blocks of 256 values


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shared_data) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("distributed_layerwise")
    config_file = work / "tiny_llama.json"
    config_file.write_text(json.dumps(TINY_LLAMA))
    names = ("plain", "ddp", "fsdp", "fsdp-resumed", "ddp-nan", "fsdp-nan", "plain-8bit", "fsdp-8bit")
    runs = {name: work / name for name in names}
    fsdp_layerwise = dict(LAYERWISE, layerwise=True, distributed="fsdp")
    config = {
        "plain": LAYERWISE,
        "ddp": dict(LAYERWISE, layerwise=True),
        "fsdp": fsdp_layerwise,
        "fsdp-resumed": dict(fsdp_layerwise, resume_from=str(runs["fsdp"] / "checkpoints" / f"step_{RESUME_AT:08d}")),
        "ddp-nan": dict(LAYERWISE, layerwise=True, skip_nonfinite=True),
        "fsdp-nan": dict(fsdp_layerwise, skip_nonfinite=True),
        "plain-8bit": dict(LAYERWISE, **EIGHTBIT),
        "fsdp-8bit": dict(fsdp_layerwise, **EIGHTBIT),
    }
    plan = [
        {
            "config": run_args(runs[name], str(config_file), **config[name]),
            "dump": str(runs[name]),
            "poison": "nan" in name,
        }
        for name in names
    ]
    (work / "plan.json").write_text(json.dumps(plan))
    torchrun_ok(__file__, str(work / "plan.json"))
    return runs


def train_losses(run: Path) -> list[float]:
    return [losses(run)[step] for step in range(1, STEPS + 1)]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_layerwise_equals_plain_ddp_for_every_step(runs, mode):
    """Each of 8 steps (3 refreshes, accumulation 2): the plain DDP GaLore run's loss within 1e-5 relative; the
    projections equal on both ranks, each rank running half of the SVDs (each matrix's on its owner only)."""
    layerwise, plain = train_losses(runs[mode]), train_losses(runs["plain"])
    assert all(b == pytest.approx(a, rel=LOSS_RTOL) for a, b in zip(plain, layerwise)), (plain, layerwise)
    dumps = rank_dumps(runs[mode])
    rank0, rank1 = (dump["projections"] for dump in dumps)
    assert len(rank0) == 14 and all(torch.equal(rank0[name], rank1[name]) for name in rank0)
    if mode == "ddp":  # the whole state is replicated (FSDP2's moments are each rank's rows)
        assert states_equal(dumps[0]["states"], dumps[1]["states"])
    assert svd_counts(runs[mode]) == [21, 21]  # 3 refreshes of 14 matrices: 7 on each rank each time
    a, b = weights(runs[mode], STEPS), weights(runs["plain"], STEPS)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < WEIGHT_ATOL


@pytest.mark.slow
def test_layerwise_fsdp_with_8bit_galore_equals_plain_ddp_for_every_step(runs):
    """The 7B-on-8-GPUs combination (8-bit GaLore, layer-wise, FSDP2), small: every step's loss equals plain DDP's
    8-bit GaLore run within 1e-5 relative, projections equal on both ranks, half of the SVDs on each."""
    layerwise, plain = train_losses(runs["fsdp-8bit"]), train_losses(runs["plain-8bit"])
    assert all(b == pytest.approx(a, rel=LOSS_RTOL) for a, b in zip(plain, layerwise)), (plain, layerwise)
    dumps = rank_dumps(runs["fsdp-8bit"])
    quantized = [
        k for state in dumps[0]["states"].values() for k, v in state.items() if getattr(v, "dtype", None) == torch.uint8
    ]
    assert quantized, "8-bit moments really ran"
    rank0, rank1 = (dump["projections"] for dump in dumps)
    assert len(rank0) == 14 and all(torch.equal(rank0[name], rank1[name]) for name in rank0)
    assert svd_counts(runs["fsdp-8bit"]) == [21, 21]


@pytest.mark.slow
def test_layerwise_fsdp_resumes_bit_exactly(runs):
    """4 steps + resume (re-sharded weights and moments, whole projections) + 4 steps (one refresh) = 8 straight."""
    straight, resumed = runs["fsdp"], runs["fsdp-resumed"]
    assert losses(resumed) == {step: losses(straight)[step] for step in range(RESUME_AT + 1, STEPS + 1)}
    a, b = weights(straight, STEPS), weights(resumed, STEPS)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rank0, rank1 = (dump["projections"] for dump in rank_dumps(resumed))
    assert all(torch.equal(rank0[name], rank1[name]) for name in rank0)


@pytest.mark.slow
def test_layerwise_fsdp_skips_a_nonfinite_gradient_on_every_rank(runs):
    """A NaN in rank 1's shard only: the squared norms are summed over ranks before each update, so rank 0 (whose
    shard is finite) skips the step too, and the run stays equal to layer-wise DDP with the same NaN."""
    for mode in ("ddp-nan", "fsdp-nan"):
        stepped = [r for r in records(runs[mode]) if "loss" in r]
        assert [r["step"] for r in stepped if r.get("skipped")] == [POISONED_STEP], mode
    nan_ddp, nan_fsdp = train_losses(runs["ddp-nan"]), train_losses(runs["fsdp-nan"])
    assert all(b == pytest.approx(a, rel=LOSS_RTOL) for a, b in zip(nan_ddp, nan_fsdp)), (nan_ddp, nan_fsdp)
    assert nan_fsdp[POISONED_STEP:] != pytest.approx(train_losses(runs["fsdp"])[POISONED_STEP:], rel=LOSS_RTOL)
    final = weights(runs["fsdp-nan"], STEPS)
    assert all(bool(torch.isfinite(w).all()) for w in final.values())
    rank0, rank1 = (dump["projections"] for dump in rank_dumps(runs["fsdp-nan"]))
    assert all(torch.equal(rank0[name], rank1[name]) for name in rank0)


def test_fsdp_refuses_layerwise_where_fsdp2_runs_no_sharded_gradient_hooks(monkeypatch):
    cfg = TrainConfig(optimizer="galore_adamw", proj_type="right", layerwise=True, distributed="fsdp")
    assert fsdp.runs_sharded_gradient_hooks()  # the installed torch (>= 2.5)
    fsdp.check_fsdp_supported(cfg)
    # A version check that no supported torch fails, whatever its build suffix; the source text played no part.
    for version in ("2.6.0", "2.6.0a0+git1a2b3c", "2.7.1+cu126", "2.13.0.dev20260101+cu130", "2.5.0"):
        assert fsdp.runs_sharded_gradient_hooks(version), version
    assert not fsdp.runs_sharded_gradient_hooks("2.4.1+cu121")
    monkeypatch.setattr(fsdp, "runs_sharded_gradient_hooks", lambda: False)  # e.g. a torch before 2.5
    with pytest.raises(UserError, match=r"--layerwise under --distributed fsdp needs .* use --distributed ddp$"):
        fsdp.check_fsdp_supported(cfg)


# --- torchrun worker ---------------------------------------------------------------------------------


def _poison_first_update(trainer: Trainer, rank: int) -> None:
    """On rank 1 at POISONED_STEP, a NaN in the first gradient the hooks update with (after accumulation): no
    parameter may change in that step, on either rank (DDP's averaging spreads the NaN; FSDP's shards do not)."""
    update, poisoned = trainer.updates._update, []

    def first_update_nan(param: torch.Tensor) -> None:
        if rank == 1 and trainer.step + 1 == POISONED_STEP and not poisoned:
            grad = param.grad
            (grad.to_local() if hasattr(grad, "to_local") else grad).fill_(math.nan)
            poisoned.append(param)
        update(param)

    trainer.updates._update = first_update_nan


def _worker(plan_file: str) -> None:
    """Run each planned Trainer in this torchrun process and dump each rank's projections and optimizer state."""
    real_teardown = distributed.teardown
    distributed.teardown = lambda: None  # one process group for every run (see test_distributed._worker)
    rank = int(os.environ["RANK"])
    for run in json.loads(Path(plan_file).read_text()):
        trainer = Trainer(TrainConfig(**run["config"]))
        if run["poison"]:
            _poison_first_update(trainer, rank)
        trainer.run()
        dump = {"projections": projections(trainer), "states": optimizer_states(trainer)}
        torch.save(dump, Path(run["dump"]) / f"rank{rank}.pt")
    real_teardown()


if __name__ == "__main__":
    _worker(sys.argv[1])
