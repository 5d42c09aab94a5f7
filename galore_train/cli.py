"""`galore-train` command line. `pretrain`'s flags, and `memory`'s training-setup flags, are generated from
TrainConfig's fields, so every option is declared once (config.py) with one default and one help text."""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import os
import sys
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from galore_train.config import ESTIMATE_OPTIONS, TrainConfig, flag
from galore_train.errors import TrainingStopped, UserError

if TYPE_CHECKING:
    from galore_train.implied import Resolved

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Pretrain LLaMA on C4 with GaLore and other memory-efficient optimizers.",
)
console = Console()
if not console.is_terminal:
    console.width = 140  # piped or logged: keep tables whole


def _config_parameters(names: Optional[tuple[str, ...]] = None) -> list[inspect.Parameter]:
    """One typer option per TrainConfig field (or per field in `names`), with its help text and section."""
    hints = typing.get_type_hints(TrainConfig)
    parameters = []
    for field in dataclasses.fields(TrainConfig):
        if names is not None and field.name not in names:
            continue
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        option = typer.Option(
            default,
            flag(field.name),
            help=field.metadata["help"],
            rich_help_panel=field.metadata["section"],
            show_default=default not in (None, [], False),
        )
        parameters.append(
            inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=hints[field.name])
        )
    return parameters


def _split_targets(values: dict[str, Any]) -> dict[str, Any]:
    """--galore-targets may be repeated or comma-separated."""
    return {
        **values,
        "galore_targets": [part for entry in values["galore_targets"] for part in entry.split(",") if part],
    }


def resolve_from_cli(values: dict[str, Any], context: typer.Context) -> Resolved:
    """The TrainConfig `pretrain` runs, with what the command line implies filled in (galore_train/implied.py):
    flags typed on `context`'s command line are explicit and always win."""
    resolved = _resolve(values, context)
    resolved.config.validate()
    return resolved


def _resolve(values: dict[str, Any], context: typer.Context) -> Resolved:
    """`values` with what they imply (galore_train/implied.py), before validation (`memory` needs no budget)."""
    from galore_train.implied import resolve_command

    # The command's own context, and the source compared by name: typer >= 0.2x runs a private copy of
    # click, whose context stack and ParameterSource are not the `click` package's.
    explicit = {name for name in values if getattr(context.get_parameter_source(name), "name", None) == "COMMANDLINE"}
    return resolve_command(_split_targets(values), explicit)


def config_from_cli(values: dict[str, Any], context: typer.Context) -> TrainConfig:
    """The resolved TrainConfig alone (what tests read)."""
    return resolve_from_cli(values, context).config


def _main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def pretrain(ctx: typer.Context, **values: Any) -> None:
    """Train a LLaMA from scratch (or from --init-from weights) on C4."""
    from galore_train.train import Trainer

    try:
        resolved = resolve_from_cli(values, ctx)
    except UserError as err:  # the same on every rank (the command line alone): printed once, by rank 0
        if not _main_process():
            sys.exit(err.exit_code)
        raise
    if _main_process():
        for line in resolved.notes:
            print(f"note: {line}", file=sys.stderr)
        for line in resolved.warnings:
            print(f"warning: {line}", file=sys.stderr)
    summary = Trainer(resolved.config).run()
    if "val_perplexity" in summary and _main_process():
        console.print(
            f"final validation loss {summary['val_loss']:.4f}, perplexity {summary['val_perplexity']:.2f} "
            f"after {summary['tokens_seen']:,} training tokens"
        )


_context = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)
pretrain.__signature__ = inspect.Signature([_context, *_config_parameters()])
app.command(context_settings={"max_content_width": 120})(pretrain)


