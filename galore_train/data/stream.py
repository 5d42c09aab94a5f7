"""The resumable training stream of one rank: seeded document shuffle, tokenization, batches.

Shard order follows the seed and the epoch; documents are mixed by our own seeded buffer, whose contents are
part of the state, so a resumed run continues with exactly the batch it would have seen.
Prepared data (prepared.py) is read as document indices in `datasets`' order (shard_order.py) and its batches
are cut from the memory-mapped token files with numpy: no tokenizer, no per-token Python.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable
from typing import Any

import datasets
import numpy as np
import torch
from datasets.distributed import split_dataset_by_node

from galore_train.data.prepared import PreparedDocuments
from galore_train.data.shard_order import ShardOrder
from galore_train.data.tokens import Tokenize
from galore_train.errors import UserError

Batch = dict[str, torch.Tensor]
Document = str | list[int] | int  # a text, ids tokenized ahead (a resumed buffer), or a prepared document index


class BatchStream:
    """Endless, resumable stream of training batches for one rank (single-threaded; see prefetch.py).

    Position = (epoch, the source's own `datasets` state, our shuffle buffer and RNG, pack leftover).
    The source restarts with a new shard order each epoch; epochs are counted and reported.
    """

    def __init__(
        self,
        make_source: Callable[[], datasets.IterableDataset | PreparedDocuments],
        tokenize: Tokenize,
        *,
        batch_size: int,
        pack: bool,
        shuffle_buffer: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
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
        self.buffer: list[Document] = []
        self.leftover: list[int] | np.ndarray = []
        self._source_state: dict | None = None
        self._tokens_per_document = float(tokenize.max_length)  # running mean, sizes pack-mode tokenizer calls
        self._documents_packed = 0
        self._open_source()

    def _open_source(self) -> None:
        source = self.make_source()
        if isinstance(source, PreparedDocuments):
            self.prepared: PreparedDocuments | None = source
            self._specials = [np.asarray(ids, dtype=np.int64) for ids in self.tokenize.specials]
            self.source = source.order(self.seed, self.epoch, self.rank, self.world_size, self._source_state)
            self.iterator = iter(self.source)
            return
        self.prepared = None
        source = source.shuffle(seed=self.seed, buffer_size=1)  # shard order only
        source.set_epoch(self.epoch)
        if self.world_size > 1:
            source = split_dataset_by_node(source, rank=self.rank, world_size=self.world_size)
        if self._source_state is not None:
            source.load_state_dict(self._source_state)
        self.source = source
        self.iterator = (record["text"] for record in source)

    def _next_document(self) -> Document:
        while len(self.buffer) <= self.shuffle_buffer:
            try:
                self.buffer.append(next(self.iterator))
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

    def produce(self) -> tuple[Batch, int]:
        """The next batch, and how many of the ids tokenized for it were mapped to <unk>."""
        if self.prepared is not None:
            return self._produce_prepared()
        if not self.pack:
            ids, remapped = self._tokenize([self._next_document() for _ in range(self.batch_size)], truncate=True)
            return self.tokenize.pad(ids), remapped
        length = self.tokenize.max_length
        needed = self.batch_size * length
        remapped = 0
        while len(self.leftover) < needed:
            # Whole documents, several per tokenizer call: the token sequence is the same however they are grouped.
            count = math.ceil((needed - len(self.leftover)) / self._tokens_per_document)
            encoded, more = self._tokenize([self._next_document() for _ in range(count)], truncate=False)
            remapped += more
            for ids in encoded:
                self.leftover.extend(ids)
            self._documents_packed += count
            self._tokens_per_document += (
                sum(map(len, encoded)) - count * self._tokens_per_document
            ) / self._documents_packed
        chunk, self.leftover = self.leftover[:needed], self.leftover[needed:]
        return self.tokenize.pad([chunk[i : i + length] for i in range(0, needed, length)]), remapped

    def _produce_prepared(self) -> tuple[Batch, int]:
        """`produce` on prepared data: the same batches, cut from the token files. Documents of another kind (in the
        buffer of a run resumed from its json shards) go through `_tokenize` one by one."""
        return self._packed_prepared() if self.pack else self._padded_prepared()

    def _padded_prepared(self) -> tuple[Batch, int]:
        tokenize = self.tokenize
        documents = [self._next_document() for _ in range(self.batch_size)]
        prepared = [row for row, document in enumerate(documents) if isinstance(document, int)]
        input_ids = np.full((self.batch_size, tokenize.max_length), tokenize.pad_id, dtype=np.int64)
        lengths = np.empty(self.batch_size, dtype=np.int64)
        if prepared:  # `Tokenize.from_ids` on all rows at once: special tokens, the kept content, special tokens
            (before, after), width = self._specials, tokenize.content_length
            kept, counts = self.prepared.kept([documents[row] for row in prepared], width, tokenize.pad_id)
            rows = np.asarray(prepared)
            input_ids[rows, len(before) : len(before) + width] = kept
            input_ids[rows, : len(before)] = before
            ends = len(before) + counts
            input_ids[rows[:, None], ends[:, None] + np.arange(len(after))] = after
            lengths[rows] = ends + len(after)
        for row in set(range(self.batch_size)) - set(prepared):
            (ids,) = self._pieces(documents[row], truncate=True)
            input_ids[row, : len(ids)], lengths[row] = ids, len(ids)
        remapped = tokenize.remap(input_ids, lengths)  # before `batch` copies the labels
        return tokenize.batch(input_ids, lengths), remapped

    def _packed_prepared(self) -> tuple[Batch, int]:
        needed = self.batch_size * self.tokenize.max_length
        pieces, size = [np.asarray(self.leftover, dtype=np.int64)], len(self.leftover)
        while size < needed:  # documents one at a time: their lengths are known, so the leftover stays short
            more = self._pieces(self._next_document(), truncate=False)
            pieces += more
            size += sum(map(len, more))
        tokens = np.concatenate(pieces).astype(np.int64, copy=False)
        remapped = self.tokenize.remap(tokens[len(pieces[0]) :])  # the leftover was counted when it was read
        self.leftover = tokens[needed:]
        rows = tokens[:needed].reshape(self.batch_size, -1).copy()
        return self.tokenize.batch(rows, np.full(self.batch_size, rows.shape[1])), remapped

    def _pieces(self, document: Document, truncate: bool) -> list[np.ndarray]:
        """The document's ids in pieces (special tokens, content, special tokens: `Tokenize.from_ids`; or one piece
        for a document of another kind)."""
        before, after = self._specials
        if isinstance(document, int):
            content = self.prepared.ids(document)
            return [before, content[: self.tokenize.content_length] if truncate else content, after]
        (ids,), _ = self._tokenize([document], truncate)  # with special tokens, remapped (`remap` then counts 0)
        return [np.asarray(ids, dtype=np.int64)]

    def _tokenize(self, documents: list[str | list[int]], truncate: bool) -> tuple[list[list[int]], int]:
        """Texts are tokenized, prepared ids finished; both kinds meet after a resume that switched between json
        shards and their prepared directory (the buffer holds the old kind)."""
        texts = [i for i, document in enumerate(documents) if isinstance(document, str)]
        prepared = [i for i, document in enumerate(documents) if not isinstance(document, str)]
        from_texts, remapped = self.tokenize.encode([documents[i] for i in texts], truncate) if texts else ([], 0)
        from_ids, more = self.tokenize.from_ids([documents[i] for i in prepared], truncate) if prepared else ([], 0)
        encoded: list[list[int]] = [[]] * len(documents)
        for i, ids in [*zip(texts, from_texts), *zip(prepared, from_ids)]:
            encoded[i] = ids
        return encoded, remapped + more

    def snapshot(self) -> dict[str, Any]:
        """The position, cheaply (taken after every batch by the producer): `plain` makes it a `state_dict`, and
        `load_state_dict` takes either. Prepared documents stay indices here; they are written out as ids."""
        return {
            "epoch": self.epoch,
            "documents_read": self.documents_read,
            "source": copy.copy(self.source) if self.prepared is not None else self.source.state_dict(),
            "buffer": list(self.buffer),
            "leftover": self.leftover if isinstance(self.leftover, np.ndarray) else list(self.leftover),
            "rng": self.rng.getstate(),
        }

    def plain(self, snapshot: dict[str, Any]) -> dict[str, Any]:
        """Plain values only (saved as JSON beside the checkpoint), in the format streaming the json shards has."""
        source, leftover, (version, internal, gauss) = snapshot["source"], snapshot["leftover"], snapshot["rng"]
        return {
            **snapshot,
            "source": source.state_dict() if isinstance(source, ShardOrder) else source,
            "buffer": [self.prepared.ids(d).tolist() if isinstance(d, int) else d for d in snapshot["buffer"]],
            "leftover": leftover.tolist() if isinstance(leftover, np.ndarray) else leftover,
            "rng": [version, list(internal), gauss],
        }

    def state_dict(self) -> dict[str, Any]:
        return self.plain(self.snapshot())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A `state_dict` (or a `snapshot` of this stream)."""
        self.epoch = state["epoch"]
        self.documents_read = state["documents_read"]
        self.buffer = list(state["buffer"])
        self.leftover = state["leftover"] if isinstance(state["leftover"], np.ndarray) else list(state["leftover"])
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        source = state["source"]
        self._source_state = source.state_dict() if isinstance(source, ShardOrder) else source
        self._open_source()
