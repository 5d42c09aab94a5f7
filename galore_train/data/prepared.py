"""Tokenized training data prepared ahead: `galore-train prepare-data`, read by `pretrain --data-files DIR`.

Each source shard becomes `NNNNN.tokens` (the documents' content ids, no special tokens, uint16, back to back) and
`NNNNN.offsets.npy` (int64 document boundaries, one more than the documents), memory-mapped when read.
`manifest.json` records the tokenizer (name and a hash of its full definition), each source file with its
document and token counts, and the totals. Reading yields one `datasets` shard per source shard, in the same
order, with the same documents as streaming the json shards (bad lines are skipped the same way), so shard
shuffle, rank split, shuffle buffer and resume behave as when streaming, and the same seed gives the same
batches: the special tokens and truncation are applied when the batch is made (`Tokenize.from_ids`).
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import datasets
import numpy as np

from galore_train.data.sources import expand_data_files, read_c4_lines
from galore_train.data.tokens import Tokenize, load_tokenizer, tokenizer_fingerprint
from galore_train.errors import UserError

MANIFEST = "manifest.json"
FORMAT = 1
CHUNK_DOCUMENTS = 1000


def is_prepared(path: str | None) -> bool:
    return bool(path) and (Path(path) / MANIFEST).is_file()


def _prepare_file(index: int, source: str, tokenizer_name: str, output: str) -> dict[str, Any]:
    """Tokenize one source shard into its token and offset files (runs in a worker process)."""
    backend = Tokenize.private_backend(load_tokenizer(tokenizer_name))
    stem = Path(output) / f"{index:05d}"
    offsets = [0]
    with open(f"{stem}.tokens", "wb") as handle:
        texts: list[str] = []
        for record in [*read_c4_lines([source]), None]:
            if record is not None:
                texts.append(record["text"])
            if texts and (record is None or len(texts) == CHUNK_DOCUMENTS):
                for encoding in backend.encode_batch(texts, add_special_tokens=False):
                    np.asarray(encoding.ids, dtype=np.uint16).tofile(handle)
                    offsets.append(offsets[-1] + len(encoding.ids))
                texts = []
    np.save(f"{stem}.offsets.npy", np.asarray(offsets, dtype=np.int64))
    stat = os.stat(source)
    return {
        "source": source,
        "size": stat.st_size,
        "stem": stem.name,
        "documents": len(offsets) - 1,
        "tokens": offsets[-1],
    }


def prepare_data(data_files: str, tokenizer_name: str, output: Path, num_proc: int = 1) -> dict[str, Any]:
    """Tokenize every shard matching `data_files` into `output`; returns the manifest."""
    files = expand_data_files(data_files, "--data-files")
    tokenizer = load_tokenizer(tokenizer_name)
    if len(tokenizer) > np.iinfo(np.uint16).max + 1:
        raise UserError(f"the tokenizer has {len(tokenizer)} ids: more than prepared data's uint16 tokens hold")
    if Tokenize.private_backend(tokenizer) is None:
        raise UserError(f"tokenizer {tokenizer_name!r} has no fast (Rust) version, which prepare-data needs")
    output.mkdir(parents=True, exist_ok=True)
    (output / MANIFEST).unlink(missing_ok=True)  # no manifest until every file is complete
    arguments = [(index, file, tokenizer_name, str(output)) for index, file in enumerate(files)]
    with ProcessPoolExecutor(max_workers=max(1, num_proc)) as pool:
        shards = list(pool.map(_prepare_file, *zip(*arguments)))
    manifest = {
        "format": FORMAT,
        "tokenizer": {"name": tokenizer_name, "fingerprint": tokenizer_fingerprint(tokenizer)},
        "documents": sum(s["documents"] for s in shards),
        "tokens": sum(s["tokens"] for s in shards),
        "shards": shards,
    }
    temporary = output / f"{MANIFEST}.tmp"
    temporary.write_text(json.dumps(manifest, indent=1))
    os.replace(temporary, output / MANIFEST)
    return manifest


def _read_shards(directory: str, stems: list[str]) -> Iterator[dict[str, list[int]]]:
    for stem in stems:
        offsets = np.load(Path(directory) / f"{stem}.offsets.npy")
        tokens = np.memmap(Path(directory) / f"{stem}.tokens", dtype=np.uint16, mode="r")
        for start, end in zip(offsets[:-1], offsets[1:]):
            yield {"ids": tokens[start:end].tolist()}


def prepared_documents(directory: str, tokenize: Tokenize) -> datasets.IterableDataset:
    """The prepared documents as a `datasets` source (one shard per source shard), after checking the directory
    against its manifest and the run's tokenizer."""
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
    return datasets.IterableDataset.from_generator(
        _read_shards, gen_kwargs={"directory": str(path), "stems": [s["stem"] for s in shards]}
    )
