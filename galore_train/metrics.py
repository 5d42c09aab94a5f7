"""One sink for every record of a run: OUTPUT_DIR/metrics.jsonl, W&B (best effort) and the progress bar.

The local files are the source of truth: W&B failing (no network, bad key, outage mid-run) warns once and
training goes on.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

log = logging.getLogger(__name__)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep the record readable
    return value


def cut_back(path: Path, step: int) -> None:
    """Before a resumed run appends: keep the records up to the checkpoint's `step`, drop the rest.

    Records after the checkpoint were made by training that the resume repeats (they would appear twice),
    and a crash may have left a line half-written (the resumed run's first record would be glued to it).
    The file is replaced atomically; one line says what was dropped."""
    if not path.is_file():
        return
    kept, later, unreadable = [], 0, 0
    for line in path.read_bytes().splitlines(keepends=True):
        record = parse_record(line) if line.endswith(b"\n") else None
        if record is None:
            unreadable += 1
        elif record["step"] > step:
            later += 1
        else:
            kept.append(line)
    if later or unreadable:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(b"".join(kept))
        os.replace(tmp, path)
        log.warning(
            "%s: dropped %d record(s) after step %d (the resumed run writes them again) and %d partial or"
            " unreadable line(s)",
            path,
            later,
            step,
            unreadable,
        )


def parse_record(line: bytes) -> Optional[dict[str, Any]]:
    """A metrics record with a numeric step, or None for a partial or damaged line."""
    try:
        record = json.loads(line)
    except ValueError:  # also UnicodeDecodeError: bytes changed on disk
        return None
    step = record.get("step") if isinstance(record, dict) else None
    if not isinstance(step, (int, float)) or not math.isfinite(step):
        return None
    return record


class MetricsSink:
    def __init__(
        self,
        output_dir: Path,
        *,
        enabled: bool,
        total_steps: int,
        config: dict[str, Any],
        wandb_mode: Optional[str],
        project: str,
        run_name: str,
        tags: list[str],
        resume_step: Optional[int],
    ) -> None:
        """`resume_step`: the step of the checkpoint a resumed run continues (None: a fresh run)."""
        resume = resume_step is not None
        self.enabled = enabled
        self.output_dir = output_dir
        self.console = Console(stderr=True)
        if not self.console.is_terminal:
            self.console.width = 160  # log files: no wrapping at 80 columns
        self.total_steps = total_steps
        self.wandb_run = None
        self._wandb_warned = False
        self._file = None
        self._progress: Optional[Progress] = None
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            cut_back(output_dir / "metrics.jsonl", resume_step)
        self._file = open(output_dir / "metrics.jsonl", "a" if resume else "w")
        self._start_wandb(
            wandb_mode or os.environ.get("WANDB_MODE") or "online", project, run_name, tags, config, resume
        )
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
            disable=not self.console.is_terminal,
        )
        self._task = self._progress.add_task("train", total=total_steps, status="")
        self._progress.start()

    # --- W&B ---------------------------------------------------------------------------------
    def _start_wandb(self, mode: str, project: str, run_name: str, tags: list[str], config: dict, resume: bool) -> None:
        if mode == "disabled":
            return
        try:
            import wandb

            run_id_file = self.output_dir / "wandb_run_id"
            run_id = run_id_file.read_text().strip() if resume and run_id_file.exists() else None
            self.wandb_run = wandb.init(
                project=project,
                name=run_name,
                tags=tags or None,
                config=config,
                mode=mode,
                dir=str(self.output_dir),
                id=run_id,
                resume="allow" if run_id else None,
            )
            run_id_file.write_text(self.wandb_run.id + "\n")
        except Exception as err:  # any W&B failure must not cost a training run
            self._warn_wandb(err)

    def _warn_wandb(self, err: BaseException) -> None:
        self.wandb_run = None
        if not self._wandb_warned:
            self._wandb_warned = True
            first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
            log.warning("W&B logging is off for this run (%s); metrics.jsonl still records everything", first_line)

    # --- records ------------------------------------------------------------------------------
    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")
        self._file.flush()
        if self.wandb_run is not None:
            try:
                self.wandb_run.log(record, step=record.get("step"))
            except Exception as err:
                self._warn_wandb(err)

    def progress(self, step: int, status: str) -> None:
        """The live bar on a terminal; in logs (no terminal), about twenty plain lines per run."""
        if self._progress is None:
            return
        if self.console.is_terminal:
            self._progress.update(self._task, completed=step, status=status)
        elif step % max(1, self.total_steps // 20) == 0 or step == self.total_steps:
            self.console.print(f"step {step}/{self.total_steps}: {status}")

    def print(self, message: str) -> None:
        if self.enabled:
            if self._progress is not None and self._progress.live.is_started:
                self._progress.console.print(message)
            else:
                self.console.print(message)

    def write_summary(self, summary: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.output_dir / "summary.json", "w") as f:
            json.dump({k: _jsonable(v) for k, v in summary.items()}, f, indent=2)
        if self.wandb_run is not None:
            try:
                self.wandb_run.summary.update(summary)
            except Exception as err:
                self._warn_wandb(err)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.wandb_run is not None:
            try:
                self.wandb_run.finish()
            except Exception as err:
                self._warn_wandb(err)
            self.wandb_run = None
