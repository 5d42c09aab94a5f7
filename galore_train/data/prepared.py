"""Tokenized training data prepared ahead: `galore-train prepare-data`, read by `pretrain --data-files DIR`.

Each source shard becomes `NNNNN.tokens` (the documents' content ids, no special tokens, uint16, back to back) and
`NNNNN.offsets.npy` (int64 document boundaries, one more than the documents), memory-mapped when read.
`manifest.json` records the tokenizer (name and a hash of its full definition), each source file with its
document and token counts, and the totals. A finished shard also leaves `NNNNN.done.json` (its source's size and
modification time, the tokenizer's hash): an interrupted `prepare-data` run again keeps those shards and
tokenizes only the rest (the token files are written under temporary names and renamed when complete).
A prepared shard holds the same documents as its json shard (bad lines are skipped the same way), and they are read
in the order `datasets` streams the json shards in (shard_order.py), so shard shuffle, rank split, shuffle buffer
and resume behave as when streaming, and the same seed gives the same batches: the special tokens and truncation
are applied when the batch is made (stream.py).
"""

from __future__ import annotations

import bisect
import itertools
import json
import os
import threading
from collections import OrderedDict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers

from galore_train.data.shard_order import ShardOrder
from galore_train.data.sources import expand_data_files, read_c4_lines
from galore_train.data.tokens import Tokenize, load_tokenizer, tokenizer_fingerprint
from galore_train.errors import UserError

MANIFEST = "manifest.json"
FORMAT = 1
CHUNK_DOCUMENTS = 1000
MAX_OPEN = 32  # shards whose maps stay open


def is_prepared(path: str | None) -> bool:
    return bool(path) and (Path(path) / MANIFEST).is_file()


def _source_identity(source: str, fingerprint: str) -> dict[str, Any]:
    """What a finished shard must still match to be kept by a rerun: the same file, unchanged, same tokenizer."""
    stat = os.stat(source)
    return {"source": source, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "tokenizer": fingerprint}


def _finished_shard(index: int, source: str, fingerprint: str, output: Path) -> dict[str, Any] | None:
    """The manifest entry of shard `index` if an earlier run completed it from this very source, else None."""
    stem = output / f"{index:05d}"
    try:
        done = json.loads(Path(f"{stem}.done.json").read_text())
        complete = Path(f"{stem}.tokens").stat().st_size == 2 * done["shard"]["tokens"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    same = done.get("identity") == _source_identity(source, fingerprint) and Path(f"{stem}.offsets.npy").is_file()
    return done["shard"] if same and complete else None


def _prepare_file(index: int, source: str, definition: str, fingerprint: str, output: str) -> dict[str, Any]:
    """Tokenize one source shard into its token and offset files (runs in a worker process). `definition` is the
    Rust tokenizer's JSON (loading it is instant; loading by name converts the SentencePiece model again)."""
    backend = tokenizers.Tokenizer.from_str(definition)
    stem = Path(output) / f"{index:05d}"
    identity = _source_identity(source, fingerprint)  # before reading: a file changed meanwhile is not kept
    offsets = [0]
    with open(f"{stem}.tokens.tmp", "wb") as handle:
        texts: list[str] = []
        for record in itertools.chain(read_c4_lines([source]), [None]):
            if record is not None:
                texts.append(record["text"])
            if texts and (record is None or len(texts) == CHUNK_DOCUMENTS):
                for encoding in backend.encode_batch(texts, add_special_tokens=False):
                    np.asarray(encoding.ids, dtype=np.uint16).tofile(handle)
                    offsets.append(offsets[-1] + len(encoding.ids))
                texts = []
    with open(f"{stem}.offsets.tmp", "wb") as handle:
        np.save(handle, np.asarray(offsets, dtype=np.int64))
    os.replace(f"{stem}.tokens.tmp", f"{stem}.tokens")
    os.replace(f"{stem}.offsets.tmp", f"{stem}.offsets.npy")
    shard = {"source": source, "size": identity["size"], "stem": stem.name, "documents": len(offsets) - 1}
    shard["tokens"] = offsets[-1]
    _write_atomically(Path(f"{stem}.done.json"), {"shard": shard, "identity": identity})
    return shard


def _write_atomically(path: Path, value: dict[str, Any]) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(value, indent=1))
    os.replace(temporary, path)


def prepare_data(data_files: str, tokenizer_name: str, output: Path, num_proc: int = 1) -> tuple[dict[str, Any], int]:
    """Tokenize every shard matching `data_files` into `output`, keeping the shards an interrupted earlier run
    finished; returns the manifest and how many shards were kept."""
    files = expand_data_files(data_files, "--data-files")
    tokenizer = load_tokenizer(tokenizer_name)
    if len(tokenizer) > np.iinfo(np.uint16).max + 1:
        raise UserError(f"the tokenizer has {len(tokenizer)} ids: more than prepared data's uint16 tokens hold")
    backend = Tokenize.private_backend(tokenizer)
    if backend is None:
        raise UserError(f"tokenizer {tokenizer_name!r} has no fast (Rust) version, which prepare-data needs")
    output.mkdir(parents=True, exist_ok=True)
    (output / MANIFEST).unlink(missing_ok=True)  # no manifest until every file is complete
    fingerprint = tokenizer_fingerprint(tokenizer)
    shards = [_finished_shard(index, file, fingerprint, output) for index, file in enumerate(files)]
    missing = [index for index, shard in enumerate(shards) if shard is None]
    definition = backend.to_str()  # serialised once, not per shard (a C4 run has ~1,000 shards)
    arguments = [(index, files[index], definition, fingerprint, str(output)) for index in missing]
    if arguments:
        with ProcessPoolExecutor(max_workers=max(1, num_proc)) as pool:
            for index, shard in zip(missing, pool.map(_prepare_file, *zip(*arguments))):
                shards[index] = shard
    manifest = {
        "format": FORMAT,
        "tokenizer": {"name": tokenizer_name, "fingerprint": fingerprint},
        "documents": sum(s["documents"] for s in shards),
        "tokens": sum(s["tokens"] for s in shards),
        "shards": shards,
    }
    _write_atomically(output / MANIFEST, manifest)
    return manifest, len(files) - len(missing)


