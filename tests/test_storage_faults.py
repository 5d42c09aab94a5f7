"""Long runs survive their storage (issue 27): a damaged checkpoint, a failed save, changed data, a cut
metrics line. Each fault goes through the CLI (exit code, one line, no traceback); where the run can go on,
the resumed run's losses equal the uninterrupted run's bit for bit (CPU, fp32).

One uninterrupted 6-step run (checkpoints at steps 3 and 6) is made once; each test damages a copy of it.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import EVAL_FILES, TINY_LLAMA, tiny_run_args
from safetensors.torch import load_file

from galore_train import checkpoint, cli, manifest, resume
from galore_train.distributed import DistEnv
from galore_train.reporting.runs import load_run

ROOT = Path(__file__).resolve().parents[1]
STEP_3, STEP_6 = "step_00000003", "step_00000006"


def cli_flags(values: dict) -> list[str]:
    flags = []
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value not in (None, False):
            flags += [flag, str(value)]
    return flags


def run_cli(capsys, *args: str) -> tuple[int, str]:
    """`galore-train ARGS` in this process: (exit code, stderr)."""
    capsys.readouterr()
    saved_argv = sys.argv
    sys.argv = ["galore-train", *args]
    try:
        with pytest.raises(SystemExit) as ended:
            cli.main()
    finally:
        sys.argv = saved_argv
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return ended.value.code or 0, err


def pretrain(capsys, output_dir: Path, config_file: str, **overrides) -> tuple[int, str]:
    values = tiny_run_args(config_file, output_dir, **overrides)
    return run_cli(capsys, "pretrain", *cli_flags(values))


def losses(output_dir: Path) -> list[float]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [record["loss"] for record in map(json.loads, lines) if "loss" in record]


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("config") / "tiny_llama.json"
    path.write_text(json.dumps(TINY_LLAMA))
    return str(path)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, config_file, shared_data) -> Path:
    """The uninterrupted run: 6 steps, checkpoints at 3 and 6 (both kept)."""
    from galore_train.config import TrainConfig
    from galore_train.train import Trainer

    output = tmp_path_factory.mktemp("straight") / "run"
    Trainer(TrainConfig(**tiny_run_args(config_file, output))).run()
    assert [p.name for p in checkpoint.list_checkpoints(output / "checkpoints")] == [STEP_3, STEP_6]
    return output


@pytest.fixture
def copy(straight, tmp_path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(straight, target)
    return target


def truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def flip_a_bit(path: Path) -> None:
    with open(path, "r+b") as handle:
        handle.seek(path.stat().st_size // 2)
        byte = handle.read(1)[0]
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte ^ 0x10]))


DAMAGE = {
    "truncated weights": (
        "model.safetensors",
        truncate,
        "model.safetensors is .* bytes, the manifest says .*cut short",
    ),
    "bit-flipped weights": ("model.safetensors", flip_a_bit, "model.safetensors does not match its checksum"),
    "truncated trainer state": ("trainer_state.pt", truncate, "trainer_state.pt is .*cut short"),
    "missing file": ("data_state.json", Path.unlink, "data_state.json is missing"),
}


# --- a damaged newest checkpoint: the older one is used, and the run ends as the uninterrupted one -----


@pytest.mark.slow
@pytest.mark.parametrize("fault", list(DAMAGE))
def test_resume_skips_a_damaged_checkpoint_and_matches_the_uninterrupted_run(
    fault, copy, straight, config_file, capsys, caplog
):
    name, damage, why = DAMAGE[fault]
    damage(copy / "checkpoints" / STEP_6 / name)
    code, err = pretrain(capsys, copy, config_file, resume=True)
    assert code == 0, err
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping checkpoint")]
    assert len(skipped) == 1 and f"{STEP_6}: " in skipped[0] and skipped[0].endswith(f"using {STEP_3}")
    assert re.search(why, skipped[0]), skipped[0]
    assert (copy / "checkpoints" / f"damaged-{STEP_6}").is_dir()  # set aside, for inspection
    assert losses(copy) == losses(straight)  # cut back to step 3, then steps 4-6 again, bit for bit
    resumed, uninterrupted = (
        load_file(str(run / "checkpoints" / STEP_6 / "model.safetensors")) for run in (copy, straight)
    )
    assert resumed.keys() == uninterrupted.keys() and all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)


def test_no_intact_checkpoint_is_a_one_line_error(copy, config_file, capsys):
    truncate(copy / "checkpoints" / STEP_6 / "model.safetensors")
    (copy / "checkpoints" / STEP_3 / "trainer_state.pt").unlink()
    code, err = pretrain(capsys, copy, config_file, resume=True)
    assert code == 2
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert "no intact checkpoint to resume" in line and STEP_6 in line and "trainer_state.pt is missing" in line


def test_eval_verifies_the_checkpoint(copy, capsys, caplog):
    flip_a_bit(copy / "checkpoints" / STEP_6 / "model.safetensors")
    code, err = run_cli(capsys, "eval", "--checkpoint", str(copy / "checkpoints" / STEP_6), "--eval-tokens", "500")
    assert code == 2 and err.strip().splitlines()[-1].startswith(f"error: checkpoint {copy / 'checkpoints' / STEP_6}")
    assert "does not match its checksum" in err
    code, err = run_cli(capsys, "eval", "--checkpoint", str(copy), "--eval-tokens", "500", "--json")
    assert code == 0, err
    assert any(r.getMessage().startswith(f"skipping checkpoint {STEP_6}") for r in caplog.records)


def test_checkpoint_without_manifest_is_accepted_with_a_note(copy, caplog):
    (copy / "checkpoints" / STEP_6 / manifest.MANIFEST).unlink()  # as written before manifests existed
    assert checkpoint.newest_intact(copy / "checkpoints").name == STEP_6
    assert resume._newest_intact_everywhere(copy / "checkpoints", DistEnv()).name == STEP_6
    assert [r.getMessage() for r in caplog.records][-1].endswith(
        "has no manifest (written before checksums were kept): not verified"
    )
    (copy / "checkpoints" / STEP_6 / "trainer_state.pt").unlink()  # a resume needs its files
    assert resume._newest_intact_everywhere(copy / "checkpoints", DistEnv()).name == STEP_3


# --- a failed save ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_full_disk_at_a_save_stops_in_one_line_and_the_resume_matches(
    tmp_path, straight, config_file, capsys, monkeypatch
):
    original = torch.save

    def full_disk_at_step_6(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("step") == 6:
            Path(f).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk_at_step_6)
    run = tmp_path / "run"
    code, err = pretrain(capsys, run, config_file)
    monkeypatch.undo()
    assert code == 74
    (line,) = [line for line in err.splitlines() if line.startswith("stopped:")]
    assert "could not save the checkpoint of step 6 (ENOSPC: No space left on device;" in line
    assert f"{run / 'checkpoints' / STEP_3} is kept" in line
    assert not list((run / "checkpoints").glob(".tmp-*"))  # the partial folder is gone
    assert (run / "checkpoints" / "latest").read_text().strip() == STEP_3
    code, err = pretrain(capsys, run, config_file, resume=True)
    assert code == 0, err
    assert losses(run) == losses(straight)


@pytest.mark.parametrize(
    "error, cause",
    [
        (OSError(errno.EIO, os.strerror(errno.EIO)), "EIO: Input/output error"),
        (OSError(errno.EACCES, os.strerror(errno.EACCES)), "EACCES: Permission denied"),
        (
            RuntimeError(
                "[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0: file"
                " write failed"
            ),
            "PytorchStreamWriter failed writing file data/0: file write failed",
        ),
    ],
)
def test_storage_errors_remove_the_partial_folder_and_name_the_cause(tmp_path, error, cause):
    def good(directory: Path) -> None:
        checkpoint.save_trainer_state(directory, {"step": 1}, [{}])

    def failing(directory: Path) -> None:
        (directory / "trainer_state.pt").write_bytes(b"half")
        raise error

    checkpoint.save_checkpoint(tmp_path, 1, good, keep_last=2)
    with pytest.raises(checkpoint.SaveFailed, match="MiB free in") as failed:
        checkpoint.save_checkpoint(tmp_path, 2, failing, keep_last=2)
    assert cause in str(failed.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000001"]  # no partial folder


def test_a_bug_in_the_writer_is_not_reported_as_a_storage_failure(tmp_path):
    def buggy(directory: Path) -> None:
        raise KeyError("optimizer")

    with pytest.raises(KeyError):
        checkpoint.save_checkpoint(tmp_path, 1, buggy, keep_last=2)
    assert not list(tmp_path.glob(".tmp-*"))


def test_a_folder_too_small_for_two_checkpoints_is_warned_about(tmp_path, monkeypatch, caplog):
    from galore_train import storage
    from galore_train.config import TrainConfig
    from galore_train.model import build_model, load_model_config

    cfg = TrainConfig(model="llama_9m", num_training_steps=1)
    model_config = load_model_config(cfg.model)
    model = build_model(model_config, 0, torch.float32)
    one = storage.checkpoint_bytes(cfg, model_config, model, torch.float32)
    params = sum(p.numel() for p in model.parameters())
    assert one == pytest.approx(3 * 4 * params, rel=1e-4)  # fp32 weights + AdamW's two moments (+ step counts)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(storage.shutil, "disk_usage", lambda _: usage._replace(free=2 * one))
    storage.warn_if_too_small(tmp_path / "checkpoints", cfg, model_config, model, torch.float32)
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "a save needs room for 3 more (keep-last 2, plus the one being written)" in warning
    monkeypatch.setattr(storage.shutil, "disk_usage", lambda _: usage._replace(free=3 * one))
    caplog.clear()
    storage.warn_if_too_small(tmp_path / "checkpoints", cfg, model_config, model, torch.float32)
    assert not caplog.records


# --- changed data on resume ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, named",
    [
        ({"data_files": EVAL_FILES}, "data_files: "),
        ({"tokenizer": "t5-base"}, "tokenizer: "),
        ({"max_length": 32}, "max_length: 64 -> 32"),
        ({"pack": True}, "pack: False -> True"),
    ],
)
def test_resume_with_other_data_is_refused_in_one_line(change, named, copy, config_file, capsys):
    code, err = pretrain(capsys, copy, config_file, resume=True, **change)
    assert code == 2
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert f"with different training data ({named}" in line and "--allow-data-change" in line


def test_allow_data_change_restarts_the_data_position(copy, config_file):
    from galore_train.config import TrainConfig
    from galore_train.train import Trainer

    values = tiny_run_args(config_file, copy, resume=True, data_files=EVAL_FILES, allow_data_change=True)
    trainer = Trainer(TrainConfig(**values))
    try:
        assert trainer.step == 6 and trainer.data_restarts
        assert trainer.train_stream.state_dict()["documents_read"] == 0  # the new data from its beginning
    finally:
        trainer.train_stream.close()


# --- metrics.jsonl after a crash -------------------------------------------------------------------


@pytest.mark.slow
def test_a_partial_metrics_line_is_dropped_before_the_resume_appends(copy, straight, config_file, capsys):
    # A crash during step 5's record: its line half-written, step 6 never saved.
    shutil.rmtree(copy / "checkpoints" / STEP_6)
    (copy / "checkpoints" / "latest").write_text(STEP_6 + "\n")
    text = (copy / "metrics.jsonl").read_text()
    cut = text.index('{"loss"', text.index('"step": 4'))
    (copy / "metrics.jsonl").write_text(text[: cut + 20])
    code, err = pretrain(capsys, copy, config_file, resume=True)
    assert code == 0, err
    assert losses(copy) == losses(straight)  # every line readable, no step twice


def test_report_survives_bad_lines(copy):
    with open(copy / "metrics.jsonl", "ab") as handle:
        handle.write(b'{"step": "x", "loss": 1.0}\n{"step": NaN, "loss": 1.0}\n\xff\xfe garbage\n{"step": 9, "lo')
    run = load_run(copy)
    assert run.steps_done == 6 and run.status == "finished"


# --- several processes reach one decision ----------------------------------------------------------

WORKER = """
import json, sys
from pathlib import Path
from galore_train import distributed, resume
from galore_train.errors import UserError
env = distributed.setup(1.0)
decisions = []
for folder in sys.argv[1:]:
    try:
        decisions.append(resume._newest_intact_everywhere(Path(folder) / f"rank{env.rank}", env).name)
    except UserError as err:
        decisions.append(f"error: {err}")
