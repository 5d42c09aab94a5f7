"""`galore-train report`: tables, CSV and plots from synthetic run directories laid out as
`galore-train pretrain` writes them (metrics.jsonl, summary.json, checkpoints/step_*/train_config.json)."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import pytest

from galore_train.config import TrainConfig
from galore_train.errors import UserError
from galore_train.reporting.report import report
from galore_train.reporting.runs import load_run, method_label

GIB = 2**30
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_run(
    root: Path,
    name: str,
    *,
    optimizer: str = "adamw",
    seed: int = 0,
    lr: float = 0.001,
    model: str = "llama_9m",
    final_ppl: float = 600.0,
    steps: int = 100,
    done: int | None = None,
    dtype: str = "fp32",
    rank: int = 64,
    weights_gb: float = 0.034,
    optimizer_gb: float = 0.067,
    data_wait: float | None = None,
    comm_bytes: float | None = None,
    reserved_gb: float | None = None,
    **settings,
) -> Path:
    """A run directory of `done` of `steps` steps (finished when done == steps): step records every
    step with memory readings, evals every 50 steps ending at `final_ppl`, a checkpoint at the end."""
    done = steps if done is None else done
    run_dir = root / name
    (run_dir / "checkpoints" / f"step_{done:08d}").mkdir(parents=True)
    config = TrainConfig(
        model=model,
        optimizer=optimizer,
        seed=seed,
        lr=lr,
        rank=rank,
        dtype=dtype,
        num_training_steps=steps,
        batch_size=8,
        total_batch_size=8,
        max_length=128,
        **settings,
    )
    config.save(str(run_dir / "checkpoints" / f"step_{done:08d}" / "train_config.json"))
    records = [
        {"step": 0, "tokens_seen": 0, "val_loss": math.log(32000), "val_perplexity": 32000.0, "val_tokens": 16384}
    ]
    for step in range(1, done + 1):
        # Memory readings vary by window; the report must take the highest of each part.
        wobble = 1.0 if step == done // 2 else 0.9
        records.append(
            {
                "loss": 9.0 - step / 100,
                "step_tokens": 1024,
                "step": step,
                "lr": lr,
                "tokens_seen": 1024 * step,
                "tokens_per_second": 1000.0 + step,
                "epoch": 0,
                "skipped_steps": 0,
                "peak_memory_gb": 0.5 * wobble,
                "peak_weights_gb": weights_gb * wobble,
                "peak_grads_gb": 0.05 * wobble,
                "peak_optimizer_state_gb": optimizer_gb * wobble,
                "peak_other_gb": 0.3 * wobble,
                **({} if data_wait is None else {"data_wait_seconds": data_wait * (2 if step % 2 else 0)}),
                **({} if comm_bytes is None else {"comm_bytes": comm_bytes * (4 if step % 4 == 1 else 1)}),
                **({} if reserved_gb is None else {"peak_reserved_gb": reserved_gb * wobble}),  # CUDA runs log it
            }
        )
        if step % 50 == 0:
            ppl = final_ppl * (1 + (done - step) / done) if done == steps else final_ppl
            records.append(
                {
                    "step": step,
                    "tokens_seen": 1024 * step,
                    "val_loss": math.log(ppl),
                    "val_perplexity": ppl,
                    "val_tokens": 16384,
                }
            )
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if done == steps:
        resolved = {"fp32": "float32", "bf16": "bfloat16", "auto": "float32"}[dtype]  # as the trainer writes it
        summary = {
            "run_name": name,
            "model": model,
            "optimizer": optimizer,
            "dtype": resolved,
            "steps": steps,
            "tokens_seen": 1024 * steps,
            "epochs": 0,
            "skipped_steps": 0,
            "val_loss": math.log(final_ppl),
            "val_perplexity": final_ppl,
            "val_tokens": 16384,
        }
        (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


def table_row(markdown: str, section: str, label: str) -> list[str]:
    """The cells of the row starting with `label` in the table under `## section`."""
    text = markdown.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] == label:
            return cells[1:]
    raise AssertionError(f"no row {label!r} in section {section!r}:\n{text}")


def test_seeds_share_a_cell_with_mean_and_spread(tmp_path: Path) -> None:
    runs = [
        write_run(tmp_path, "full-s0", seed=0, final_ppl=620.0),
        write_run(tmp_path, "full-s1", seed=1, final_ppl=630.0),
        write_run(tmp_path, "galore-s0", optimizer="galore_adamw", lr=0.01, final_ppl=640.0),
    ]
    text = report(runs)
    assert table_row(text, "Validation perplexity", "Full-Rank") == ["625.0 ±5.0 (n=2)"]
    assert table_row(text, "Validation perplexity", "GaLore") == ["640.0 (n=1)"]
    assert table_row(text, "Validation perplexity", "Training tokens") == ["102.4K"]
    assert table_row(text, "Relative to Full-Rank", "GaLore")[0] == f"{640 / 625 - 1:+.1%}"
    assert table_row(text, "Relative to Full-Rank", "GaLore")[1] == "+2.4% / +1.1% / +0.8% / +0.5%"  # the paper's


def test_settings_other_than_the_seed_make_separate_rows(tmp_path: Path) -> None:
    runs = [write_run(tmp_path, "a", lr=0.01, final_ppl=700.0), write_run(tmp_path, "b", lr=0.001, final_ppl=650.0)]
    text = report(runs)
    assert table_row(text, "Validation perplexity", "Full-Rank (lr 0.01)") == ["700.0 (n=1)"]
    assert table_row(text, "Validation perplexity", "Full-Rank (lr 0.001)") == ["650.0 (n=1)"]


def test_rank_does_not_split_full_rank_runs(tmp_path: Path) -> None:
    runs = [
        write_run(tmp_path, "a", rank=128, final_ppl=600.0),
        write_run(tmp_path, "b", seed=1, rank=256, final_ppl=610.0),
    ]
    text = report(runs)
    assert table_row(text, "Validation perplexity", "Full-Rank") == ["605.0 ±5.0 (n=2)"]
    assert table_row(text, "Runs", str(runs[0]))[5] == "—"  # rank: not a setting of full-rank AdamW


def test_apollo_mini_reports_the_rank_it_uses(tmp_path: Path) -> None:
    """APOLLO-Mini runs at rank 1 whatever --rank said: the Runs table and the CSV show 1, and two runs that
    differ in --rank only are the same experiment (one row)."""
    runs = [
        write_run(tmp_path, "a", optimizer="apollo_mini", rank=128, final_ppl=600.0),
        write_run(tmp_path, "b", optimizer="apollo_mini", seed=1, rank=64, final_ppl=610.0),
        write_run(tmp_path, "c", optimizer="apollo_adamw", rank=64, final_ppl=620.0),
    ]
    text = report(runs)
    assert [table_row(text, "Runs", str(run))[5] for run in runs] == ["1", "1", "64"]
    assert table_row(text, "Validation perplexity", "APOLLO-Mini") == ["605.0 ±5.0 (n=2)"]
    rows = list(csv.DictReader(io.StringIO(report(runs, csv=True))))
    assert [row["rank"] for row in rows] == ["1", "1", "64"]


@pytest.mark.parametrize(
    "optimizer, settings, rows",
    [
        ("fira_adamw", {"fira_residual": "paper"}, ["Fira (fira residual code)", "Fira (fira residual paper)"]),
        ("apollo_adamw", {"apollo_proj": "svd"}, ["APOLLO (apollo proj random)", "APOLLO (apollo proj svd)"]),
        ("apollo_adamw", {"apollo_scale": 2.0}, ["APOLLO (apollo scale None)", "APOLLO (apollo scale 2.0)"]),
        (
            "apollo_mini",
            {"norm_growth_limit": 0},
            ["APOLLO-Mini (norm growth limit None)", "APOLLO-Mini (norm growth limit 0)"],
        ),
        ("apollo_mini", {"apollo_scale_type": "tensor"}, ["APOLLO-Mini"]),  # always tensor-wise: the same experiment
        ("galore_adamw", {"apollo_proj": "svd", "fira_residual": "paper", "norm_growth_limit": 2.0}, ["GaLore"]),
        ("muon", {"norm_growth_limit": 2.0, "apollo_scale": 2.0}, ["Muon"]),
    ],
)
def test_an_optimizers_own_settings_split_only_its_runs(tmp_path: Path, optimizer, settings, rows) -> None:
    runs = [
        write_run(tmp_path, "a", optimizer=optimizer, final_ppl=600.0),
        write_run(tmp_path, "b", optimizer=optimizer, seed=1, final_ppl=610.0, **settings),
    ]
    text = report(runs).split("## Validation perplexity\n", 1)[1].split("\n## ", 1)[0]
    labels = [line.strip("|").split("|")[0].strip() for line in text.splitlines() if line.startswith("|")][2:]
    assert sorted(label for label in labels if label != "Training tokens") == sorted(rows)


def test_paper_sizes_show_the_paper_value(tmp_path: Path) -> None:
    text = report([write_run(tmp_path, "r", model="llama_60m", optimizer="galore_adamw", rank=128, final_ppl=35.1)])
    assert table_row(text, "Validation perplexity", "GaLore") == ["35.10 (n=1) [paper 34.88]"]


def test_unfinished_and_missing_runs_are_marked(tmp_path: Path) -> None:
    finished = write_run(tmp_path, "done", final_ppl=600.0)
    running = write_run(tmp_path, "running", optimizer="lora", done=50, final_ppl=900.0)
    with open(running / "metrics.jsonl", "a") as f:
        f.write('{"loss": 8.1, "step": 51, "tokens_se')  # the line being written right now
    empty = tmp_path / "empty"
    empty.mkdir()
    text = report([finished, running, tmp_path / "never-started", empty])
    assert table_row(text, "Validation perplexity", "LoRA") == ["unfinished (step 50/100), ppl 900.0"]
    assert table_row(text, "Runs", str(running))[0] == "unfinished (step 50/100)"
    assert table_row(text, "Runs", str(tmp_path / "never-started"))[0] == "missing"
    assert table_row(text, "Runs", str(empty))[0] == "missing"
    assert table_row(text, "Validation perplexity", "Full-Rank") == ["600.0 (n=1)"]


def test_a_finished_and_an_unfinished_seed(tmp_path: Path) -> None:
    runs = [write_run(tmp_path, "s0", final_ppl=600.0), write_run(tmp_path, "s1", seed=1, done=50)]
    assert table_row(report(runs), "Validation perplexity", "Full-Rank") == ["600.0 (n=1, +1 unfinished)"]


def test_memory_measured_and_estimated(tmp_path: Path) -> None:
    from galore_train.memory.estimate import estimate_memory
    from galore_train.model import load_model_config

    run = write_run(tmp_path, "galore", optimizer="galore_adamw", lr=0.01, weights_gb=0.25, optimizer_gb=0.5)
    rows = list(csv.DictReader(io.StringIO(report([run], csv=True))))
    expected = estimate_memory(load_model_config("llama_9m"), "galore_adamw", 64, dtype="fp32")
    # GaLore's projection matrices sit in the optimizer state, where the meter counts them as well
    as_measured = expected.weights + expected.optimizer_states + expected.projections
    assert expected.projections > 0
    assert float(rows[0]["est_weights_and_states_gb"]) == pytest.approx(as_measured / GIB, rel=1e-12)
    assert float(rows[0]["peak_weights_gb"]) == pytest.approx(0.25)  # the highest window, not the last
    assert float(rows[0]["peak_optimizer_state_gb"]) == pytest.approx(0.5)
    cell = table_row(report([run]), "Memory", "GaLore")[0]
    assert cell.startswith("768.0 MiB · est ") and cell.endswith(" · peak 512.0 MiB")


def test_reserved_memory_is_shown_beside_the_allocated_peak(tmp_path: Path) -> None:
    """CUDA runs log the allocator's reserved bytes (what must fit on the card) beside the allocated peak."""
    gpu, cpu = write_run(tmp_path, "gpu", reserved_gb=1.5), write_run(tmp_path, "cpu")  # CPU runs log none
    markdown = report([gpu, cpu], csv=False)
    header = table_row(markdown, "Runs", "Run")
    reserved = header.index("Reserved")
    assert header[reserved - 1] == "Peak"
    assert table_row(markdown, "Runs", str(gpu))[reserved - 1 : reserved + 1] == ["512.0 MiB", "1.50 GiB"]
    assert table_row(markdown, "Runs", str(cpu))[reserved] == "—"
    rows = list(csv.DictReader(io.StringIO(report([gpu, cpu], csv=True))))
    assert float(rows[0]["peak_reserved_gb"]) == 1.5 and rows[1]["peak_reserved_gb"] == ""


