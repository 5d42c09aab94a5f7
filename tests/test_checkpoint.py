import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from galore_train import checkpoint
from galore_train.errors import UserError


def write_state(value: float):
    def write(directory: Path) -> None:
        checkpoint.save_trainer_state(
            directory, {"step": int(value), "weights": torch.full((4,), value)}, [{"epoch": 0}]
        )

    return write


def test_save_then_load_round_trip(tmp_path):
    saved = checkpoint.save_checkpoint(tmp_path, 7, write_state(7.0), keep_last=2)
    assert saved.name == "step_00000007" and checkpoint.latest_checkpoint(tmp_path) == saved
    state, data = checkpoint.load_trainer_state(saved)
    assert state["step"] == 7 and torch.equal(state["weights"], torch.full((4,), 7.0)) and data == [{"epoch": 0}]


def test_keep_last_prunes_oldest(tmp_path):
    for step in (1, 2, 3, 4):
        checkpoint.save_checkpoint(tmp_path, step, write_state(step), keep_last=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]


def test_failed_save_leaves_previous_checkpoint(tmp_path):
    checkpoint.save_checkpoint(tmp_path, 1, write_state(1.0), keep_last=2)

    def broken(directory: Path) -> None:
        (directory / "trainer_state.pt").write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(checkpoint.SaveFailed, match="disk full"):
        checkpoint.save_checkpoint(tmp_path, 2, broken, keep_last=2)
    assert not list(tmp_path.glob(".tmp-*"))
    latest = checkpoint.latest_checkpoint(tmp_path)
    assert latest.name == "step_00000001"
    assert checkpoint.load_trainer_state(latest)[0]["step"] == 1


KILLED_SAVE = """
import sys, time, torch
from pathlib import Path
from galore_train import checkpoint
def slow(directory):
    torch.save({"step": 2}, directory / "trainer_state.pt")
    print("writing", flush=True)
    time.sleep(60)
checkpoint.save_checkpoint(Path(sys.argv[1]), 2, slow, keep_last=5)
"""


def test_save_killed_midway_leaves_previous_checkpoint_loadable(tmp_path):
    checkpoint.save_checkpoint(tmp_path, 1, write_state(1.0), keep_last=5)
    process = subprocess.Popen(
        [sys.executable, "-c", KILLED_SAVE, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert process.stdout.readline().strip() == "writing"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step_00000001"]
    latest = checkpoint.latest_checkpoint(tmp_path)
    assert checkpoint.load_trainer_state(latest)[0]["step"] == 1
    # the next save cleans the dead process's temporary folder
    checkpoint.save_checkpoint(tmp_path, 3, write_state(3.0), keep_last=5)
    assert not list(tmp_path.glob(".tmp-*"))


def test_incomplete_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not a complete galore-train checkpoint"):
        checkpoint.load_trainer_state(tmp_path)
