"""End-to-end training on the real C4 shards with a tiny LLaMA (fp32, CPU)."""

import json
import signal
from pathlib import Path

import pytest
import torch
from conftest import TINY_LLAMA, tiny_run_args
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import galore_train.train as train_module
from galore_train.config import TrainConfig
from galore_train.errors import TrainingStopped, UserError
from galore_train.memory.meter import GIB
from galore_train.train import Trainer


def run(config_file, output_dir, **overrides):
    return Trainer(TrainConfig(**tiny_run_args(config_file, output_dir, **overrides))).run()


def records(output_dir):
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def final_weights(output_dir):
    latest = (Path(output_dir) / "checkpoints" / "latest").read_text().strip()
    return load_file(str(Path(output_dir) / "checkpoints" / latest / "model.safetensors"))


def interrupt_after(monkeypatch, step):
    """Deliver a real SIGINT (Ctrl-C) to this process right after optimizer step `step`."""
    original = Trainer._train_step

    def step_then_interrupt(self):
        record = original(self)
        if self.step == step:
            signal.raise_signal(signal.SIGINT)
        return record

    monkeypatch.setattr(Trainer, "_train_step", step_then_interrupt)


def test_run_logs_metrics_and_saves_loadable_checkpoints(tiny_config_file, tmp_path, shared_data):
    summary = run(tiny_config_file, tmp_path / "run")
    logged = records(tmp_path / "run")
    steps = [r for r in logged if "loss" in r]
    evals = [r for r in logged if "val_loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in evals] == [0, 3, 6]
    for key in ("lr", "tokens_seen", "tokens_per_second", "peak_memory_gb"):
        assert key in steps[-1]
    assert steps[-1]["tokens_seen"] == summary["tokens_seen"] > 0
    assert summary["val_perplexity"] == pytest.approx(evals[-1]["val_perplexity"])
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["steps"] == 6
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*"))
    assert checkpoints == ["step_00000003", "step_00000006"]
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "run" / "checkpoints" / "step_00000006"))
    assert model.config.hidden_size == 64


def test_ctrl_c_saves_and_resume_is_bit_exact(tiny_config_file, tmp_path, monkeypatch, shared_data):
    run(tiny_config_file, tmp_path / "straight", num_training_steps=8, save_every=100, eval_every=100)

    interrupt_after(monkeypatch, 4)
    with pytest.raises(TrainingStopped, match="SIGINT: stopped after step 4; checkpoint saved") as stopped:
        run(tiny_config_file, tmp_path / "split", num_training_steps=8, save_every=100, eval_every=100)
    assert stopped.value.exit_code == 128 + signal.SIGINT
    assert "checkpoint saved" in str(stopped.value)
    monkeypatch.undo()
    run(tiny_config_file, tmp_path / "split", num_training_steps=8, save_every=100, eval_every=100, resume=True)

    straight = [r["loss"] for r in records(tmp_path / "straight") if "loss" in r]
    split = [r["loss"] for r in records(tmp_path / "split") if "loss" in r]
    assert split == straight  # bit-identical losses, step by step
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "split")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_accumulation_matches_the_full_batch(tiny_config_file, tmp_path, shared_data):
    # fp32 sums in another order differ by ~1e-9. Adam at eps 1e-8 turns that into a sizeable part of lr (3e-3) for
    # gradient elements near 1e-8 (seen: 3.1e-5 apart after 2 steps, which elements depends on the initial weights);
    # at eps 1e-6 such an element moves by ~lr * 1e-3, so the 1e-5 bound tests the accumulation, not Adam's eps.
    settings = {"num_training_steps": 2, "shuffle_buffer": 0, "eps": 1e-6}
    run(tiny_config_file, tmp_path / "full", batch_size=8, **settings)
    run(tiny_config_file, tmp_path / "accum", batch_size=4, total_batch_size=8, **settings)
    full = [r["loss"] for r in records(tmp_path / "full") if "loss" in r]
    accum = [r["loss"] for r in records(tmp_path / "accum") if "loss" in r]
    assert accum == pytest.approx(full, rel=1e-5)
    a, b = final_weights(tmp_path / "full"), final_weights(tmp_path / "accum")
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-5, worst