def test_the_estimate_follows_apollos_stored_projection(tmp_path: Path) -> None:
    from galore_train.memory.estimate import estimate_memory
    from galore_train.model import load_model_config

    run = write_run(tmp_path, "apollo", optimizer="apollo_adamw", apollo_proj="svd", norm_growth_limit=0)
    rows = list(csv.DictReader(io.StringIO(report([run], csv=True))))
    expected = estimate_memory(
        load_model_config("llama_9m"), "apollo_adamw", 64, dtype="fp32", apollo_proj="svd", norm_growth_limit=0
    )
    assert expected.projections > 0
    as_measured = expected.weights + expected.optimizer_states + expected.projections
    assert float(rows[0]["est_weights_and_states_gb"]) == pytest.approx(as_measured / GIB, rel=1e-12)


def test_dtype_auto_is_estimated_with_the_dtype_the_run_resolved(tmp_path: Path) -> None:
    from galore_train.memory.estimate import estimate_memory
    from galore_train.model import load_model_config

    finished = write_run(tmp_path, "auto", dtype="auto")
    expected = estimate_memory(load_model_config("llama_9m"), "adamw", 64, dtype="fp32")
    rows = list(csv.DictReader(io.StringIO(report([finished], csv=True))))
    assert float(rows[0]["est_weights_and_states_gb"]) == pytest.approx(
        (expected.weights + expected.optimizer_states) / GIB
    )
    unfinished = write_run(tmp_path, "auto-running", dtype="auto", done=50)  # no summary yet: the device is unknown
    assert " est — " in table_row(report([unfinished]), "Memory", "Full-Rank")[0]