class PreparedDocuments:
    """A checked prepared directory: per shard its memory-mapped tokens and document offsets. Documents are
    global indices (shard by shard, in manifest order); `order` reads them as streaming the json shards would."""

    def __init__(self, path: Path, shards: list[dict[str, Any]]) -> None:
        self.path = path
        self.stems = [s["stem"] for s in shards]
        self.counts = [s["documents"] for s in shards]
        self.first = [0, *itertools.accumulate(self.counts)]
        self.first_array = np.asarray(self.first, dtype=np.int64)
        self._open: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()  # the producer reads batches while a checkpoint writes the buffer out

    def _maps(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        """The shard's (tokens, offsets) maps. Each map holds a file descriptor, so only the MAX_OPEN last used
        stay open (C4 has 1,024 shards; a rank reads at most 10 at a time). Plain ndarray views: slicing a
        np.memmap costs more than copying a document's ids."""
        with self._lock:
            if shard in self._open:
                self._open.move_to_end(shard)
                return self._open[shard]
            stem = self.path / self.stems[shard]
            tokens = np.memmap(f"{stem}.tokens", dtype=np.uint16, mode="r").view(np.ndarray)
            maps = self._open[shard] = tokens, np.load(f"{stem}.offsets.npy", mmap_mode="r").view(np.ndarray)
            if len(self._open) > MAX_OPEN:
                self._open.popitem(last=False)
            return maps

    def order(self, seed: int, epoch: int, rank: int, world_size: int, state: dict | None) -> ShardOrder:
        return ShardOrder(self.counts, seed, epoch, rank, world_size, state)

    def kept(self, documents: list[int], width: int, fill: int) -> tuple[np.ndarray, np.ndarray]:
        """The first `width` content ids of each document (then `fill`) and how many there are: one gather per
        shard."""
        documents = np.asarray(documents, dtype=np.int64)
        shards = np.searchsorted(self.first_array, documents, side="right") - 1
        kept = np.empty((len(documents), width), dtype=np.int64)
        lengths = np.empty(len(documents), dtype=np.int64)
        for shard in np.unique(shards):
            rows = np.flatnonzero(shards == shard)
            local = documents[rows] - self.first[shard]
            tokens, offsets = self._maps(shard)
            starts, ends = offsets[local], offsets[local + 1]
            lengths[rows] = np.minimum(ends - starts, width)
            valid = np.arange(width) < lengths[rows, None]
            block = tokens[np.where(valid, starts[:, None] + np.arange(width), 0)]
            kept[rows] = np.where(valid, block, fill)
        return kept, lengths

    def ids(self, document: int) -> np.ndarray:
        """The document's content ids (uint16, no special tokens)."""
        shard = bisect.bisect_right(self.first, document) - 1
        tokens, offsets = self._maps(shard)
        start, end = offsets[document - self.first[shard] : document - self.first[shard] + 2]
        return tokens[start:end]


def prepared_documents(directory: str, tokenize: Tokenize) -> PreparedDocuments:
    """The prepared documents, after checking the directory against its manifest and the run's tokenizer."""
    path = Path(directory)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        shards = manifest["shards"]
        fingerprint = manifest["tokenizer"]["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"cannot read prepared data manifest {path / MANIFEST}: {err}") from None
    if manifest.get("format") != FORMAT:
        raise UserError(f"{path / MANIFEST} has format {manifest.get('format')}, this galore-train reads {FORMAT}")
    if fingerprint != tokenize.fingerprint:
        raise UserError(
            f"{path / MANIFEST} was prepared with tokenizer {manifest['tokenizer']['name']!r}, not this run's "
            "--tokenizer (prepare the data again with it)"
        )
    for shard in shards:
        tokens, offsets = path / f"{shard['stem']}.tokens", path / f"{shard['stem']}.offsets.npy"
        for file in (tokens, offsets):
            if not file.is_file():
                raise UserError(f"prepared data file {file} is missing")
        if tokens.stat().st_size != 2 * shard["tokens"]:
            raise UserError(
                f"prepared data file {tokens} holds {tokens.stat().st_size // 2} tokens, its manifest says "
                f"{shard['tokens']} (truncated or replaced? prepare the data again)"
            )
        try:
            bounds = np.load(offsets, mmap_mode="r")
        except (OSError, ValueError) as err:
            raise UserError(f"cannot read prepared data file {offsets}: {err}") from None
        if len(bounds) != shard["documents"] + 1 or int(bounds[-1]) != shard["tokens"]:
            raise UserError(f"prepared data file {offsets} does not match its manifest (prepare the data again)")
    return PreparedDocuments(path, shards)
