"""A bad gradient or bad weights never reach the weights or a checkpoint (issue 15), and resume loads
weights without a second copy of the model (7B on a 24 GB GPU cannot hold two)."""

import weakref
from pathlib import Path

import pytest
import torch
from conftest import TINY_LLAMA, tiny_run_args
from safetensors.torch import load_file
from transformers import LlamaConfig

import galore_train.resume as resume_module
from galore_train.config import TrainConfig
from galore_train.errors import TrainingStopped
from galore_train.model import build_model
from galore_train.train import Trainer

POISONED = "model.layers.0.mlp.down_proj.weight"  # mid-way in backward order: some hooks ran before it


def trainer_with_nan_gradient(config_file, output_dir, step, **overrides) -> Trainer:
    """A Trainer whose gradient of POISONED turns NaN during optimizer step `step` (1-based); the loss
    stays finite, as when a gradient overflows inside backward."""
    trainer = Trainer(TrainConfig(**tiny_run_args(config_file, output_dir, **overrides)))
    param = dict(trainer.model.named_parameters())[POISONED]
    param.register_hook(lambda grad: grad * float("nan") if trainer.step + 1 == step else grad)
    return trainer


def saved_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    latest = (output_dir / "checkpoints" / "latest").read_text().strip()
    return load_file(str(output_dir / "checkpoints" / latest / "model.safetensors"))


def all_finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


@pytest.mark.parametrize("layerwise", [False, True], ids=["plain", "layerwise"])
def test_a_nonfinite_gradient_with_a_finite_loss_is_skipped(tiny_config_file, tmp_path, shared_data, layerwise):
    options = dict(layerwise=True, grad_clipping=0.0) if layerwise else {}
    trainer = trainer_with_nan_gradient(tiny_config_file, tmp_path / "run", step=2, skip_nonfinite=True, **options)
    summary = trainer.run()
    assert summary["skipped_steps"] == 1 and summary["steps"] == 6
    assert all_finite(trainer.model.parameters())
    assert all_finite(saved_weights(tmp_path / "run").values())


@pytest.mark.parametrize("layerwise", [False, True], ids=["plain", "layerwise"])
def test_a_nonfinite_gradient_stops_the_run_by_default(tiny_config_file, tmp_path, shared_data, layerwise):
    options = dict(layerwise=True, grad_clipping=0.0) if layerwise else {}
    trainer = trainer_with_nan_gradient(tiny_config_file, tmp_path / "run", step=5, save_every=2, **options)
    with pytest.raises(
        TrainingStopped, match="gradient norm became nan .*at step 5; last good checkpoint: .*step_00000004"
    ) as stopped:
        trainer.run()
    assert stopped.value.exit_code == 3
    assert all_finite(trainer.model.parameters())  # layer-wise: no parameter took the NaN gradient
    assert all_finite(saved_weights(tmp_path / "run").values())


def test_nonfinite_weights_are_never_saved(tiny_config_file, tmp_path, shared_data):
    trainer = Trainer(
        TrainConfig(**tiny_run_args(tiny_config_file, tmp_path / "run", num_training_steps=2, save_every=1))
    )
    trainer.run()
    with torch.no_grad():
        trainer.model.model.norm.weight[0] = float("inf")
    with pytest.raises(
        TrainingStopped, match="weights are no longer finite after step 2: not saved; last good checkpoint"
    ) as stopped:
        trainer.save()
    assert stopped.value.exit_code == 3
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_00000002"


def test_resume_holds_at_most_one_checkpoint_tensor_beside_the_model(
    tiny_config_file, tmp_path, monkeypatch, shared_data
):
    args = tiny_run_args(tiny_config_file, tmp_path / "run", num_training_steps=2, save_every=2)
    Trainer(TrainConfig(**args)).run()
    live, peak, read = {"bytes": 0}, {"bytes": 0}, {"count": 0}
    original_open = resume_module.safe_open

    class CountingReader:
        def __init__(self, *a, **k):
            self.reader = original_open(*a, **k)

        def __enter__(self):
            self.inner = self.reader.__enter__()
            return self

        def __exit__(self, *exc):
            return self.reader.__exit__(*exc)

        def keys(self):
            return self.inner.keys()

        def get_tensor(self, name):
            tensor = self.inner.get_tensor(name)
            nbytes = tensor.numel() * tensor.element_size()
            live["bytes"] += nbytes
            peak["bytes"] = max(peak["bytes"], live["bytes"])
            read["count"] += 1
            weakref.finalize(tensor, lambda: live.__setitem__("bytes", live["bytes"] - nbytes))
            return tensor

    monkeypatch.setattr(resume_module, "safe_open", CountingReader)
    trainer = Trainer(TrainConfig(**{**args, "num_training_steps": 3, "resume": True}))
    weights = trainer.model.state_dict()
    assert read["count"] == len(weights)  # every weight came through the reader ...
    largest = max(t.numel() * t.element_size() for t in weights.values())
    assert peak["bytes"] <= largest  # ... and never more than one of them was alive at a time
    trainer.train_stream.close()
    saved = saved_weights(tmp_path / "run")
    assert all(torch.equal(weights[name], saved[name]) for name in saved)


def test_load_weights_reads_a_checkpoint_split_into_shards(tmp_path):
    config = LlamaConfig(**TINY_LLAMA)
    source, target = build_model(config, seed=0), build_model(config, seed=1)
    source.save_pretrained(tmp_path, max_shard_size="1MB")  # what transformers 4 does above 5 GB (7B)
    assert (tmp_path / resume_module.WEIGHTS_INDEX).is_file() and len(resume_module.weight_files(tmp_path)) > 1
    resume_module.load_weights(target, tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))