print(json.dumps(decisions))
distributed.teardown()
"""


def two_ranks(*folders: Path) -> list[list[str]]:
    """What each of two gloo processes decides for each folder (one launch: each costs ~1 min here)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}
    env["MASTER_PORT"] = str(29500 + os.getpid() % 1000)
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, *map(str, folders)],
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [process.communicate(timeout=300) for process in processes]
    assert all(process.returncode == 0 for process in processes), outputs
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]


def node_local_checkpoints(folder: Path) -> Path:
    """Checkpoints 3 and 6 in a folder per rank, as node-local output folders would hold them."""
    for rank in (0, 1):
        for step in (3, 6):
            state = {"step": step}
            checkpoint.save_checkpoint(
                folder / f"rank{rank}", step, lambda d, s=state: checkpoint.save_trainer_state(d, s, [{}]), 2
            )
    return folder


@pytest.mark.slow
def test_every_rank_takes_the_same_checkpoint_when_one_rank_sees_damage(tmp_path):
    """Rank 1's copy of the newest checkpoint is cut short, rank 0's is intact: both take the older one.
    When the older one is damaged on rank 0 as well, both stop with the same one-line error."""
    one_damaged = node_local_checkpoints(tmp_path / "one")
    truncate(one_damaged / "rank1" / STEP_6 / "trainer_state.pt")
    all_damaged = node_local_checkpoints(tmp_path / "all")
    truncate(all_damaged / "rank1" / STEP_6 / "trainer_state.pt")
    truncate(all_damaged / "rank0" / STEP_3 / "data_state.json")
    rank0, rank1 = two_ranks(one_damaged, all_damaged)
    assert rank0[0] == rank1[0] == STEP_3
    assert rank1[1].replace(f"{all_damaged / 'rank1'} (", f"{all_damaged / 'rank0'} (") == rank0[1]  # own folder
    assert rank0[1].startswith("error: no intact checkpoint") and "rank 0: data_state.json" in rank0[1]