def test_csv_beside_the_markdown_and_on_its_own(tmp_path: Path) -> None:
    runs = [write_run(tmp_path, "a", final_ppl=610.0), tmp_path / "missing"]
    output = tmp_path / "out" / "table.md"
    markdown = report(runs, output=output, csv=True)
    assert output.read_text() == markdown
    rows = list(csv.DictReader(io.StringIO(output.with_suffix(".csv").read_text())))
    assert [r["status"] for r in rows] == ["finished", "missing"]
    assert float(rows[0]["val_perplexity"]) == 610.0 and rows[0]["method"] == "Full-Rank" and rows[0]["steps"] == "100"
    assert float(rows[0]["tokens_per_second"]) == pytest.approx(1050.5)  # median of the step windows
    assert report(runs, csv=True).splitlines()[0].startswith("source,status,model,method")


def test_the_data_wait_is_shown_as_a_share_of_the_step_time(tmp_path: Path) -> None:
    waiting, older = write_run(tmp_path, "waiting", data_wait=0.01), write_run(tmp_path, "older")  # older: no field
    steps = sum(1024 / (1000.0 + step) for step in range(1, 101))  # seconds: step tokens / tokens per second
    share = 100 * 0.01 / steps  # 0.02 s every second step
    markdown = report([waiting, older], csv=False)
    assert table_row(markdown, "Runs", str(waiting))[-1] == f"{share:.2%}" != "0.00%"
    assert table_row(markdown, "Runs", str(older))[-1] == "—"
    rows = list(csv.DictReader(io.StringIO(report([waiting, older], csv=True))))
    assert float(rows[0]["data_wait_share"]) == pytest.approx(share) and rows[1]["data_wait_share"] == ""