def nan_loss_at_step(monkeypatch, step):
    """Make the training loss NaN during optimizer step `step` (1-based), as a diverging run would."""
    original_loss, original_step = train_module.summed_loss, Trainer._train_step
    current = {"step": 0}

    def counting(self):
        current["step"] = self.step + 1
        return original_step(self)

    def poisoned(model, batch):
        loss = original_loss(model, batch)
        return loss * float("nan") if current["step"] == step else loss

    monkeypatch.setattr(Trainer, "_train_step", counting)
    monkeypatch.setattr(train_module, "summed_loss", poisoned)


def test_nan_loss_stops_without_touching_the_last_good_checkpoint(tiny_config_file, tmp_path, monkeypatch, shared_data):
    nan_loss_at_step(monkeypatch, 5)
    with pytest.raises(
        TrainingStopped, match="loss became nan at step 5; last good checkpoint: .*step_00000004"
    ) as stopped:
        run(tiny_config_file, tmp_path / "run", save_every=2)
    assert stopped.value.exit_code == 3
    weights = final_weights(tmp_path / "run")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_skip_nonfinite_skips_the_update_and_counts_it(tiny_config_file, tmp_path, monkeypatch, shared_data):
    nan_loss_at_step(monkeypatch, 2)
    summary = run(tiny_config_file, tmp_path / "run", skip_nonfinite=True)
    assert summary["skipped_steps"] == 1 and summary["steps"] == 6
    assert all(torch.isfinite(w).all() for w in final_weights(tmp_path / "run").values())


def test_existing_run_needs_resume(tiny_config_file, tmp_path, shared_data):
    run(tiny_config_file, tmp_path / "run", num_training_steps=1)
    with pytest.raises(UserError, match="already holds a run: pass --resume"):
        run(tiny_config_file, tmp_path / "run", num_training_steps=1)


def test_resume_refuses_a_different_state_layout_and_applies_warned_changes(
    tiny_config_file, tmp_path, caplog, shared_data
):
    galore = dict(
        optimizer="galore_adamw",
        rank=8,
        gap=2,
        num_training_steps=2,
        save_every=1,
        eval_every=100,
        scheduler="constant",
        warmup_steps=0,
    )
    run(tiny_config_file, tmp_path / "run", **galore)
    with pytest.raises(UserError, match=r"cannot resume .*step_00000002 with a different rank: 8 -> 4"):
        run(tiny_config_file, tmp_path / "run", **{**galore, "rank": 4, "num_training_steps": 3}, resume=True)
    with caplog.at_level("WARNING", logger="galore_train.resume"):
        summary = run(
            tiny_config_file,
            tmp_path / "run",
            **{**galore, "lr": 1e-3, "gap": 5, "num_training_steps": 3, "save_every": 7},
            resume=True,
        )
    assert summary["steps"] == 3
    changed = [r.getMessage() for r in caplog.records if "changed since the checkpoint" in r.getMessage()]
    assert len(changed) == 1 and "lr: 0.003 -> 0.001" in changed[0] and "num_training_steps: 2 -> 3" in changed[0]
    assert "save_every" not in changed[0], "run-control settings change freely"
    lrs = [r["lr"] for r in records(tmp_path / "run") if "loss" in r]
    assert lrs == [3e-3, 3e-3, 1e-3], (
        "the changed lr takes effect (the checkpoint's optimizer state carried the old one)"
    )


