"""Where documents come from: local C4 json/json.gz shards or the hub's `allenai/c4` stream.

Both are `datasets` IterableDatasets, whose own state is part of the stream position. Local shards are read
by a forgiving line reader (real C4 copies vary: `date` instead of `timestamp`, stray bad lines; `datasets`'
own JSON loader stops at either).
"""

from __future__ import annotations

import glob
import gzip
import json
import logging
from collections.abc import Iterator

import datasets

from galore_train.errors import UserError

log = logging.getLogger(__name__)


def expand_data_files(pattern: str, flag: str) -> list[str]:
    files = sorted(glob.glob(pattern, recursive=True))
    if not files:
        raise UserError(f"{flag} {pattern!r} matches no files")
    return files


class BadLineCounter:
    """Counts (and warns about the first few) lines that are not JSON objects with a `text` string."""

    max_warnings = 5

    def __init__(self) -> None:
        self.count = 0

    def report(self, file: str, line_number: int, reason: str) -> None:
        self.count += 1
        if self.count <= self.max_warnings:
            log.warning("skipping %s:%d (%s)", file, line_number, reason)


BAD_LINES = BadLineCounter()


def read_c4_lines(files: list[str]) -> Iterator[dict[str, str]]:
    """Yield {'text': ...} for each good line of C4 json/json.gz shards; skip and count bad ones."""
    for file in files:
        opener = gzip.open if file.endswith(".gz") else open
        try:
            with opener(file, "rt", encoding="utf-8", errors="replace") as handle:
                for line_number, line in enumerate(handle, start=1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        BAD_LINES.report(file, line_number, "not JSON")
                        continue
                    text = record.get("text") if isinstance(record, dict) else None
                    if not isinstance(text, str):
                        BAD_LINES.report(file, line_number, "no 'text' string")
                        continue
                    yield {"text": text}
        except (OSError, EOFError) as err:
            raise UserError(f"cannot read data file {file}: {err}") from None


def local_documents(files: list[str]) -> datasets.IterableDataset:
    """One shard per file, so shard order can be shuffled and split across ranks."""
    return datasets.IterableDataset.from_generator(read_c4_lines, gen_kwargs={"files": files})


def hub_documents(dataset: str, config: str, split: str, flag: str = "--data-files") -> datasets.IterableDataset:
    """The split streamed from the hub; `flag` is the option that would give local files instead."""
    try:
        stream = datasets.load_dataset(dataset, config, split=split, streaming=True)
    except Exception as err:
        raise UserError(
            f"cannot stream {dataset}/{config} ({split}) from the hub: {str(err).splitlines()[0]} "
            f"(offline? use {flag} with local shards)"
        ) from None
    return stream.select_columns(["text"])
