"""Which device and process group a run gets: the CPU suite safe on a CUDA machine, `torchrun --nproc_per_node 1`
with a process group (so `--distributed fsdp` on one GPU is FSDP), more processes than GPUs a one-line error.

CUDA is monkeypatched here (this machine has none); tests/test_distributed.py runs a torchrun child that believes
it has one GPU."""

from __future__ import annotations

import socket

import pytest
import torch
from conftest import tiny_run_args

from galore_train import distributed
from galore_train.config import TrainConfig
from galore_train.errors import UserError
from galore_train.train import Trainer


@pytest.fixture
def one_cuda_device(monkeypatch):
    """What torch reports on a one-GPU machine; nothing may really touch the GPU (there is none)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    return chosen


def test_the_cpu_suite_keeps_runs_off_a_gpu_that_is_there(one_cuda_device, monkeypatch):
    assert distributed.choose_device() == torch.device("cpu")  # conftest sets GALORE_TRAIN_DEVICE=cpu
    monkeypatch.delenv(distributed.DEVICE_ENV)
    assert distributed.choose_device() == torch.device("cuda", 0)  # without it, the GPU
    monkeypatch.setenv(distributed.DEVICE_ENV, "gpu")
    with pytest.raises(UserError, match="GALORE_TRAIN_DEVICE may be 'cpu' or unset; got 'gpu'"):
        distributed.choose_device()


def test_more_processes_than_gpus_is_a_one_line_error_before_any_collective(one_cuda_device, monkeypatch):
    monkeypatch.delenv(distributed.DEVICE_ENV)
    for name, value in {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(UserError) as error:
        distributed.setup()
    assert str(error.value) == (
        "torchrun started 2 processes on this machine but it has 1 GPU(s): pass --nproc_per_node 1 (or fewer)"
    )
    assert one_cuda_device == [] and not torch.distributed.is_initialized()  # no CUDA call, no process group


def torchrun_variables(monkeypatch) -> None:
    """What `torchrun --nproc_per_node 1` sets for its one process."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    variables = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    for name, value in {**variables, "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(name, value)


def test_torchrun_with_one_process_creates_a_process_group(monkeypatch):
    assert distributed.setup() == distributed.DistEnv()  # no torchrun: no group
    assert not torch.distributed.is_initialized()
    torchrun_variables(monkeypatch)
    env = distributed.setup()
    try:
        assert env.launched and not env.enabled and torch.distributed.is_initialized()
        assert torch.distributed.get_backend() == "gloo" and torch.distributed.get_world_size() == 1
    finally:
        distributed.teardown()


@pytest.mark.slow
def test_fsdp_under_torchrun_with_one_process_shards_and_trains_as_one_process(
    tiny_config_file, tmp_path, shared_data, monkeypatch
):
    """`torchrun --nproc_per_node 1 ... --distributed fsdp` used to run the single-process path silently."""
    values = dict(optimizer="galore_adamw", rank=8, gap=2, proj_type="right", num_training_steps=3, eval_every=3)
    plain = Trainer(TrainConfig(**tiny_run_args(tiny_config_file, tmp_path / "plain", **values)))
    plain_summary = plain.run()
    torchrun_variables(monkeypatch)
    sharded = Trainer(TrainConfig(**tiny_run_args(tiny_config_file, tmp_path / "fsdp", distributed="fsdp", **values)))
    assert distributed.is_sharded(sharded.model) and sharded.env.launched
    summary = sharded.run()  # run() tears the group down
    assert summary["val_loss"] == pytest.approx(plain_summary["val_loss"], rel=1e-5)
    assert any("projection" in state for state in sharded.optimizer.state.values())  # GaLore on its row shards