def test_the_gradient_bytes_sent_per_step_are_the_mean_of_the_logged_steps(tmp_path: Path) -> None:
    """comm_bytes (torchrun runs): a refresh step every 4th sends 4x; the report shows the mean per step."""
    synced, single = write_run(tmp_path, "synced", comm_bytes=2**20), write_run(tmp_path, "single")
    markdown = report([synced, single], csv=False)
    assert table_row(markdown, "Runs", str(synced))[-2] == "1.8 MiB"  # (4 + 3) / 4 MiB
    assert table_row(markdown, "Runs", str(single))[-2] == "—"
    rows = list(csv.DictReader(io.StringIO(report([synced, single], csv=True))))
    assert float(rows[0]["comm_bytes"]) == 1.75 * 2**20 and rows[1]["comm_bytes"] == ""


def test_plots_are_valid_pngs(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    runs = [
        write_run(tmp_path, "full", final_ppl=600.0),
        write_run(tmp_path, "galore", optimizer="galore_adamw", final_ppl=610.0),
        write_run(tmp_path, "lora", optimizer="lora", done=50),
    ]
    output = tmp_path / "report.md"
    text = report(runs, output=output, plots_dir=tmp_path / "plots")
    for name in ("val_perplexity.png", "memory.png"):
        path = tmp_path / "plots" / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        height, width, _ = plt.imread(path).shape
        assert height > 100 and width > 100
        assert f"](plots/{name})" in text  # linked relative to the report


def test_no_plots_without_data(tmp_path: Path) -> None:
    text = report([tmp_path / "missing"], plots_dir=tmp_path / "plots")
    assert not (tmp_path / "plots").exists() and "## Plots" not in text


def test_resumed_run_keeps_the_last_eval_of_a_step(tmp_path: Path) -> None:
    run = write_run(tmp_path, "r", final_ppl=600.0)
    with open(run / "metrics.jsonl", "a") as f:  # a resume re-logged step 100's eval; NaN readings are ignored
        f.write(json.dumps({"step": 100, "tokens_seen": 102400, "val_loss": 6.0, "val_perplexity": 590.0}) + "\n")
        f.write(json.dumps({"loss": "nan", "step": 100, "peak_memory_gb": "nan"}) + "\n")
    loaded = load_run(run)
    assert loaded.evals[-1] == (102400, 590.0) and len(loaded.evals) == 3
    assert loaded.peaks["memory"] == pytest.approx(0.5)


def edit_config(run: Path, **changes: object) -> None:
    for path in run.glob("checkpoints/step_*/train_config.json"):
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_total_steps_of_a_token_budget(tmp_path: Path) -> None:
    budget = write_run(tmp_path, "budget", done=50)
    edit_config(budget, num_training_steps=None, max_train_tokens="1M")  # total batch 8 x 128 tokens
    per_process = write_run(tmp_path, "per-process", done=50)  # total batch = batch size x the processes (unrecorded)
    edit_config(per_process, num_training_steps=None, max_train_tokens="1M", total_batch_size=None)
    text = report([budget, per_process])
    assert table_row(text, "Runs", str(budget))[0] == "unfinished (step 50/977)"
    assert table_row(text, "Runs", str(per_process))[0] == "unfinished (step 50)"


def test_a_run_before_its_first_checkpoint(tmp_path: Path) -> None:
    run = write_run(tmp_path, "early", done=10)
    checkpoint = run / "checkpoints" / "step_00000010"
    (checkpoint / "train_config.json").rename(run / "train_config.json")  # the copy a run writes when it starts
    checkpoint.rmdir()
    assert table_row(report([run]), "Runs", str(run))[:3] == ["unfinished (step 10/100)", "llama_9m", "Full-Rank"]


def test_the_config_of_the_checkpoint_latest_names(tmp_path: Path) -> None:
    """As a resume does: a run resumed from step 50 and saved again there continues from step 50."""
    run = write_run(tmp_path, "resumed-earlier")
    newest = json.loads((run / "checkpoints" / "step_00000100" / "train_config.json").read_text())
    (run / "checkpoints" / "step_00000050").mkdir()
    (run / "checkpoints" / "step_00000050" / "train_config.json").write_text(json.dumps({**newest, "lr": 0.002}))
    (run / "checkpoints" / "latest").write_text("step_00000050\n")
    assert load_run(run).config["lr"] == 0.002


def test_wandb_export(tmp_path: Path) -> None:
    export = tmp_path / "wandb.csv"
    export.write_text(
        "Name,State,model,optimizer,rank,lr,seed,dtype,num_training_steps,steps,val_perplexity,peak_memory_gb\n"
        "run-a,finished,llama_60m,adamw,128,0.001,0,bf16,10000,10000,34.5,0.9\n"
        "run-b,running,llama_60m,galore_adamw,128,0.01,0,bf16,10000,4000,48.0,0.7\n"
    )
    text = report([], wandb_csv=export)
    assert table_row(text, "Validation perplexity", "Full-Rank") == ["34.50 (n=1) [paper 34.06]"]
    assert table_row(text, "Validation perplexity", "GaLore") == ["unfinished (step 4000/10000), ppl 48.00"]


def test_nothing_to_report_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"give at least one run directory \(or --wandb-csv\)"):
        report([])
    with pytest.raises(UserError, match="cannot read W&B export .*nope.csv"):
        report([], wandb_csv=tmp_path / "nope.csv")


