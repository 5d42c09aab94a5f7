"""Low-rank gradient sync under DDP (optim/lowrank_sync.py): CPU, gloo, 2 processes, against plain DDP GaLore.

Two torchrun launches of tests/test_distributed.py's worker run the Trainers: 10 GaLore-AdamW steps refreshed at
steps 0, 4 and 8 (tiny LLaMA, global batch 8 as in test_distributed.py) with low-rank sync off (plain DDP), on (the
default) and on with layer-wise updates; the low-rank run resumed from its own step-5 checkpoint, and each mode
resumed from the other's; then, in a launch of its own (slow on 2 shared cores), llama_60m at rank 128 for 2 steps
each way, to count its GaLore matrices' gradient bytes. Clipping under low-rank sync is checked in one process
(a 1-process gloo group), where the norm it measures can be recomputed.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY_LLAMA
from test_cli import assert_one_line_error, cli
from test_distributed import GALORE, LOSS_RTOL, losses, rank_dumps, records, run_args, states_equal

from galore_train.config import TrainConfig
from galore_train.distributed import DistEnv
from galore_train.errors import UserError
from galore_train.memory.comm import estimate_comm
from galore_train.model import load_model_config
from galore_train.optim import GaLoreAdamW, traffic
from galore_train.optim.lowrank_sync import LowRankSync
from galore_train.optim.projector import GaLoreProjector, RefreshStats
from galore_train.updates import PlainUpdates, build_lowrank_sync

WORKER = str(Path(__file__).with_name("test_distributed.py"))  # its torchrun worker runs a list of Trainers
STEPS = 10
RESUME_AT = 5
TINY = dict(GALORE, gap=4, num_training_steps=STEPS, save_every=RESUME_AT, eval_every=STEPS)
LLAMA_60M = dict(
    GALORE,
    model=str(ROOT / "configs" / "llama_60m.json"),
    rank=128,
    gap=200,
    num_training_steps=2,
    batch_size=1,
    total_batch_size=2,
    max_length=32,
    eval_every=100,
    save_every=100,
    eval_tokens=200,
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shared_data) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("lowrank_sync")
    config_file = work / "tiny_llama.json"
    config_file.write_text(json.dumps(TINY_LLAMA))
    names = (
        "plain",
        "lowrank",
        "layerwise",
        "lowrank-resumed",
        "plain-from-lowrank",
        "lowrank-from-plain",
        "60m-plain",
        "60m",
    )
    runs = {name: work / name for name in names}
    checkpoint = lambda run: str(runs[run] / "checkpoints" / f"step_{RESUME_AT:08d}")  # noqa: E731
    config = {
        "plain": dict(TINY, lowrank_sync=False),
        "lowrank": TINY,
        "layerwise": dict(TINY, layerwise=True),
        "lowrank-resumed": dict(TINY, resume_from=checkpoint("lowrank")),
        "plain-from-lowrank": dict(TINY, lowrank_sync=False, resume_from=checkpoint("lowrank")),
        "lowrank-from-plain": dict(TINY, resume_from=checkpoint("plain")),
        "60m-plain": dict(LLAMA_60M, lowrank_sync=False),
        "60m": LLAMA_60M,
    }
    dump = lambda name: None if name.startswith("60m") else str(runs[name])  # noqa: E731 (60m: 0.7 GB of state)
    plan = [{"config": run_args(runs[name], str(config_file), **config[name]), "dump": dump(name)} for name in names]
    for part, launch in (("tiny", plan[:-2]), ("60m", plan[-2:])):  # two launches: each within the timeout
        (work / f"{part}.json").write_text(json.dumps(launch))
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]
        launch_args = [*command, WORKER, str(work / f"{part}.json")]
        result = subprocess.run(launch_args, cwd=ROOT, capture_output=True, text=True, timeout=1200)
        assert result.returncode == 0, result.stderr[-4000:]
    return runs


def step_records(run: Path) -> list[dict]:
    return [r for r in records(run) if "loss" in r]


@pytest.mark.slow
@pytest.mark.parametrize("run", ["lowrank", "layerwise"])
def test_lowrank_sync_losses_equal_plain_ddp_galore(runs, run):
    """Every step's loss over 10 steps with refreshes at steps 0, 4 and 8: plain DDP's within 1e-5 relative, after
    a plain backward and with layer-wise updates (each hook averages its matrix's R)."""
    plain, lowrank = losses(runs["plain"]), losses(runs[run])
    assert list(lowrank) == list(range(1, STEPS + 1))
    assert lowrank == pytest.approx(plain, rel=LOSS_RTOL)
    assert [r["svd_refreshes"] for r in step_records(runs[run])] == [14, 0, 0, 0, 14, 0, 0, 0, 14, 0]
    assert states_equal(*(dump["states"] for dump in rank_dumps(runs[run])))  # both ranks: the same state


@pytest.mark.slow
def test_lowrank_sync_counts_fewer_gradient_bytes(runs):
    """Counted from the collectives issued: the GaLore matrices' gradients move r/n of their bytes between
    refreshes (tiny LLaMA rank 8 of 64: 8x; llama_60m rank 128 of 512: 4x), all of them at a refresh; the other
    parameters' gradients (DDP's buckets) are unchanged."""
    projected = lambda run: [r["comm_bytes_projected_matrices"] for r in step_records(run)]  # noqa: E731
    plain = projected(runs["plain"])
    assert plain == [4 * 2 * (4 * 64 * 64 + 3 * 64 * 160)] * STEPS  # fp32, 2 layers of 4 + 3 matrices, every step
    for run in ("lowrank", "layerwise"):
        assert [plain[0] / b for b in projected(runs[run])] == [1, 8, 8, 8, 1, 8, 8, 8, 1, 8], run
    others = lambda run: {r["comm_bytes_other_gradients"] for r in step_records(run)}  # noqa: E731
    assert others(runs["plain"]) == others(runs["lowrank"])
    assert all(r["comm_bytes"] > 0 for r in step_records(runs["lowrank"]))
    full, low = (step_records(runs[name])[1]["comm_bytes_projected_matrices"] for name in ("60m-plain", "60m"))
    assert full / low == 4.0  # every llama_60m matrix: min(m, n) = 512 = 4 x 128
    assert step_records(runs["60m"])[0]["comm_bytes_projected_matrices"] == full  # step 1 refreshes: in full
    # The estimator (`memory --comm`) predicts exactly these counts.
    estimate = estimate_comm(load_model_config("llama_60m"), "galore_adamw", 128, nproc=2, gap=200, dtype="fp32")
    assert (estimate.matrices_full, estimate.matrices_low_rank) == (full, low)
    assert estimate.others == step_records(runs["60m"])[1]["comm_bytes_other_gradients"]


def test_the_7b_estimate_moves_4x_fewer_gradient_bytes_of_the_galore_matrices():
    estimate = estimate_comm(load_model_config("llama_7b"), "galore_adamw", 1024, nproc=8, gap=200)
    assert estimate.matrices_full == 2 * 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)  # bf16
    assert estimate.matrices_full / estimate.matrices_low_rank == 4.0
    assert estimate.matrices_full / estimate.matrices_average > 3.9  # refresh steps in full, 1 in 200
    assert estimate.full / estimate.low_rank_between == pytest.approx(3.58, abs=0.01)  # embeddings stay full
    with pytest.raises(UserError, match="fira_adamw cannot use"):
        estimate_comm(load_model_config("llama_7b"), "fira_adamw", 1024, nproc=8, gap=200)
    shown = cli(
        "memory", "--model", "llama_7b", "--optimizer", "galore_adamw", "--rank", "1024", "--nproc", "8", "--comm"
    )
    assert shown.returncode == 0, shown.stderr
    assert "12.062 GiB │     3.016 GiB │ 4.00x" in shown.stdout  # the GaLore matrices between refreshes
    assert_one_line_error(cli("memory", "--optimizer", "fira_adamw", "--nproc", "2", "--comm"), "fira_adamw cannot use")