def test_resume_compares_the_model_as_built_not_as_spelled(tiny_config_file, tmp_path, shared_data):
    """Another path to the same architecture resumes; the same path edited to another architecture, or
    another dtype (`--dtype auto` on another device), is refused in one line instead of crashing mid-step."""
    args = dict(optimizer="galore_adamw", rank=8, gap=2, num_training_steps=1, save_every=1, eval_every=100)
    run(tiny_config_file, tmp_path / "run", **args)
    same_architecture = tmp_path / "renamed.json"
    same_architecture.write_text(Path(tiny_config_file).read_text())
    assert run(str(same_architecture), tmp_path / "run", **{**args, "num_training_steps": 2}, resume=True)["steps"] == 2
    with pytest.raises(UserError, match=r"with a different dtype: float32 -> bfloat16 \(its saved state"):
        run(str(same_architecture), tmp_path / "run", **{**args, "num_training_steps": 3, "dtype": "bf16"}, resume=True)
    edited = json.loads(same_architecture.read_text())
    same_architecture.write_text(json.dumps({**edited, "hidden_size": 2 * edited["hidden_size"]}))
    with pytest.raises(
        UserError, match=rf"with a different model: hidden_size {edited['hidden_size']} -> {2 * edited['hidden_size']}"
    ):
        run(str(same_architecture), tmp_path / "run", **{**args, "num_training_steps": 3}, resume=True)


def test_resume_accepts_another_spelling_of_the_same_optimizer(tiny_config_file, tmp_path, shared_data):
    run(tiny_config_file, tmp_path / "run", optimizer="adam8bit", num_training_steps=1, save_every=1, eval_every=100)
    summary = run(
        tiny_config_file,
        tmp_path / "run",
        optimizer="adamw",
        eightbit=True,
        num_training_steps=2,
        eval_every=100,
        resume=True,
    )
    assert summary["steps"] == 2


def test_total_batch_must_divide(tiny_config_file, tmp_path):
    with pytest.raises(UserError, match="--total-batch-size 10 is not a multiple of --batch-size 4"):
        run(tiny_config_file, tmp_path / "run", total_batch_size=10)


@pytest.mark.parametrize("mode", ["offline", "disabled"])
def test_wandb_modes(tiny_config_file, tmp_path, mode, shared_data):
    summary = run(tiny_config_file, tmp_path / "run", num_training_steps=2, wandb_mode=mode)
    offline_runs = (
        list((tmp_path / "run" / "wandb").glob("offline-run-*")) if (tmp_path / "run" / "wandb").exists() else []
    )
    assert (len(offline_runs) == 1) == (mode == "offline")
    assert summary["steps"] == 2


def test_wandb_outage_warns_once_and_training_continues(tiny_config_file, tmp_path, monkeypatch, caplog, shared_data):
    import wandb

    def outage(*args, **kwargs):
        raise ConnectionError("api.wandb.ai unreachable")

    monkeypatch.setattr(wandb, "init", outage)
    summary = run(tiny_config_file, tmp_path / "run", num_training_steps=2, wandb_mode="online")
    assert summary["steps"] == 2
    warnings = [r for r in caplog.records if "W&B logging is off" in r.getMessage()]
    assert len(warnings) == 1 and "unreachable" in warnings[0].getMessage()


class _FlakyWandbRun:
    """A W&B run whose connection drops after its first `log`: every later call raises."""

    id = "flaky"

    def __init__(self) -> None:
        self.logged: list[dict] = []
        self.summary = self

    def log(self, record: dict, step=None) -> None:
        if self.logged:
            raise ConnectionError("api.wandb.ai connection reset")
        self.logged.append(record)

    def update(self, summary: dict) -> None:
        raise ConnectionError("api.wandb.ai connection reset")

    def finish(self) -> None:
        raise ConnectionError("api.wandb.ai connection reset")


def test_wandb_outage_mid_run_warns_once_and_metrics_stay_complete(
    tiny_config_file, tmp_path, monkeypatch, caplog, shared_data
):
    import wandb

    flaky = _FlakyWandbRun()
    monkeypatch.setattr(wandb, "init", lambda *args, **kwargs: flaky)
    summary = run(tiny_config_file, tmp_path / "run", num_training_steps=6, wandb_mode="online")
    assert summary["steps"] == 6
    assert len(flaky.logged) == 1  # W&B took the first record, then went down
    warnings = [r for r in caplog.records if "W&B logging is off" in r.getMessage()]
    assert len(warnings) == 1 and "connection reset" in warnings[0].getMessage()
    logged = records(tmp_path / "run")
    assert [r["step"] for r in logged if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in logged if "val_loss" in r] == [0, 3, 6]
    assert (tmp_path / "run" / "summary.json").exists()


