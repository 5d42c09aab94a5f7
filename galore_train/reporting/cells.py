"""Runs grouped into the cells of the paper's Table 2: rows by method (and any setting other than the seed
that differs), columns by model. The tables and the plots share this grouping."""

from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import dataclass
from typing import Iterable, Optional

from galore_train.reporting.runs import ROW_ORDER, SETTING_FIELDS, Run


@dataclass
class Cell:
    """The runs of one row (method + distinguishing settings) and one model."""

    row: str
    model: str
    runs: list[Run]

    @property
    def finished(self) -> list[Run]:
        return [r for r in self.runs if r.status == "finished" and r.val_perplexity is not None]

    def perplexity(self) -> Optional[float]:
        values = [r.val_perplexity for r in self.finished]
        return statistics.fmean(values) if values else None

    def spread(self) -> Optional[float]:
        """Half the range of the finished runs' perplexities (for two seeds: the distance to the mean)."""
        values = [r.val_perplexity for r in self.finished]
        return (max(values) - min(values)) / 2 if len(values) > 1 else None


def known_mean(values: Iterable[Optional[float]]) -> Optional[float]:
    """Mean of the values a run has (a reading or estimate may be missing); None if none has one."""
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def group_cells(runs: list[Run]) -> list[Cell]:
    """Cells in table order. Runs of one method and model that differ in a setting other than the
    seed (an lr sweep, two ranks) get separate rows named by that setting, e.g. 'GaLore (lr 0.01)'."""
    by_method: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        by_method.setdefault((run.method, run.model), []).append(run)
    cells: dict[tuple[str, str], Cell] = {}
    for (method, model), members in by_method.items():
        varying = [f for f in SETTING_FIELDS if len({json.dumps(r.settings().get(f)) for r in members}) > 1]
        for run in members:
            suffix = ", ".join(f"{name.replace('_', ' ')} {run.settings().get(name)}" for name in varying)
            row = f"{method} ({suffix})" if suffix else method
            cells.setdefault((row, model), Cell(row, model, [])).runs.append(run)
    return sorted(cells.values(), key=lambda c: (_row_key(c.row), c.row, model_key(c.model)))


def _row_key(row: str) -> int:
    base = row.split(" (")[0]
    return ROW_ORDER.index(base) if base in ROW_ORDER else len(ROW_ORDER)


def model_key(model: str) -> tuple[float, str]:
    """Models by size when the name ends in a size (llama_60m < llama_1b), else by name."""
    match = re.search(r"(\d+(?:\.\d+)?)([mb])$", model.lower())
    size = float(match.group(1)) * (1e6 if match.group(2) == "m" else 1e9) if match else math.inf
    return size, model
