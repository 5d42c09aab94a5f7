"""Bit-exact resume for every optimizer and method: N steps + Ctrl-C + resume + N steps == 2N steps.

Everything a step depends on must be in the checkpoint: weights, optimizer moments, GaLore projections and
their refresh clocks (and Q-GaLore's quantized projections and lazy-refresh intervals, Natural
GaLore's gradient history), 8-bit quantization state, ReLoRA's cycle position, the LR schedule, RNG and the data
position (the consumed one: batches are made ahead on a producer thread). The GaLore gap (3) makes the resumed
half cross a projector refresh.
"""

import json
import signal
from pathlib import Path

import pytest
import torch
from conftest import tiny_run_args
from safetensors.torch import load_file

from galore_train.config import TrainConfig
from galore_train.errors import TrainingStopped
from galore_train.train import Trainer

CASES = {
    "adamw": {},
    "adamw-pack": {"pack": True},
    "adam": {},
    "adafactor": {},
    "adam8bit": {},
    "galore_adamw": {},
    "galore_adafactor": {},
    "galore_adamw8bit": {},
    "galore_adamw-layerwise": {"optimizer": "galore_adamw", "layerwise": True},
    "galore_adamw-int4-lazy": {"optimizer": "galore_adamw", "proj_bits": 4, "adaptive_gap": True, "gap": 1},
    "natural_galore_adamw": {"fisher_history": 2},
    "lora": {},
    "relora": {"relora_reset": 2, "restart_warmup_steps": 1, "relora_warm_start": 1},
    "low_rank": {},
}


def run_args(config_file, output_dir, case):
    overrides = {
        "optimizer": case.split("-")[0],
        "rank": 16,
        "gap": 3,
        "num_training_steps": 6,
        "eval_every": 100,
        "save_every": 100,
        "warmup_steps": 1,
        **CASES[case],
    }
    return TrainConfig(**tiny_run_args(config_file, output_dir, **overrides))


def losses(output_dir):
    lines = (Path(output_dir) / "metrics.jsonl").read_text().splitlines()
    steps = [record for record in map(json.loads, lines) if "loss" in record]
    assert all(record["data_wait_seconds"] >= 0 for record in steps)
    return [record["loss"] for record in steps]


def weights(output_dir):
    return load_file(str(Path(output_dir) / "checkpoints" / "step_00000006" / "model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_resume_is_bit_exact(case, tiny_config_file, tmp_path, monkeypatch, shared_data):
    Trainer(run_args(tiny_config_file, tmp_path / "straight", case)).run()

    original = Trainer._train_step

    def interrupt_after_three(self):
        record = original(self)
        if self.step == 3:
            signal.raise_signal(signal.SIGINT)
        return record

    monkeypatch.setattr(Trainer, "_train_step", interrupt_after_three)
    with pytest.raises(TrainingStopped, match="SIGINT: stopped after step 3; checkpoint saved"):
        Trainer(run_args(tiny_config_file, tmp_path / "split", case)).run()
    monkeypatch.undo()
    Trainer(run_args(tiny_config_file, tmp_path / "split", case).replace(resume=True)).run()

    assert losses(tmp_path / "split") == losses(tmp_path / "straight")
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "split")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
