"""Shared fixtures: offline hub settings, the real C4 shards and T5 tokenizer from ../shared/data, tiny configs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub call fails at once instead of after retries
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
# The CPU suite stays on the CPU on a GPU machine too: its runs, and the torchrun children that inherit this, pick
# the CPU and gloo (galore_train/distributed.py). The CUDA tier (tests/test_cuda.py, `pytest -m cuda`) lifts it.
os.environ["GALORE_TRAIN_DEVICE"] = "cpu"

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("GALORE_TRAIN_SHARED_DATA", ROOT.parent / "shared" / "data"))
TRAIN_FILES = str(SHARED_DATA / "c4" / "train" / "*.json.gz")
EVAL_FILES = str(SHARED_DATA / "c4" / "eval" / "*.json.gz")
TOKENIZER = str(SHARED_DATA / "t5-tokenizer")

# A LLaMA small enough for many CPU steps per second; vocab of the paper's models (32,000).
TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "hidden_act": "silu",
    "max_position_embeddings": 256,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "vocab_size": 32000,
    "pad_token_id": 0,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "tie_word_embeddings": False,
}


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "c4").is_dir():
        pytest.fail(f"the shared real data is missing: {SHARED_DATA} (see README: tests read ../shared/data)")
    return SHARED_DATA


@pytest.fixture
def tiny_config_file(tmp_path: Path) -> str:
    path = tmp_path / "tiny_llama.json"
    path.write_text(json.dumps(TINY_LLAMA))
    return str(path)


def tiny_run_args(config_file: str, output_dir: Path, **overrides) -> dict:
    """TrainConfig values for a fast real-data run: tiny LLaMA, 64-token sequences, few eval tokens."""
    values = dict(
        model=config_file,
        tokenizer=TOKENIZER,
        data_files=TRAIN_FILES,
        eval_data_files=EVAL_FILES,
        max_length=64,
        batch_size=4,
        num_training_steps=6,
        eval_tokens=2000,
        eval_every=3,
        save_every=3,
        lr=3e-3,
        shuffle_buffer=64,
        output_dir=str(output_dir),
        wandb_mode="disabled",
        dtype="fp32",
        seed=0,
    )
    values.update(overrides)
    return values


def run_straight_and_crashed(make_config, crash_after_step: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Train `make_config("straight")` to its end; train `make_config("split")` until it dies right after optimizer
    step `crash_after_step` (no handler saves: like kill -9), then resume it with --resume to its end."""
    from galore_train.train import Trainer

    Trainer(make_config("straight")).run()
    original = Trainer._train_step

    def crash_after(self):
        record = original(self)
        if self.step == crash_after_step:
            raise KeyboardInterrupt  # no handler saves: the process just dies
        return record

    monkeypatch.setattr(Trainer, "_train_step", crash_after)
    with pytest.raises(KeyboardInterrupt):
        Trainer(make_config("split")).run()
    monkeypatch.undo()
    Trainer(make_config("split").replace(resume=True)).run()