@pytest.mark.slow
def test_lowrank_sync_resumes_bit_exactly_and_across_modes(runs):
    straight, resumed = losses(runs["lowrank"]), losses(runs["lowrank-resumed"])
    assert resumed == {s: straight[s] for s in range(RESUME_AT + 1, STEPS + 1)}  # bit-identical
    assert states_equal(rank_dumps(runs["lowrank"])[0]["states"], rank_dumps(runs["lowrank-resumed"])[0]["states"])
    # A checkpoint has one format whatever the mode: each resumes under the other and continues the same run.
    for run in ("plain-from-lowrank", "lowrank-from-plain"):
        assert losses(runs[run]) == pytest.approx({s: straight[s] for s in resumed}, rel=LOSS_RTOL), run


# --- clipping and when it applies (one process) ------------------------------------------------------


@pytest.fixture
def one_process_group(tmp_path):
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


def _model_and_optimizer(seed: int = 0) -> tuple[torch.nn.Module, GaLoreAdamW]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.Linear(24, 8))
    galore, other = [model[0].weight, model[1].weight], [model[0].bias, model[1].bias]
    optimizer = GaLoreAdamW([{"params": other}, {"params": galore, "rank": 4, "update_proj_gap": 2}], lr=1e-2)
    optimizer.share_refresh()
    return model, optimizer


def _backward(model: torch.nn.Module, step: int) -> None:
    inputs = torch.randn(32, 16, generator=torch.Generator().manual_seed(step))
    (model(inputs).square().mean() * 100).backward()  # large enough for clipping at 1.0 to fire


