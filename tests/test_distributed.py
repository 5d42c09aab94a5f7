"""Multi-process training under torchrun on CPU (gloo): 2 processes against 1, for DDP and FSDP2.

Same global batch in both runs. `split_dataset_by_node` gives each rank a disjoint part of the stream:
whole files when their count divides the world size, otherwise every world_size-th document. The
runs here read ONE C4 shard with --shuffle-buffer 0, so rank r reads documents r, r+2, r+4, ... in
file order. With a global batch of 8 sequences, the 1-process run (micro-batches of 4, accumulation 2)
trains step k on documents 8k..8k+7, and each of the 2 processes (micro-batch 4, no accumulation)
on its half of exactly those documents. Sequences are padded one by one and the loss is a sum over
tokens scaled by the global token count, so the two runs compute the same loss and gradient up to
fp32 summation order (matmul blocking differs between a batch of 8 and two of 4): losses are compared
with a tolerance, while runs with equal process counts (resume, ranks against each other) must be
bit-identical.

torchrun launches cost ~10-20 s each on this 2-core machine, so the launches are module fixtures
shared by the tests. The CLI launch goes through `torchrun -m galore_train pretrain`; the others run
this file as a torchrun worker (see `_worker` at the bottom), which runs several Trainers in one
launch and dumps what only the process itself can see: its GaLore projections and how often it wrote
a checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import ROOT, SHARED_DATA, TINY_LLAMA, tiny_run_args
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from galore_train import distributed, fsdp
from galore_train.config import TrainConfig
from galore_train.errors import UserError
from galore_train.optim import ApolloAdamW, GaLoreAdamW, refresh_sharing
from galore_train.optim.refresh_sharing import refresh_owners
from galore_train.plan import plan_steps
from galore_train.train import Trainer

ONE_SHARD = str(SHARED_DATA / "c4" / "train" / "c4-train.00000-of-01024.docs0000-0849.json.gz")
STEPS = 4
LOSS_RTOL = 1e-5  # 1 vs 2 processes: fp32 summation order only (measured: ~5e-8)
WEIGHT_ATOL = 2e-4  # Adam moves each weight by ~lr per step (3e-3); measured differences ~2e-5


def run_args(output_dir: Path, config_file: str, **overrides) -> dict:
    """Tiny LLaMA on one C4 shard, global batch 8 whatever the process count (see the module docstring)."""
    values = dict(
        data_files=ONE_SHARD,
        shuffle_buffer=0,
        batch_size=4,
        total_batch_size=8,
        num_training_steps=STEPS,
        eval_every=2,
        save_every=2,
        keep_last=10,
        eval_batch_size=4,  # 9 validation batches: an odd count, which FSDP's lockstep evaluation pads
    )
    return tiny_run_args(config_file, output_dir, **{**values, **overrides})


def cli_flags(values: dict) -> list[str]:
    """TrainConfig values -> `galore-train pretrain` flags."""
    flags = []
    for field in dataclasses.fields(TrainConfig):
        value = values.get(field.name)
        flag = field.metadata.get("flag") or "--" + field.name.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            flags.append(flag)
        elif isinstance(value, list):
            for item in value:
                flags += [flag, str(item)]
        else:
            flags += [flag, str(value)]
    return flags


def torchrun(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """A 2-process launch; its children inherit GALORE_TRAIN_DEVICE=cpu (conftest): gloo on the CPU, GPU or not."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", *args]
    try:
        return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    except subprocess.TimeoutExpired as timeout:  # say where the launch stopped, not just that it did
        stderr = timeout.stderr or ""
        stderr = stderr.decode(errors="replace") if isinstance(stderr, bytes) else stderr
        pytest.fail(f"torchrun did not finish in {timeout.timeout} s; its stderr ended with:\n{stderr[-4000:]}")


