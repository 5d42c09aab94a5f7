"""C4 documents -> tokenized training batches that know their own position.

Sources are `datasets` IterableDatasets: the hub's `allenai/c4` stream, or local json/json.gz shards
read by a forgiving line reader (real C4 copies vary: `date` instead of `timestamp`, stray bad lines;
`datasets`' own JSON loader stops at either). Shard order follows the seed and the epoch; documents are
mixed by our own seeded buffer, whose contents are part of the state, so a resumed run continues with
exactly the batch it would have seen.
"""

from __future__ import annotations

import glob
import gzip
import json
import logging
import random
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import datasets
import torch
from datasets.distributed import split_dataset_by_node

from galore_train.errors import UserError

log = logging.getLogger(__name__)
IGNORE_INDEX = -100


# --- tokenizer ---------------------------------------------------------------------------------

def load_tokenizer(name_or_path: str):
    """A hub id, a tokenizer directory, or a SentencePiece `spiece.model` file.

    `T5Tokenizer(vocab_file=...)` silently builds a tiny vocabulary in transformers 5, so local
    SentencePiece models always go through `from_pretrained(<directory>)`.
    """
    from transformers import AutoTokenizer, T5Tokenizer

    path = Path(name_or_path)
    try:
        if path.is_file():
            if path.name != "spiece.model":
                raise UserError(f"--tokenizer file must be a SentencePiece 'spiece.model' (or give its directory): {path}")
            return T5Tokenizer.from_pretrained(str(path.parent))
        if path.is_dir():
            if (path / "tokenizer_config.json").exists() or (path / "tokenizer.json").exists():
                return AutoTokenizer.from_pretrained(str(path))
            if (path / "spiece.model").exists():
                return T5Tokenizer.from_pretrained(str(path))
            raise UserError(f"--tokenizer directory {path} holds no tokenizer files (spiece.model or tokenizer.json)")
        return AutoTokenizer.from_pretrained(name_or_path)
    except UserError:
        raise
    except Exception as err:  # hub/network/format problems all surface as one line
        raise UserError(f"cannot load tokenizer {name_or_path!r}: {str(err).splitlines()[0]}") from None


# --- document sources --------------------------------------------------------------------------

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


def hub_documents(dataset: str, config: str, split: str) -> datasets.IterableDataset:
    try:
        stream = datasets.load_dataset(dataset, config, split=split, streaming=True)
    except Exception as err:
        raise UserError(f"cannot stream {dataset}/{config} ({split}) from the hub: {str(err).splitlines()[0]} "
                        "(offline? use --data-files with local shards)") from None
    return stream.select_columns(["text"])


def document_source(data_files: Optional[str], flag: str, dataset: str, config: str, split: str) -> datasets.IterableDataset:
    if data_files:
        return local_documents(expand_data_files(data_files, flag))
    return hub_documents(dataset, config, split)


# --- tokenization --------------------------------------------------------------------------------

