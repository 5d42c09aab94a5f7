"""A bad gradient or bad weights never reach the weights or a checkpoint (issue 15), and resume loads
weights without a second copy of the model (7B on a 24 GB GPU cannot hold two)."""

import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig

import galore_train.resume as resume_module
from conftest import TINY_LLAMA, tiny_run_args
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
    with pytest.raises(TrainingStopped, match="gradient norm became nan .*at step 5; last good checkpoint: .*step_00000004") as stopped:
        trainer.run()
    assert stopped.value.exit_code == 3
    assert all_finite(trainer.model.parameters())  # layer-wise: no parameter took the NaN gradient
    assert all_finite(saved_weights(tmp_path / "run").values())


def test_nonfinite_weights_are_never_saved(tiny_config_file, tmp_path, shared_data):
    trainer = Trainer(TrainConfig(**tiny_run_args(tiny_config_file, tmp_path / "run", num_training_steps=2, save_every=1)))
    trainer.run()
    with torch.no_grad():
        trainer.model.model.norm.weight[0] = float("inf")
    with pytest.raises(TrainingStopped, match="weights are no longer finite after step 2: not saved; last good checkpoint") as stopped:
        trainer.save()
    assert stopped.value.exit_code == 3
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_00000002"


def test_resume_holds_at_most_one_checkpoint_tensor_beside_the_model(tiny_config_file, tmp_path, monkeypatch, shared_data):
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


def test_the_model_is_sharded_before_it_is_moved_to_the_device(tiny_config_file, tmp_path, monkeypatch, shared_data):
    """FSDP2 moves each layer to the GPU as it shards it: moving the whole model first would put all of it on
    every rank's device (7B: 13.5 GB) before sharding. Stand-ins record the order on CPU."""
    import galore_train.distributed as distributed_module

    events = []
    real_to = torch.nn.Module.to

    def record_to(self, *args, **kwargs):
        if any(isinstance(a, torch.device) for a in (*args, *kwargs.values())):
            events.append("to device")
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(distributed_module, "shard_model", lambda model, cfg, env: events.append("shard") or model)
    monkeypatch.setattr(torch.nn.Module, "to", record_to)
    Trainer(TrainConfig(**tiny_run_args(tiny_config_file, tmp_path / "run"))).train_stream.close()
    assert events[:2] == ["shard", "to device"]