def torchrun_ok(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    result = torchrun(*args, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def run_workers(tmp: Path, runs: list[dict]) -> None:
    """Run `runs` ({"config": TrainConfig values, "dump": folder}) in one 2-process launch of `_worker`."""
    plan = tmp / "worker_plan.json"
    plan.write_text(json.dumps(runs))
    torchrun_ok(__file__, str(plan))


def records(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def losses(output_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(output_dir) if "loss" in r}


def evals(output_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in records(output_dir) if "val_loss" in r}


def weights(output_dir: Path, step: int = STEPS) -> dict[str, torch.Tensor]:
    return load_file(str(output_dir / "checkpoints" / f"step_{step:08d}" / "model.safetensors"))


def rank_dumps(folder: Path) -> list[dict]:
    return [torch.load(folder / f"rank{rank}.pt", weights_only=True) for rank in range(2)]


# --- the runs (module fixtures: each torchrun launch happens once) ----------------------------------


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("distributed")


@pytest.fixture(scope="module")
def config_file(work: Path) -> str:
    path = work / "tiny_llama.json"
    path.write_text(json.dumps(TINY_LLAMA))
    return str(path)


GALORE = dict(optimizer="galore_adamw", rank=8, gap=2)  # projections refreshed at steps 0 and 2


@pytest.fixture(scope="module")
def one_process(work: Path, config_file: str, shared_data) -> dict[str, Path]:
    """The 1-process references, run in this process."""
    runs = {"adamw": work / "one-adamw", "galore": work / "one-galore"}
    Trainer(TrainConfig(**run_args(runs["adamw"], config_file))).run()
    trainer = Trainer(TrainConfig(**run_args(runs["galore"], config_file, **GALORE)))
    trainer.run()
    torch.save(projections(trainer), runs["galore"] / "projections.pt")
    return runs


@pytest.fixture(scope="module")
def ddp_cli(work: Path, config_file: str, shared_data) -> Path:
    """`torchrun --nproc_per_node 2 -m galore_train pretrain`, DDP (the default), AdamW."""
    output = work / "ddp-adamw"
    torchrun_ok("-m", "galore_train", "pretrain", *cli_flags(run_args(output, config_file)))
    return output


ONE_FAKE_GPU = """import torch
torch.cuda.is_available = lambda: True  # what a one-GPU machine reports (this one has no CUDA to call)
torch.cuda.device_count = lambda: 1
"""


def one_fake_gpu_environment(folder: Path) -> dict[str, str]:
    """The test suite's environment for a child process whose torch reports one CUDA device (a sitecustomize)."""
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(ONE_FAKE_GPU)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def ddp_checkpointing_on_a_gpu_machine(work: Path, config_file: str, ddp_cli: Path) -> tuple[Path, str]:
    """The DDP CLI run again, with activation checkpointing, by children that see one CUDA device: on a GPU
    machine the suite's 2-process launches must still choose the CPU and gloo (and not cuda:1, which is not there)."""
    output = work / "ddp-adamw-checkpointing"
    values = run_args(output, config_file, activation_checkpointing=True)
    env = one_fake_gpu_environment(work / "one-fake-gpu")
    result = torchrun_ok("-m", "galore_train", "pretrain", *cli_flags(values), env=env)
    return output, result.stdout + result.stderr


@pytest.fixture(scope="module")
def ddp_workers(work: Path, config_file: str, ddp_cli: Path) -> dict[str, Path]:
    """One launch: resume the CLI run from its step-2 checkpoint; a DDP GaLore run dumping each rank's state
    (shared refresh, as the trainer sets it up), the same run with every rank computing every SVD itself
    (the behaviour before shared refresh), and a two-sided 4-bit lazy-refresh run (refreshes at steps 0-3, whose
    interval doubles after the third). Layer-wise runs: tests/test_distributed_layerwise.py."""
    runs = {
        "resumed": work / "ddp-adamw-resumed",
        "galore": work / "ddp-galore",
        "replicated": work / "ddp-galore-replicated",
        "quantized": work / "ddp-galore-4bit-lazy",
        "right": work / "ddp-galore-right",
    }
    resume_from = str(ddp_cli / "checkpoints" / "step_00000002")
    quantized = dict(
        GALORE, gap=1, proj_type="full", proj_bits=4, proj_group_size=16, adaptive_gap=True, cos_threshold=0.0
    )
    run_workers(
        work,
        [
            {"config": run_args(runs["resumed"], config_file, resume_from=resume_from), "dump": None},
            {"config": run_args(runs["galore"], config_file, **GALORE), "dump": str(runs["galore"])},
            {
                "config": run_args(runs["replicated"], config_file, **GALORE),
                "dump": str(runs["replicated"]),
                "replicated_refresh": True,
            },
            {"config": run_args(runs["quantized"], config_file, **quantized), "dump": str(runs["quantized"])},
            {"config": run_args(runs["right"], config_file, **GALORE, proj_type="right"), "dump": None},
        ],
    )
    return runs


@pytest.fixture(scope="module")
def fsdp_workers(work: Path, config_file: str, shared_data) -> dict[str, Path]:
    """One launch: an FSDP2 AdamW run, then its resume from the step-2 checkpoint; the same for GaLore-AdamW
    (right-side projections, refreshed at steps 0 and 2); the AdamW run with activation checkpointing."""
    runs = {
        "straight": work / "fsdp-adamw",
        "resumed": work / "fsdp-adamw-resumed",
        "galore": work / "fsdp-galore",
        "galore-resumed": work / "fsdp-galore-resumed",
        "checkpointing": work / "fsdp-adamw-checkpointing",
    }
    galore = dict(GALORE, proj_type="right", distributed="fsdp")
    checkpoint = lambda run: str(runs[run] / "checkpoints" / "step_00000002")  # noqa: E731
    run_workers(
        work,
        [
            {"config": run_args(runs["straight"], config_file, distributed="fsdp"), "dump": str(runs["straight"])},
            {
                "config": run_args(
                    runs["resumed"], config_file, distributed="fsdp", resume_from=checkpoint("straight")
                ),
                "dump": None,
            },
            {"config": run_args(runs["galore"], config_file, **galore), "dump": str(runs["galore"])},
            {
                "config": run_args(runs["galore-resumed"], config_file, **galore, resume_from=checkpoint("galore")),
                "dump": str(runs["galore-resumed"]),
            },
            {
                "config": run_args(
                    runs["checkpointing"], config_file, distributed="fsdp", activation_checkpointing=True
                ),
                "dump": None,
            },
        ],
    )
    return runs


def optimizer_states(trainer: Trainer) -> dict[str, dict]:
    """The optimizer's whole per-parameter state (moments, projections, refresh bookkeeping), by parameter name."""
    state = trainer.optimizer.state
    return {name: dict(state[p]) for name, p in trainer.model.named_parameters() if p in state}


def states_equal(a: dict[str, dict], b: dict[str, dict]) -> bool:
    same = lambda x, y: torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y  # noqa: E731
    return a.keys() == b.keys() and all(
        a[n].keys() == b[n].keys() and all(same(a[n][k], b[n][k]) for k in a[n]) for n in a
    )


def svd_counts(output_dir: Path) -> list[int]:
    """The SVDs each rank ran over the whole run (sum of the logged per-rank counts)."""
    return [sum(column) for column in zip(*(r["svd_refreshes_per_rank"] for r in records(output_dir) if "loss" in r))]


def projections(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Every GaLore projection matrix of the trainer's optimizer, by parameter name."""
    state = trainer.optimizer.state
    return {
        name: state[p]["projection"] for name, p in trainer.model.named_parameters() if "projection" in state.get(p, {})
    }


# --- DDP ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ddp_matches_one_process_on_the_same_global_batches(one_process, ddp_cli):
    one, two = one_process["adamw"], ddp_cli
    assert list(losses(two)) == list(range(1, STEPS + 1))
    assert losses(two) == pytest.approx(losses(one), rel=LOSS_RTOL)
    tokens = lambda run: [r["tokens_seen"] for r in records(run) if "loss" in r]  # noqa: E731
    assert tokens(two) == tokens(one)  # the same documents, step by step
    a, b = weights(one), weights(two)
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < WEIGHT_ATOL


@pytest.mark.slow
def test_ddp_with_activation_checkpointing_on_a_gpu_machine_runs_on_gloo_and_trains_the_same(
    ddp_cli, ddp_checkpointing_on_a_gpu_machine
):
    output, printed = ddp_checkpointing_on_a_gpu_machine
    assert ", cpu;" in " ".join(printed.split())  # the start line names the device (the children saw a GPU)
    # Recomputing the forward in backward changes no number: the same losses and weights, bit for bit.
    assert losses(output) == losses(ddp_cli)
    a, b = weights(output), weights(ddp_cli)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_processes_on_a_one_gpu_machine_stop_with_one_line(work, config_file, shared_data):
    """Without GALORE_TRAIN_DEVICE=cpu the children take the GPU they see, and two of them cannot share one."""
    env = one_fake_gpu_environment(work / "one-fake-gpu")
    del env[distributed.DEVICE_ENV]
    result = torchrun("-m", "galore_train", "pretrain", *cli_flags(run_args(work / "two-on-one", config_file)), env=env)
    assert result.returncode != 0
    line = "error: torchrun started 2 processes on this machine but it has 1 GPU(s): pass --nproc_per_node 1 (or fewer)"
    assert result.stderr.count(line) == 2, result.stderr[-3000:]  # each process says it once, in one line
    assert "CUDA" not in result.stderr  # no CUDA call was made


@pytest.mark.slow
def test_eval_on_two_processes_equals_one_process(one_process, ddp_cli):
    one, two = evals(one_process["adamw"]), evals(ddp_cli)
    assert list(two) == [0, 2, 4]
    # Step 0: identical weights (same seed); 9 validation batches, so rank 0 scores 5 and rank 1 scores 4.
    assert two[0]["val_tokens"] == one[0]["val_tokens"] > 0
    assert two[0]["val_loss"] == pytest.approx(one[0]["val_loss"], rel=1e-6)
    assert all(two[s]["val_loss"] == pytest.approx(one[s]["val_loss"], rel=LOSS_RTOL) for s in two)


@pytest.mark.slow
def test_only_rank_zero_logs_and_writes_checkpoints(ddp_cli, ddp_workers):
    logged = records(ddp_cli)
    assert [r["step"] for r in logged if "loss" in r] == [1, 2, 3, 4]  # one line per step: rank 1 logged nothing
    last = [r for r in logged if "loss" in r][-1]
    assert len(last["peak_memory_gb_per_rank"]) == 2
    assert last["peak_memory_gb"] == max(last["peak_memory_gb_per_rank"]) > 0
    assert last["tokens_per_second_per_device"] == pytest.approx(last["tokens_per_second"] / 2)
    root = ddp_cli / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == [
        "latest",
        "step_00000002",
        "step_00000004",
    ]  # no stray temp folders
    data_states = json.loads((root / "step_00000004" / "data_state.json").read_text())
    assert len(data_states) == 2 and data_states[0] != data_states[1]  # each rank's own stream position
    saves = [dump["saves"] for dump in rank_dumps(ddp_workers["galore"])]
    assert saves == [2, 0]  # steps 2 and 4, by rank 0 alone


@pytest.mark.slow
def test_ddp_resume_on_two_processes_is_bit_exact(ddp_cli, ddp_workers):
    """Straight 4 steps vs 2 steps + resume (from the same run's step-2 checkpoint) + 2 steps."""
    straight, resumed = losses(ddp_cli), losses(ddp_workers["resumed"])
    assert list(resumed) == [3, 4]
    assert resumed == {s: straight[s] for s in (3, 4)}  # bit-identical
    a, b = weights(ddp_cli), weights(ddp_workers["resumed"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert evals(ddp_workers["resumed"])[4]["val_loss"] == evals(ddp_cli)[4]["val_loss"]


@pytest.mark.slow
def test_ddp_galore_projections_identical_on_both_ranks(one_process, ddp_workers):
    """Each matrix's owner computes its refreshes and broadcasts them: the projections (and the whole optimizer
    state) agree bit for bit on both ranks, and each rank ran half of the SVDs."""
    rank0, rank1 = (dump["projections"] for dump in rank_dumps(ddp_workers["galore"]))
    assert len(rank0) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[name], rank1[name]) for name in rank0)
    assert states_equal(*(dump["states"] for dump in rank_dumps(ddp_workers["galore"])))
    assert svd_counts(ddp_workers["galore"]) == [14, 14]  # 14 matrices refreshed at steps 0 and 2: 7 + 7 each time
    assert [r["svd_refreshes"] for r in records(ddp_workers["galore"]) if "loss" in r] == [14, 0, 14, 0]  # as 1 process
    # And they span the 1-process run's subspaces (up to fp32 noise in the gradient).
    single = torch.load(one_process["galore"] / "projections.pt", weights_only=True)
    for name, p in rank0.items():
        q = single[name]
        left = p if p.shape[0] > p.shape[1] else p.mT  # orthonormal columns
        other = q if q.shape[0] > q.shape[1] else q.mT
        assert (left.mT @ other).square().sum() / left.shape[1] > 0.99, name
    assert losses(ddp_workers["galore"]) == pytest.approx(losses(one_process["galore"]), rel=LOSS_RTOL)


@pytest.mark.slow
def test_shared_refresh_equals_every_rank_computing_every_svd(ddp_workers):
    """Shared refresh changes who computes, not what: the run equals the replicated one bit for bit here
    (identical CPUs and LAPACK), with each rank running half the SVDs instead of all of them."""
    shared, replicated = ddp_workers["galore"], ddp_workers["replicated"]
    assert losses(shared) == losses(replicated)
    assert states_equal(rank_dumps(shared)[0]["states"], rank_dumps(replicated)[0]["states"])
    assert svd_counts(replicated) == [28, 28]
    a, b = weights(shared), weights(replicated)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_shared_refresh_keeps_4bit_lazy_projections_identical_on_both_ranks(ddp_workers):
    """Two-sided 4-bit codes and scales, and the lazy-refresh bookkeeping, come out the same on both ranks."""
    rank0, rank1 = (dump["states"] for dump in rank_dumps(ddp_workers["quantized"]))
    assert states_equal(rank0, rank1)
    galore = [state for state in rank0.values() if "projection" in state]
    assert len(galore) == 14 and all(state["projection"].dtype == torch.uint8 for state in galore)
    assert all("projection_right_scales" in state for state in galore)
    assert {state["proj_gap"] for state in galore} == {2}  # doubled after three similar refreshes (threshold 0)
    assert svd_counts(ddp_workers["quantized"]) == [28, 28]  # 4 refreshes of 14 matrices, half on each rank


# --- FSDP2 -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_fsdp_matches_one_process_and_resumes_bit_exactly(one_process, fsdp_workers):
    straight, resumed = fsdp_workers["straight"], fsdp_workers["resumed"]
    assert losses(straight) == pytest.approx(losses(one_process["adamw"]), rel=LOSS_RTOL)
    # 9 validation batches of 4 sequences: FSDP pads rank 1's share with a blank batch (5 forwards each).
    assert evals(straight)[0]["val_tokens"] == evals(one_process["adamw"])[0]["val_tokens"]
    assert evals(straight)[0]["val_loss"] == pytest.approx(evals(one_process["adamw"])[0]["val_loss"], rel=1e-6)
    assert [dump["blank_eval_batches"] for dump in rank_dumps(straight)] == [1, 1]
    # The checkpoint holds full, plain weights: loadable without FSDP, close to the 1-process run.
    model = AutoModelForCausalLM.from_pretrained(str(straight / "checkpoints" / "step_00000004"))
    full, single = model.state_dict(), weights(one_process["adamw"])
    assert max((full[k] - single[k]).abs().max().item() for k in single) < WEIGHT_ATOL
    # Resume re-shards weights and optimizer state: bit-exact continuation.
    assert losses(resumed) == {s: losses(straight)[s] for s in (3, 4)}
    a, b = weights(straight), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_fsdp_with_activation_checkpointing_trains_the_same(fsdp_workers):
    assert losses(fsdp_workers["checkpointing"]) == losses(fsdp_workers["straight"])
    a, b = weights(fsdp_workers["checkpointing"]), weights(fsdp_workers["straight"])
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_fsdp_galore_equals_ddp_galore_and_resumes_bit_exactly(ddp_workers, fsdp_workers):
    """Row-local right-side projections, refreshes (steps 0 and 2) gathered to each matrix's owner and broadcast:
    the DDP run's losses; full-state checkpoints of row-sharded moments and whole projections resume bit-exactly."""
    straight, resumed = fsdp_workers["galore"], fsdp_workers["galore-resumed"]
    assert losses(straight) == pytest.approx(losses(ddp_workers["right"]), rel=LOSS_RTOL)
    a, b = weights(straight), weights(ddp_workers["right"])
    assert max((a[k] - b[k]).abs().max().item() for k in a) < WEIGHT_ATOL
    assert losses(resumed) == {s: losses(straight)[s] for s in (3, 4)}
    c = weights(resumed)
    assert all(torch.equal(a[k], c[k]) for k in a)
    for run in (straight, resumed):
        rank0, rank1 = (dump["projections"] for dump in rank_dumps(run))
        assert len(rank0) == 14 and all(torch.equal(rank0[name], rank1[name]) for name in rank0)
        assert all(p.shape[0] == GALORE["rank"] for p in rank0.values())  # Q, r x n: whole on every rank
    assert svd_counts(straight) == [14, 14] and svd_counts(resumed) == [7, 7]  # the resumed run refreshes at step 2
    saved = torch.load(straight / "checkpoints" / "step_00000004" / "trainer_state.pt", weights_only=True)
    moments = [s["exp_avg"] for s in saved["optimizer"]["state"].values() if "projection" in s]
    assert len(moments) == 14 and all(m.shape[1] == GALORE["rank"] for m in moments)
    assert {m.shape[0] for m in moments} == {64, 160}  # gathered: all m rows, not a shard


# --- errors and single-process identity ----------------------------------------------------------------


@pytest.mark.slow
def test_total_batch_not_divisible_is_one_line_error_under_torchrun(work, config_file, shared_data):
    values = run_args(work / "indivisible", config_file, total_batch_size=12)  # 12 sequences, 4 x 2 per step
    result = torchrun("-m", "galore_train", "pretrain", *cli_flags(values))
    assert result.returncode != 0
    message = "error: --total-batch-size 12 is not a multiple of --batch-size 4 x 2 process(es)"
    assert result.stderr.count(message) == 2  # one per rank (their lines may interleave)
    assert "galore_train/" not in result.stderr  # no traceback through our code
    assert not (work / "indivisible").exists()


def test_total_batch_must_divide_micro_batch_times_processes(tiny_config_file, tmp_path):
    cfg = TrainConfig(**tiny_run_args(tiny_config_file, tmp_path, batch_size=4, total_batch_size=12))
    assert plan_steps(cfg, world_size=1).accumulation == 3
    with pytest.raises(UserError, match=r"--total-batch-size 12 is not a multiple of --batch-size 4 x 2 process"):
        plan_steps(cfg, world_size=2)
    assert plan_steps(cfg.replace(total_batch_size=16), world_size=2).accumulation == 2


@pytest.mark.parametrize(
    "optimizer, eightbit",
    [(name, False) for name in ("swan", "sinkgd", "lora")] + [("adamw", True)],
)
def test_fsdp_refuses_optimizers_that_need_whole_matrices(optimizer, eightbit):
    with pytest.raises(UserError, match="--distributed ddp"):
        fsdp.check_fsdp_supported(TrainConfig(optimizer=optimizer, eightbit=eightbit, distributed="fsdp"))
    fsdp.check_fsdp_supported(TrainConfig(optimizer="adamw", distributed="fsdp"))
    galores = ("galore_adamw", "galore_adafactor", "natural_galore_adamw", "galore_adamw8bit", "fira_adamw")
    for galore in galores + ("apollo_adamw", "apollo_mini"):
        fsdp.check_fsdp_supported(TrainConfig(optimizer=galore, proj_type="right", distributed="fsdp"))
    eightbit_galore = TrainConfig(optimizer="galore_adamw", eightbit=True, proj_type="right", distributed="fsdp")
    fsdp.check_fsdp_supported(eightbit_galore)


def test_fsdp_galore_needs_right_side_projections():
    with pytest.raises(UserError, match="use --proj-type right"):
        fsdp.check_fsdp_supported(TrainConfig(optimizer="galore_adamw", distributed="fsdp"))  # std
    fsdp.check_fsdp_supported(TrainConfig(optimizer="galore_adamw", proj_type="right", distributed="fsdp"))


def test_single_process_helpers_change_nothing():
    model = torch.nn.Linear(2, 2)
    env = distributed.DistEnv()
    cfg = TrainConfig(distributed="fsdp")
    assert fsdp.shard_model(model, cfg, env) is model and distributed.wrap_model(model, env) is model
    batches = [{"labels": torch.zeros(1, 3)}] * 3
    assert distributed.lockstep_batches(batches, model, distributed.DistEnv(world_size=2)) is batches  # not sharded
    assert distributed.rank_metrics({"peak_memory_gb": 1.0, "tokens_per_second": 5.0}, env) == {}
    assert fsdp.full_model_state(model) is None
    assert isinstance(distributed.no_sync(model), contextlib.nullcontext)


def test_teardown_lets_gloo_workers_finish_before_destroying_the_group(tmp_path, monkeypatch):
    """The drain that stopped two-process runs hanging at exit (~1 in 8 launches; see teardown's docstring):
    the GIL is released before the group goes away. A 1-process gloo group stands in for torchrun's."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    calls = []
    monkeypatch.setattr(
        distributed.time, "sleep", lambda seconds: calls.append(("sleep", seconds, torch.distributed.is_initialized()))
    )
    distributed.teardown()
    assert calls == [("sleep", distributed.GLOO_DRAIN_SECONDS, True)]
    assert not torch.distributed.is_initialized()
    distributed.teardown()  # nothing left to destroy: no error, no second drain
    assert len(calls) == 1


@pytest.fixture
def one_process_group(tmp_path):
    """A 1-process gloo group: enough for DDP to wrap and run (a torchrun launch is not needed)."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield distributed.DistEnv(world_size=2)  # wrap_model only wraps "under torchrun"
    torch.distributed.destroy_process_group()


class BufferedLinear(torch.nn.Linear):
    def __init__(self) -> None:
        super().__init__(4, 2)
        self.register_buffer("frequencies", torch.arange(4.0), persistent=False)  # like LLaMA's rotary buffer


class DDPBefore213(torch.nn.parallel.DistributedDataParallel):
    """DistributedDataParallel as torch 2.6-2.12 declare it: no `forward_sync_buffers` (new in 2.13)."""

    def __init__(
        self,
        module,
        device_ids=None,
        output_device=None,
        dim=0,
        broadcast_buffers=True,
        init_sync=True,
        process_group=None,
        bucket_cap_mb=None,
        find_unused_parameters=False,
        check_reduction=False,
        gradient_as_bucket_view=False,
        static_graph=False,
        delay_all_reduce_named_params=None,
        param_to_hook_all_reduce=None,
        mixed_precision=None,
        device_mesh=None,
    ):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # the installed torch deprecates broadcast_buffers
            super().__init__(
                module,
                device_ids=device_ids,
                broadcast_buffers=broadcast_buffers,
                gradient_as_bucket_view=gradient_as_bucket_view,
            )


@pytest.mark.parametrize("older_torch", [False, True], ids=["installed torch", "torch 2.6-2.12"])
def test_ddp_wraps_without_buffer_broadcasts_on_every_supported_torch(one_process_group, monkeypatch, older_torch):
    """Passing forward_sync_buffers=False unconditionally was a TypeError at every launch on torch < 2.13."""
    if older_torch:
        monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", DDPBefore213)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # and no deprecated keyword on the installed torch
        wrapped = distributed.wrap_model(BufferedLinear(), one_process_group)
    assert isinstance(wrapped, torch.nn.parallel.DistributedDataParallel) and wrapped.broadcast_buffers is False
    assert wrapped.gradient_as_bucket_view  # no second copy of every gradient in DDP's buckets
    wrapped(torch.ones(3, 4)).sum().backward()  # forward and the gradient all-reduce run


def test_refresh_owners_are_round_robin_over_the_galore_parameters_in_optimizer_order(monkeypatch):
    assert refresh_owners(5, 2) == [0, 1, 0, 1, 0]
    assert refresh_owners(3, 4) == [0, 1, 2]
    monkeypatch.setattr(refresh_sharing.dist, "get_world_size", lambda group=None: 2)  # no process group needed
    monkeypatch.setattr(refresh_sharing.dist, "get_rank", lambda group=None: 1)
    plain, matrices, more = torch.zeros(4), [torch.zeros(4, 3) for _ in range(3)], [torch.zeros(5, 3)]
    optimizer = GaLoreAdamW([{"params": matrices, "rank": 2}, {"params": [plain]}, {"params": more, "rank": 2}])
    optimizer.share_refresh()
    assert [optimizer._sharing.owner(p) for p in matrices + more] == [0, 1, 0, 1]
    with pytest.raises(KeyError):
        optimizer._sharing.owner(plain)  # full-rank parameters have no refresh
    apollo = ApolloAdamW(
        [{"params": matrices, "rank": 2, "proj": "random"}, {"params": more, "rank": 2, "proj": "svd"}]
    )
    apollo.share_refresh()
    assert apollo._sharing.owner(more[0]) == 0  # APOLLO's random projections are regenerated, not refreshed


def test_shared_refresh_on_one_process_is_the_unshared_optimizer(one_process_group):
    """The owner's path (compute, broadcast to itself, store) changes no bit: two-sided 4-bit lazy refreshes."""
    settings = dict(
        rank=3,
        update_proj_gap=1,
        proj_type="full",
        proj_bits=4,
        proj_group_size=8,
        adaptive_gap=True,
        cos_threshold=0.0,
    )
    generator = torch.Generator().manual_seed(0)
    start = [torch.randn(12, 8, generator=generator), torch.randn(6, 10, generator=generator)]
    gradients = [[torch.randn(p.shape, generator=generator) for p in start] for _ in range(6)]
    params = {mode: [p.clone() for p in start] for mode in ("alone", "shared")}
    optimizers = {mode: GaLoreAdamW([{"params": params[mode], **settings}], lr=1e-2) for mode in params}
    optimizers["shared"].share_refresh()
    for step_gradients in gradients:
        for mode, optimizer in optimizers.items():
            for p, g in zip(params[mode], step_gradients):
                p.grad = g.clone()
            optimizer.step()
    alone, shared = (optimizers[mode].state_dict()["state"] for mode in ("alone", "shared"))
    assert states_equal(alone, shared) and alone[0]["proj_gap"] == 2
    assert all(torch.equal(a, b) for a, b in zip(params["alone"], params["shared"]))
    shared_metrics, alone_metrics = (optimizers[mode].svd_metrics() for mode in ("shared", "alone"))
    assert {**shared_metrics, "svd_seconds": 0} == {**alone_metrics, "svd_seconds": 0}


# --- torchrun worker ---------------------------------------------------------------------------------


def _worker(plan_file: str) -> None:
    """Run each planned Trainer in this torchrun process; dump per-rank state where asked.

    The process group is kept across the runs (a torchrun worker cannot re-create it reliably).
    """
    import galore_train.checkpoint as checkpoint

    real_teardown, real_save = distributed.teardown, checkpoint.save_checkpoint
    real_share = distributed.share_projection_refresh
    distributed.teardown = lambda: None
    rank = int(os.environ["RANK"])
    for run in json.loads(Path(plan_file).read_text()):
        saves = []
        checkpoint.save_checkpoint = lambda *args, saves=saves, **kwargs: (
            saves.append(args[1]) or real_save(*args, **kwargs)
        )
        # "replicated_refresh": every rank computes every SVD itself, as before shared refresh
        distributed.share_projection_refresh = (lambda *args: None) if run.get("replicated_refresh") else real_share
        trainer = Trainer(TrainConfig(**run["config"]))
        trainer.run()
        if run["dump"]:
            blank = sum(bool((batch["labels"] == -100).all()) for batch in trainer.eval_batches)
            dump = {
                "saves": len(saves),
                "projections": projections(trainer),
                "states": optimizer_states(trainer),
                "blank_eval_batches": blank,
                "state_bytes": trainer.memory.ledger.live["optimizer_state"],  # the meter's, this rank's
                "newton_schulz_calls": getattr(trainer.optimizer, "newton_schulz_calls", 0),  # Muon's, this rank's
            }
            Path(run["dump"]).mkdir(parents=True, exist_ok=True)
            torch.save(dump, Path(run["dump"]) / f"rank{rank}.pt")
    real_teardown()


if __name__ == "__main__":
    _worker(sys.argv[1])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["swan", "sinkgd"])
def test_ddp_stateless_optimizers_match_one_process(name, config_file, tmp_path, shared_data):
    """SWAN and SinkGD under torchrun: the averaged gradient, normalized on each rank, gives one process's
    weights (measured 1.2e-4 and 1.0e-4: normalization magnifies the summation-order differences a little)."""
    values = lambda out: run_args(out, config_file, optimizer=name, lr=1e-2)  # noqa: E731
    torchrun_ok("-m", "galore_train", "pretrain", *cli_flags(values(tmp_path / "ddp")))
    subprocess.run(
        [sys.executable, "-m", "galore_train", "pretrain", *cli_flags(values(tmp_path / "one"))],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    a, b = weights(tmp_path / "one"), weights(tmp_path / "ddp")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < WEIGHT_ATOL
