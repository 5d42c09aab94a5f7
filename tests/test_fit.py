"""Before the first step on a GPU: the memory estimate against the card's free memory (galore_train/memory/fit.py).
No GPU here: torch.cuda's two queries are monkeypatched, the device is a torch.device("cuda", 0) never used."""

from __future__ import annotations

import shlex
from dataclasses import dataclass

import pytest
import torch

from galore_train.config import TrainConfig
from galore_train.errors import UserError
from galore_train.memory import fit
from galore_train.model import load_model_config

GiB = 2**30
CARD = "NVIDIA GeForce RTX 4090"


@dataclass
class Env:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cuda", 0)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@pytest.fixture
def card(monkeypatch: pytest.MonkeyPatch) -> list[torch.device]:
    """A 24 GiB card with 22 GiB free; records the devices queried."""
    queried = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: queried.append(device) or (22 * GiB, 24 * GiB))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: CARD)
    return queried


def one_gpu(values: list[float], env: Env) -> list[float]:
    return values if isinstance(values, list) else [values]


def check(cfg: TrainConfig, env: Env = Env(), gather=one_gpu) -> None:
    fit.check_fits(cfg, load_model_config(cfg.model), env, gather)


def apply_flags(cfg: TrainConfig, flags: str) -> TrainConfig:
    """The suggested flags applied to `cfg` (the ones fit.py may suggest)."""
    names = {"--optimizer": "optimizer", "--batch-size": "batch_size", "--total-batch-size": "total_batch_size"}
    switches = {
        "--layerwise": "layerwise",
        "--activation-checkpointing": "activation_checkpointing",
        "--8bit": "eightbit",
    }
    words, changes = shlex.split(flags), {}
    while words:
        word = words.pop(0)
        if word in switches:
            changes[switches[word]] = True
        else:
            value = words.pop(0)
            changes[names[word]] = value if word == "--optimizer" else int(value)
    return cfg.replace(**changes)


def test_a_run_that_cannot_fit_is_one_line_with_the_flags_that_would(card: list[torch.device]) -> None:
    cfg = TrainConfig(model="llama_7b", optimizer="adamw", batch_size=8, num_training_steps=10)
    with pytest.raises(UserError) as caught:
        check(cfg)
    message = str(caught.value)
    assert "\n" not in message and card == [torch.device("cuda", 0)]
    estimate = fit.estimate_config(cfg, load_model_config("llama_7b"), 1).peak
    assert f"about {estimate / GiB:.1f} GiB" in message and estimate > 22 * GiB
    assert f"22.0 GiB free of 24.0 GiB on {CARD}" in message
    flags = message.split("it would fit with ")[1].split(" (about")[0]
    fixed = apply_flags(cfg, flags)
    assert fit.estimate_config(fixed, load_model_config("llama_7b"), 1).peak <= 22 * GiB  # the advice holds
    check(fixed)  # and passes the check itself


def test_a_run_that_fits_starts(card: list[torch.device]) -> None:
    check(TrainConfig(model="llama_60m", optimizer="galore_adamw", num_training_steps=10))
    assert card  # it did look


def test_nothing_is_checked_on_cpu_or_when_skipped(card: list[torch.device]) -> None:
    huge = TrainConfig(model="llama_7b", optimizer="adamw", batch_size=64, num_training_steps=10)
    check(huge, Env(device=torch.device("cpu")))
    check(huge.replace(skip_fit_check=True))
    assert card == []


def test_when_no_change_fits_it_says_so(card: list[torch.device], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (1 * GiB, 8 * GiB))
    with pytest.raises(UserError, match="no flag change fits it there"):
        check(TrainConfig(model="llama_7b", optimizer="adamw", num_training_steps=10))


def test_under_torchrun_the_fullest_gpu_decides_and_rank_0_alone_speaks(card: list[torch.device]) -> None:
    cfg = TrainConfig(model="llama_1b", optimizer="adamw", batch_size=16, num_training_steps=10)
    assert fit.estimate_config(cfg, load_model_config("llama_1b"), 2).peak < 22 * GiB  # fits an idle card
    busy_second = lambda free, env: [free, 2.0 * GiB]  # noqa: E731 - rank 1's card is nearly full
    with pytest.raises(UserError, match="rank 1's GPU"):
        check(cfg, Env(rank=0, world_size=2), busy_second)
    with pytest.raises(SystemExit) as quiet:
        check(cfg, Env(rank=1, world_size=2), busy_second)
    assert quiet.value.code == 2


def test_the_trainer_checks_before_it_builds_the_model(monkeypatch: pytest.MonkeyPatch, tiny_config_file: str) -> None:
    import galore_train.train as train

    class Checked(Exception):
        pass

    built = []
    monkeypatch.setattr(train, "meta_llama", lambda *a, **k: built.append(a))
    monkeypatch.setattr(train.fit, "check_fits", lambda *a: (_ for _ in ()).throw(Checked()))
    with pytest.raises(Checked):
        train.Trainer(TrainConfig(model=tiny_config_file, num_training_steps=2, tokenizer="unused"))
    assert built == []