def test_clipping_under_lowrank_sync_measures_the_projected_gradients(one_process_group):
    """Clipping measures what the optimizer consumes: R of every GaLore matrix (with this step's P, also at a
    refresh) and the other parameters' full gradients; it scales them all, so the update is the unclipped
    optimizer's applied to gradients scaled by max_norm / that norm."""
    max_norm = 1.0
    model, optimizer = _model_and_optimizer()
    updates = PlainUpdates(model, model, optimizer, grad_clipping=max_norm, lowrank=LowRankSync(optimizer, 1))
    reference, reference_optimizer = _model_and_optimizer()
    for step in range(3):  # refreshes at steps 0 and 2
        _backward(model, step)
        _backward(reference, step)
        norm = updates.finish()
        # What it should have measured: the reference's (equal) gradients, GaLore's projected with this step's P.
        galore = [model[0].weight, model[1].weight]
        projector = GaLoreProjector.from_group(optimizer.param_groups[1])
        stats = RefreshStats()
        measured = [
            projector.project(q.grad, optimizer.state[p], 0, stats, refreshed=True)
            for p, q in zip(galore, (reference[0].weight, reference[1].weight))
        ] + [reference[0].bias.grad, reference[1].bias.grad]
        expected = math.sqrt(sum(float(t.square().sum()) for t in measured))
        full = math.sqrt(sum(float(p.grad.square().sum()) for p in reference.parameters()))
        assert norm == pytest.approx(expected, rel=1e-6) and max_norm < norm < full
        # The update: plain GaLore (refreshing from the scaled gradient) on gradients scaled by max_norm / norm.
        for p in reference.parameters():
            p.grad.mul_(max_norm / (expected + 1e-6))
        reference_optimizer.step()
        reference_optimizer.zero_grad()
        for a, b in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_lowrank_sync_is_on_where_exact_and_refused_in_one_line_elsewhere():
    two = DistEnv(world_size=2)
    _, galore = _model_and_optimizer_without_group()
    cfg = TrainConfig(optimizer="galore_adamw")
    assert build_lowrank_sync(galore, "galore_adamw", cfg, DistEnv(), sharded=False) is None  # one process
    assert build_lowrank_sync(galore, "fira_adamw", cfg, two, sharded=False) is None  # default: on only where exact
    assert build_lowrank_sync(galore, "galore_adamw", cfg.replace(lowrank_sync=False), two, sharded=False) is None
    for name, changes, sharded, message in [
        ("fira_adamw", {}, False, "fira_adamw .its update reads the full gradient"),
        ("galore_adamw", {}, True, "--distributed fsdp"),
    ]:
        with pytest.raises(UserError, match=f"--lowrank-sync does not apply with {message}"):
            build_lowrank_sync(galore, name, cfg.replace(lowrank_sync=True, **changes), two, sharded=sharded)


def _model_and_optimizer_without_group() -> tuple[torch.nn.Module, GaLoreAdamW]:
    model = torch.nn.Linear(8, 8)
    return model, GaLoreAdamW([{"params": [model.weight], "rank": 2}], lr=1e-2)


def test_traffic_counter_reads_bytes_per_step_and_resets():
    counter = traffic.TrafficCounter()
    assert counter.read(3) == {}  # nothing sent: one process
    counter.add("projected_matrices", torch.zeros(10))
    counter.add("refresh", torch.zeros(3, dtype=torch.int64))
    assert counter.read(5) == {
        "comm_bytes_projected_matrices": 20.0,
        "comm_bytes_other_gradients": 0.0,
        "comm_bytes_refresh": 12.0,
        "comm_bytes_orthogonalized": 0.0,
        "comm_bytes": 32.0,
    }
    assert counter.read(6) == {}


def test_presynced_r_survives_a_step_taken_one_matrix_at_a_time() -> None:
    """INT8 weights and stochastic rounding call step() once for the other parameters, then once per matrix
    (weights/stepping.py): each matrix must still update from its averaged R, not from its own gradient (found by
    tests/test_int8_kill_resume.py: DDP ranks drifted apart and a resume diverged)."""
    from galore_train.weights.stepping import RoundedWeights

    class SteppedAsItIs(RoundedWeights):  # the one-matrix-at-a-time order, without a working copy
        def _open(self, p, optimizer):
            return False

    def setup() -> tuple[GaLoreAdamW, list[torch.nn.Parameter]]:
        generator = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in [(8, 12), (12, 8), (8,)]]
        galore = {"params": params[:2], "rank": 4, "update_proj_gap": 100, "scale": 0.25, "proj_type": "std"}
        optimizer = GaLoreAdamW([galore, {"params": params[2:]}], lr=0.1)
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        optimizer.step()  # the first projections
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        for low_rank in optimizer.project_for_sync().values():
            low_rank.mul_(3.0)  # as if averaged with other processes: no longer this process's own R
        return optimizer, params

    reference, expected = setup()
    reference.step()
    optimizer, params = setup()
    SteppedAsItIs(params[:2], stochastic=False, seed=0).step(optimizer)
    for p, q in zip(params, expected):
        assert torch.equal(p, q)