@pytest.mark.parametrize(
    "optimizer, expected",
    [
        ("adamw", ["meta build", "shard", "fill", "to device"]),
        ("low_rank", ["meta build", "fill", "shard", "to device"]),
    ],
)
def test_the_model_is_sharded_before_it_is_filled_or_moved(
    tiny_config_file, tmp_path, monkeypatch, shared_data, optimizer, expected
):
    """Built on the meta device; FSDP2 shards it before each rank fills its shards (or, --init-from, moves each
    layer to the GPU as it shards it): filling or moving the whole model first would put all of it on every
    rank's device (7B: 13.5 GB) before sharding. A method that rewrites layers from their values (low-rank,
    LoRA, ReLoRA) is filled first. Stand-ins record the order on CPU."""
    import galore_train.fsdp as fsdp_module
    import galore_train.train as train_module

    events = []
    real_to, real_fill, real_meta = torch.nn.Module.to, train_module.fill_weights, train_module.meta_llama

    def record_to(self, *args, **kwargs):
        if any(isinstance(a, torch.device) for a in (*args, *kwargs.values())):
            events.append("to device")
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(train_module, "meta_llama", lambda *a: events.append("meta build") or real_meta(*a))
    monkeypatch.setattr(train_module, "fill_weights", lambda *a: events.append("fill") or real_fill(*a))
    monkeypatch.setattr(fsdp_module, "shard_model", lambda model, cfg, env: events.append("shard") or model)
    monkeypatch.setattr(torch.nn.Module, "to", record_to)
    cfg = TrainConfig(**tiny_run_args(tiny_config_file, tmp_path / "run", optimizer=optimizer))
    Trainer(cfg).train_stream.close()
    assert events[:4] == expected


# --- GPU paths, simulated on CPU ------------------------------------------------------------------


def test_auto_dtype_is_fp32_on_gpus_that_only_emulate_bf16(monkeypatch):
    """V100 / T4: `torch.cuda.is_bf16_supported()` says yes by emulation; only native bf16 picks bf16."""
    from galore_train.model import resolve_dtype

    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert resolve_dtype("auto", cuda) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # an A100
    assert resolve_dtype("auto", cuda) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)  # a torch without the argument
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    assert resolve_dtype("auto", cuda) == torch.float32
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert resolve_dtype("auto", cuda) == torch.bfloat16


def test_each_rank_gets_its_own_random_state_back(monkeypatch):
    """The checkpoint keeps every rank's CPU and GPU state; rank r restores entry r, on its own device only."""
    restored = {}
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.update(cuda=(state, device)))
    monkeypatch.setattr(torch, "set_rng_state", lambda state: restored.update(cpu=state))
    states = {"by_rank": [{"torch": "cpu0", "cuda": "gpu0"}, {"torch": "cpu1", "cuda": "gpu1"}]}
    gpu1 = torch.device("cuda", 1)
    resume_module.restore_rng(states, rank=1, device=gpu1)
    assert restored == {"cpu": "cpu1", "cuda": ("gpu1", gpu1)}
    restored.clear()
    resume_module.restore_rng({"torch": "old-cpu", "cuda": ["rank 0's gpu0", "rank 0's gpu1"]}, rank=1, device=gpu1)
    assert restored == {"cpu": "old-cpu"}  # an older checkpoint: rank 0's GPU states are no other rank's
    restored.clear()
    resume_module.restore_rng(states, rank=1, device=torch.device("cpu"))  # a run kept on the CPU
    assert restored == {"cpu": "cpu1"}


def test_ranks_that_would_resume_different_checkpoints_stop(tmp_path, monkeypatch):
    from galore_train import distributed
    from galore_train.errors import UserError

    step = tmp_path / "step_00000004"
    step.mkdir()
    for name in ("trainer_state.pt", "model.safetensors", "data_state.json"):
        (step / name).write_text("x")
    env = distributed.DistEnv(rank=0, world_size=2)
    monkeypatch.setattr(distributed, "gather_objects", lambda value, env: [value, resume_module.fingerprint(None)])
    with pytest.raises(UserError, match="would not resume the same checkpoint .rank 0: step_00000004; rank 1: a fresh"):
        resume_module.check_ranks_agree(step, env)
    monkeypatch.setattr(distributed, "gather_objects", lambda value, env: [value, value])
    resume_module.check_ranks_agree(step, env)  # the same view everywhere: nothing to say


def test_collectives_wait_as_long_as_asked(monkeypatch):
    from datetime import timedelta

    from galore_train import distributed

    calls = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **kwargs: calls.update(kwargs))
    distributed.setup(timeout_minutes=90)
    assert calls["timeout"] == timedelta(minutes=90) and calls["backend"] == "gloo"


def test_cuda_peaks_include_reserved_memory_and_leave_evaluations_out(monkeypatch):
    from galore_train.memory.meter import MemoryMeter

    peaks = {"allocated": 0, "reserved": 0}
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: peaks["allocated"])
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: peaks["reserved"])
    monkeypatch.setattr(
        torch.cuda, "reset_peak_memory_stats", lambda device=None: peaks.update(allocated=0, reserved=0)
    )
    model = torch.nn.Linear(4, 4)
    meter = MemoryMeter(model, torch.optim.SGD(model.parameters()), "cuda")
    with meter.track():
        peaks.update(allocated=2 * 2**30, reserved=3 * 2**30)  # the training step
    with meter.excluded():
        peaks.update(allocated=7 * 2**30, reserved=8 * 2**30)  # an evaluation with bigger batches
    reading = meter.read_and_reset()
    assert (reading["peak_memory_gb"], reading["peak_reserved_gb"]) == (2.0, 3.0)
