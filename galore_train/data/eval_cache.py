"""The validation tokens, tokenized once per run instead of on every rank at every start and resume.

At paper settings the validation set is 10M tokens. The cache lives in the run's output directory (which every
process of a resumable run already reads its checkpoints from) and is keyed by everything the ids depend on:
the files (path, size, modification time) or hub split, the tokenizer's full definition, the sequence length,
the embeddable vocabulary and the token budget. The first process builds it; the others read it after all
processes agree that the build worked (so an error stops every process instead of leaving some waiting). A
missing, stale or unreadable cache is rebuilt: it is never trusted over the data.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import torch

from galore_train.data.evaluation import eval_sequences, pad_batches
from galore_train.data.sources import expand_data_files
from galore_train.data.tokens import Tokenize
from galore_train.errors import UserError

log = logging.getLogger(__name__)
CACHE_VERSION = 1
Sequences = tuple[list[list[int]], int, int]  # ids, scored tokens, ids remapped to <unk>


def eval_cache_key(data_files: str | None, hub_split: str, tokenize: Tokenize, eval_tokens: int) -> dict[str, Any]:
    if data_files:
        files = expand_data_files(data_files, "--eval-data-files")
        source: Any = [[file, os.stat(file).st_size, os.stat(file).st_mtime_ns] for file in files]
    else:
        source = hub_split
    return {
        "version": CACHE_VERSION,
        "source": source,
        "tokenizer": tokenize.fingerprint,
        "max_length": tokenize.max_length,
        "vocab_size": tokenize.vocab_size,
        "eval_tokens": eval_tokens,
    }


def cached_eval_batches(
    cache_dir: Path,
    key: dict[str, Any],
    make_source: Callable[[], datasets.IterableDataset],
    tokenize: Tokenize,
    *,
    batch_size: int,
    builder: bool = True,
    agree: Callable[[bool], bool] = lambda failed: failed,
) -> tuple[list[dict[str, torch.Tensor]], int]:
    """`build_eval_batches`, through the cache. `builder`: this process builds a missing cache; `agree(failed)`
    is True on every process if the build failed on any (a collective under torchrun)."""
    path = Path(cache_dir) / f"eval-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]}.pt"
    found, error = None, None
    if builder:
        try:
            found = _read(path, key) or _build(path, key, make_source, tokenize)
        except UserError as err:
            error = err
    if agree(error is not None):
        raise error or UserError("the first process could not build the validation tokens (see its error)")
    if found is None:  # another process built it, or the builder could not write it: build here
        found = _read(path, key) or _build(None, key, make_source, tokenize)
    sequences, scored, remapped = found
    tokenize.remapped_ids += remapped
    return pad_batches(sequences, tokenize, batch_size), scored


def _build(
    path: Path | None, key: dict[str, Any], make_source: Callable[[], datasets.IterableDataset], tokenize: Tokenize
) -> Sequences:
    """Tokenize the validation documents; write the cache to `path` (best effort)."""
    before = tokenize.remapped_ids
    sequences, scored = eval_sequences(make_source(), tokenize, eval_tokens=key["eval_tokens"])
    remapped, tokenize.remapped_ids = tokenize.remapped_ids - before, before  # counted by the caller, once
    if path is not None:
        lengths = torch.tensor([len(ids) for ids in sequences], dtype=torch.int64)
        ids = torch.tensor([i for ids in sequences for i in ids], dtype=torch.int32)
        temporary = path.with_suffix(f".tmp{os.getpid()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(
                {
                    "key": json.dumps(key, sort_keys=True),
                    "ids": ids,
                    "lengths": lengths,
                    "scored": scored,
                    "remapped": remapped,
                },
                temporary,
            )
            os.replace(temporary, path)
        except OSError as err:
            log.warning("cannot write the validation token cache %s (%s); it will be built again next time", path, err)
    return sequences, scored, remapped


def _read(path: Path, key: dict[str, Any]) -> Sequences | None:
    """The cached sequences if `path` holds them for `key`; None (with a warning if it is unreadable) otherwise."""
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, weights_only=True)
        if saved["key"] != json.dumps(key, sort_keys=True):
            raise ValueError("it was built for other settings")
        ids, lengths = saved["ids"].tolist(), saved["lengths"].tolist()
        if sum(lengths) != len(ids):
            raise ValueError("ids and lengths disagree")
    except Exception as err:  # truncated, corrupt, foreign: rebuild rather than trust it
        log.warning(
            "ignoring the validation token cache %s (%s); rebuilding it",
            path,
            str(err).splitlines()[0] if str(err) else type(err).__name__,
        )
        return None
    bounds = [0, *itertools.accumulate(lengths)]
    return [ids[a:b] for a, b in itertools.pairwise(bounds)], saved["scored"], saved["remapped"]