@app.command("eval")
def evaluate_checkpoint(
    checkpoint: Optional[Path] = typer.Option(
        None,
        "--checkpoint",
        help="A checkpoint folder (step_*) or a run folder (uses its latest checkpoint); default: the newest run"
        " under runs/.",
    ),
    eval_data_files: Optional[str] = typer.Option(None, help="Validation shards (default: those the run used)."),
    tokenizer: Optional[str] = typer.Option(None, help="Tokenizer (default: the one the run used)."),
    eval_tokens: Optional[int] = typer.Option(
        None, help="Held-out tokens to score (default: the run's --eval-tokens)."
    ),
    batch_size: Optional[int] = typer.Option(None, help="Sequences per batch."),
    dtype: str = typer.Option("auto", help="auto, bf16 or fp32."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Score a checkpoint on the fixed held-out tokens: validation loss and perplexity."""
    from galore_train.checkpoint import RUNS, newest_checkpoint
    from galore_train.evaluate import score_checkpoint

    if checkpoint is None:
        checkpoint = newest_checkpoint(RUNS)
        if checkpoint is None:
            raise UserError(f"no checkpoint under {RUNS}/: pass --checkpoint DIR (a run folder or a checkpoint folder)")
        print(f"note: evaluating {checkpoint}, the newest run's latest checkpoint", file=sys.stderr)
    result = score_checkpoint(
        checkpoint,
        eval_data_files=eval_data_files,
        tokenizer=tokenizer,
        eval_tokens=eval_tokens,
        batch_size=batch_size,
        dtype=dtype,
    )
    if as_json:
        print(json.dumps(result))
    else:
        console.print(
            f"{result['checkpoint']}: validation loss {result['val_loss']:.4f}, perplexity"
            f" {result['val_perplexity']:.2f} "
            f"on {result['val_tokens']:,} tokens"
        )


@app.command("prepare-data")
def prepare_data_command(
    data_files: str = typer.Option(..., help="Glob of C4 json/json.gz shards to tokenize."),
    tokenizer: str = typer.Option(..., help="Tokenizer the runs will use: hub id, directory or spiece.model."),
    output: Path = typer.Option(
        ..., help="Directory for the token files and manifest.json (pass it as pretrain --data-files)."
    ),
    num_proc: int = typer.Option(1, help="Processes tokenizing shards in parallel."),
) -> None:
    """Tokenize training shards ahead into memory-mapped uint16 token files that `pretrain --data-files DIR` reads."""
    from galore_train.data.prepared import prepare_data

    manifest, kept = prepare_data(data_files, tokenizer, output, num_proc)
    console.print(
        f"wrote {manifest['documents']:,} documents, {manifest['tokens']:,} tokens from "
        f"{len(manifest['shards'])} shard(s) to {output}" + (f" ({kept} kept from an earlier run)" if kept else "")
    )


@app.command("models")
def list_models() -> None:
    """List the model configs with their sizes and parameter counts."""
    from galore_train.model import count_parameters, known_model_names, load_model_config

    table = Table("name", "hidden", "intermediate", "layers", "heads", "vocab", "parameters")
    for name in known_model_names():
        c = load_model_config(name)
        table.add_row(
            name,
            str(c.hidden_size),
            str(c.intermediate_size),
            str(c.num_hidden_layers),
            str(c.num_attention_heads),
            str(c.vocab_size),
            f"{count_parameters(c) / 1e6:,.1f}M",
        )
    console.print(table)


# The TrainConfig fields `memory` takes: the estimator's arguments (tests/test_cli.py keeps them in step).
MEMORY_FIELDS = ("model", "optimizer", "rank", "eightbit", *ESTIMATE_OPTIONS)
_MEMORY_EXTRAS = [
    inspect.Parameter(
        "compare",
        inspect.Parameter.KEYWORD_ONLY,
        annotation=bool,
        default=typer.Option(
            False, "--compare", help="Every optimizer side by side for this model (a Table 2 style row)."
        ),
    ),
    inspect.Parameter(
        "paper",
        inspect.Parameter.KEYWORD_ONLY,
        annotation=bool,
        default=typer.Option(False, "--paper", help="Reproduce the paper's Table 2 memory column, with deviations."),
    ),
    inspect.Parameter(
        "comm",
        inspect.Parameter.KEYWORD_ONLY,
        annotation=bool,
        default=typer.Option(
            False, "--comm", help="Gradient bytes per GPU and step under DDP: full all-reduce vs low-rank sync."
        ),
    ),
    inspect.Parameter(
        "nproc",
        inspect.Parameter.KEYWORD_ONLY,
        annotation=int,
        default=typer.Option(
            1, "--nproc", help="Processes (GPUs) of the run: estimate one GPU's memory under --distributed."
        ),
    ),
]


def memory(ctx: typer.Context, compare: bool, paper: bool, comm: bool, nproc: int, **values: Any) -> None:
    """Estimated memory (weights, gradients, optimizer states, projections, activations) of a training setup:
    the run `pretrain` would start with the same flags (their defaults and what they imply, printed as notes;
    --dtype auto is estimated as bf16, the GPU case); with --comm, its gradient traffic per step under DDP."""
    from galore_train.memory.fit import estimate_config
    from galore_train.memory.tables import compare_table, memory_table, paper_table2
    from galore_train.model import load_model_config

    if paper:
        console.print(paper_table2())
        return
    resolved = _resolve(values, ctx)
    for line in (*(f"note: {n}" for n in resolved.notes), *(f"warning: {w}" for w in resolved.warnings)):
        print(line, file=sys.stderr)
    cfg = resolved.config
    config = load_model_config(cfg.model)
    if comm:
        from galore_train.memory.comm import comm_table, estimate_comm

        settings = {name: getattr(cfg, name) for name in ("eightbit", "dtype", "proj_type", "galore_targets")}
        console.print(comm_table(estimate_comm(config, cfg.optimizer, cfg.rank, nproc=nproc, gap=cfg.gap, **settings)))
    elif compare:
        options = {"nproc": nproc, **{name: getattr(cfg, name) for name in ESTIMATE_OPTIONS}}
        console.print(compare_table(config, cfg.rank, title=f"{cfg.model}, rank {cfg.rank}", **options))
    else:
        console.print(memory_table(estimate_config(cfg, config, nproc)))


memory.__signature__ = inspect.Signature([_context, *_config_parameters(MEMORY_FIELDS), *_MEMORY_EXTRAS])
app.command("memory", context_settings={"max_content_width": 120})(memory)


@app.command("optimizers")
def list_optimizers() -> None:
    """List the --optimizer names (optimizers and methods) with the state each keeps per weight."""
    from galore_train.registry import OPTIMIZERS

    table = Table("name", "kind", "--8bit", "state per m x n target weight (m <= n, rank r)")
    for spec in OPTIMIZERS.values():
        table.add_row(spec.name, spec.kind, spec.other_8bit, spec.state)
    console.print(table)


@app.command("report")
def report_runs(
    run_dirs: Optional[list[Path]] = typer.Argument(
        None,
        help="Run directories (--output-dir of `pretrain`); missing or unfinished ones are marked.",
        show_default=False,
    ),
    output: Optional[Path] = typer.Option(
        None, "--output", "-o", help="Write the markdown report to this file (default: print it)."
    ),
    csv: bool = typer.Option(
        False,
        "--csv",
        help="Also write one CSV line per run beside --output (without --output: print the CSV instead).",
    ),
    plots_dir: Optional[Path] = typer.Option(None, help="Write val_perplexity.png and memory.png into this folder."),
    wandb_csv: Optional[Path] = typer.Option(
        None, help="Also read the runs of a W&B runs-table CSV export (no curves)."
    ),
    title: Optional[str] = typer.Option(None, help="Title of the report."),
) -> None:
    """Table-2-style report of runs: validation perplexity and memory per method and model, plus plots."""
    from galore_train.reporting.report import report

    text = report(run_dirs or [], output=output, csv=csv, plots_dir=plots_dir, wandb_csv=wandb_csv, title=title)
    if output is None:
        print(text, end="")
    else:
        console.print(f"wrote {output}" + (f" and {output.with_suffix('.csv')}" if csv else ""))


@app.command("recipes")
def list_recipes() -> None:
    """List the published settings `--recipe paper` fills in, with their sources."""
    from galore_train.recipes import common_settings, recipe_rows

    table = Table("model", "--optimizer", "settings", "source", title=f"--recipe paper; all: {common_settings()}")
    for row in recipe_rows():
        table.add_row(*row)
    console.print(table)


def _configure_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING, format="%(levelname)s: %(message)s", stream=sys.stderr
    )
    for noisy in ("datasets", "transformers", "httpx", "urllib3", "filelock", "fsspec", "bitsandbytes"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("WANDB_SILENT", "true")
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # "Writing model shards" bars at every checkpoint


def main() -> None:
    """Console entry point: user errors and deliberate stops end in one line and an exit code."""
    _configure_logging()
    try:
        app()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except TrainingStopped as err:
        print(f"stopped: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