class Tokenize:
    """Text -> ids of at most `max_length`, with ids the model cannot embed mapped to <unk>.

    The T5 tokenizer has 32,100 ids but the paper's LLaMA embeds 32,000: the 100 extra ids are the
    `<extra_id_N>` sentinels, produced only when a document literally contains that string.
    """

    def __init__(self, tokenizer, max_length: int, vocab_size: int) -> None:
        special = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
        unembeddable = [i for i in range(vocab_size, len(tokenizer)) if i not in special]
        if unembeddable or tokenizer.unk_token_id >= vocab_size:
            raise UserError(f"the tokenizer has {len(tokenizer)} ids but the model embeds only {vocab_size}, and not all ids "
                            "above that are special tokens: raise vocab_size in the model config")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.vocab_size = vocab_size
        self.unk_id = tokenizer.unk_token_id
        self.pad_id = tokenizer.pad_token_id
        self.eos_id = tokenizer.eos_token_id
        self.remapped_ids = 0

    def __call__(self, texts: list[str], truncate: bool) -> list[list[int]]:
        encoded = self.tokenizer(texts, truncation=truncate, max_length=self.max_length if truncate else None,
                                 add_special_tokens=True)["input_ids"]
        return [self._in_vocab(ids) for ids in encoded]

    def _in_vocab(self, ids: list[int]) -> list[int]:
        if max(ids, default=0) < self.vocab_size:
            return ids
        self.remapped_ids += sum(i >= self.vocab_size for i in ids)
        return [i if i < self.vocab_size else self.unk_id for i in ids]

    def pad(self, sequences: list[list[int]]) -> dict[str, torch.Tensor]:
        """Right-pad to max_length; labels ignore the padding so it is neither learned nor counted."""
        input_ids = torch.full((len(sequences), self.max_length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(sequences):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# --- the training stream -------------------------------------------------------------------------

class PretrainingStream:
    """Endless, resumable stream of training batches for one rank.

    Position = (epoch, the source's own `datasets` state, our shuffle buffer and RNG, pack leftover).
    The source restarts with a new shard order each epoch; epochs are counted and reported.
    """

    def __init__(self, make_source: Callable[[], datasets.IterableDataset], tokenize: Tokenize, *, batch_size: int,
                 pack: bool, shuffle_buffer: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.make_source = make_source
        self.tokenize = tokenize
        self.batch_size = batch_size
        self.pack = pack
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.rng = random.Random(f"{seed}-{rank}")
        self.epoch = 0
        self.documents_read = 0
        self.buffer: list[str] = []
        self.leftover: list[int] = []
        self._source_state: Optional[dict] = None
        self._open_source()

    def _open_source(self) -> None:
        source = self.make_source().shuffle(seed=self.seed, buffer_size=1)  # shard order only
        source.set_epoch(self.epoch)
        if self.world_size > 1:
            source = split_dataset_by_node(source, rank=self.rank, world_size=self.world_size)
        if self._source_state is not None:
            source.load_state_dict(self._source_state)
        self.source = source
        self.iterator = iter(source)

    def _next_document(self) -> str:
        while len(self.buffer) <= self.shuffle_buffer:
            try:
                self.buffer.append(next(self.iterator)["text"])
                self.documents_read += 1
            except StopIteration:
                if self.documents_read == 0:
                    raise UserError("the training data holds no documents") from None
                if self.buffer:
                    break
                self.epoch += 1
                self.documents_read = 0
                self._source_state = None
                self._open_source()
        index = self.rng.randrange(len(self.buffer))
        self.buffer[index], self.buffer[-1] = self.buffer[-1], self.buffer[index]
        return self.buffer.pop()

    def next_batch(self) -> dict[str, torch.Tensor]:
        if not self.pack:
            return self.tokenize.pad(self.tokenize([self._next_document() for _ in range(self.batch_size)], truncate=True))
        needed = self.batch_size * self.tokenize.max_length
        while len(self.leftover) < needed:
            self.leftover.extend(self.tokenize([self._next_document()], truncate=False)[0])
        chunk, self.leftover = self.leftover[:needed], self.leftover[needed:]
        length = self.tokenize.max_length
        return self.tokenize.pad([chunk[i : i + length] for i in range(0, needed, length)])

    def state_dict(self) -> dict[str, Any]:
        """Plain values only (saved as JSON beside the checkpoint)."""
        version, internal, gauss = self.rng.getstate()
        return {
            "epoch": self.epoch,
            "documents_read": self.documents_read,
            "source": self.source.state_dict(),
            "buffer": list(self.buffer),
            "leftover": list(self.leftover),
            "rng": [version, list(internal), gauss],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = state["epoch"]
        self.documents_read = state["documents_read"]
        self.buffer = list(state["buffer"])
        self.leftover = list(state["leftover"])
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self._source_state = state["source"]
        self._open_source()


# --- validation tokens ---------------------------------------------------------------------------

def build_eval_batches(source: datasets.IterableDataset, tokenize: Tokenize, *, eval_tokens: int,
                       batch_size: int) -> tuple[list[dict[str, torch.Tensor]], int]:
    """The first documents of the held-out stream (in file order), until `eval_tokens` predicted tokens.

    Fixed for every run and checkpoint. Returns the batches and the exact number of scored tokens.
    """
    sequences: list[list[int]] = []
    scored = 0
    pending: list[str] = []

    def flush() -> None:
        nonlocal scored
        if not pending:
            return
        for ids in tokenize(pending, truncate=True):
            if scored >= eval_tokens:
                break
            sequences.append(ids)
            scored += len(ids) - 1  # the first token of a sequence is never predicted
        pending.clear()

    for record in source:
        pending.append(record["text"])
        if len(pending) == 64:
            flush()
        if scored >= eval_tokens:
            break
    flush()
    if not sequences:
        raise UserError("the validation data holds no documents")
    batches = [tokenize.pad(sequences[i : i + batch_size]) for i in range(0, len(sequences), batch_size)]
    return batches, scored