@pytest.mark.slow
def test_two_hundred_steps_on_real_c4_lower_perplexity(tmp_path, shared_data):
    """llama_9m, 200 steps x 8 sequences x 128 tokens of real C4 (~150k non-pad tokens)."""
    summary = run(
        "llama_9m",
        tmp_path / "run",
        max_length=128,
        batch_size=8,
        num_training_steps=200,
        eval_every=200,
        save_every=200,
        eval_tokens=20_000,
        lr=3e-3,
        shuffle_buffer=1000,
    )
    evals = [r for r in records(tmp_path / "run") if "val_perplexity" in r]
    start, end = evals[0]["val_perplexity"], evals[-1]["val_perplexity"]
    print(f"val perplexity step 0: {start:.1f}, step 200: {end:.1f}; tokens seen {summary['tokens_seen']:,}")
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 200
    assert end < start / 20  # from ~32k (uniform over the vocab) to a few hundred


def test_the_logged_lr_is_the_one_the_step_used(tiny_config_file, tmp_path, shared_data):
    """Read before the schedule steps: step 1 of a cosine schedule without warm-up runs at the peak lr."""
    run(tiny_config_file, tmp_path / "run", num_training_steps=3, warmup_steps=0, scheduler="cosine", min_lr_ratio=0.1)
    logged = [r["lr"] for r in records(tmp_path / "run") if "loss" in r]
    assert logged[0] == 3e-3 and logged[0] > logged[1] > logged[2] > 3e-4


def test_evaluation_batches_do_not_shrink_with_the_micro_batch(tiny_config_file, tmp_path, shared_data):
    """A 7B run's micro-batch 1 used to mean single-sequence evaluation forwards (~40,000 per 10M-token eval)."""
    trainer = Trainer(TrainConfig(**tiny_run_args(tiny_config_file, tmp_path / "one", batch_size=1)))
    sizes = [len(batch["input_ids"]) for batch in trainer.eval_batches]
    assert sizes[0] == train_module.eval_batch_size(trainer.cfg) == 16 and max(sizes) == 16
    wide = TrainConfig(**tiny_run_args(tiny_config_file, tmp_path / "wide", batch_size=64))
    assert train_module.eval_batch_size(wide) == 64  # never below the training micro-batch
    assert train_module.eval_batch_size(wide.replace(eval_batch_size=4)) == 4  # the flag wins


def test_the_memory_of_resuming_8bit_galore_is_measured_and_logged(tiny_config_file, tmp_path, shared_data):
    """The meter starts before the restore and its peaks are logged at start (restore_*). The 8-bit state is taken
    as loaded, never cast to bf16 first: beside the weights the restore holds only the one weight tensor being read
    (before the fix, torch's load made a bf16 copy of every state tensor at once)."""
    galore = dict(optimizer="galore_adamw", eightbit=True, rank=8, gap=2, dtype="bf16", save_every=2, eval_every=100)
    run(tiny_config_file, tmp_path / "run", num_training_steps=2, **galore)
    run(tiny_config_file, tmp_path / "run", num_training_steps=3, resume=True, **galore)
    (restore,) = [r for r in records(tmp_path / "run") if "restore_peak_memory_gb" in r]
    assert restore["step"] == 2
    largest = TINY_LLAMA["vocab_size"] * TINY_LLAMA["hidden_size"] * 2  # the embedding (and lm_head), bf16
    weights = restore["restore_peak_weights_gb"] * GIB
    assert weights >= 2 * largest and restore["restore_peak_memory_gb"] * GIB <= weights + largest