def test_cli_report_command(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from galore_train.cli import app

    run = write_run(tmp_path, "full", final_ppl=600.0)
    result = CliRunner().invoke(app, ["report", str(run), str(tmp_path / "missing")])
    assert result.exit_code == 0, result.output
    assert "| Full-Rank | 600.0 (n=1) |" in result.output and "missing" in result.output
    result = CliRunner().invoke(
        app, ["report", str(run), "--output", str(tmp_path / "t.md"), "--csv", "--plots-dir", str(tmp_path / "p")]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "t.csv").is_file() and (tmp_path / "p" / "memory.png").is_file()


def test_row_names_say_what_changes_a_runs_numbers() -> None:
    """Runs that differ in weight storage or accumulation must not share a row (results/mini_int8.md)."""
    base = {"optimizer": "galore_adamw"}
    assert method_label(base) == "GaLore"
    assert method_label({**base, "eightbit": True, "layerwise": True}) == "8-bit GaLore (layer-wise)"
    assert method_label({**base, "layerwise": True, "accumulate_projected": True}) == (
        "GaLore (layer-wise, projected accumulation)"
    )
    assert method_label({**base, "int8_weights": True, "int8_rounding": "stochastic"}) == "GaLore (INT8 weights)"
    assert method_label({**base, "int8_weights": True, "int8_rounding": "nearest"}) == "GaLore (INT8 weights, nearest)"
    assert method_label({"optimizer": "adamw", "stochastic_rounding": True}) == "Full-Rank (stochastic rounding)"
