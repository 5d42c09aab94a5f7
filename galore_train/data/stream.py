"""The resumable training stream of one rank: seeded document shuffle, tokenization, batches.

Shard order follows the seed and the epoch; documents are mixed by our own seeded buffer, whose contents are
part of the state, so a resumed run continues with exactly the batch it would have seen.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

import datasets
import torch
from datasets.distributed import split_dataset_by_node

from galore_train.data.tokens import Tokenize
from galore_train.errors import UserError

Batch = dict[str, torch.Tensor]


class BatchStream:
    """Endless, resumable stream of training batches for one rank (single-threaded; see prefetch.py).

    Position = (epoch, the source's own `datasets` state, our shuffle buffer and RNG, pack leftover).
    The source restarts with a new shard order each epoch; epochs are counted and reported.
    """

    def __init__(
        self,
        make_source: Callable[[], datasets.IterableDataset],
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
        self.buffer: list[str | list[int]] = []
        self.leftover: list[int] = []
        self._source_state: dict | None = None
        self._tokens_per_document = float(tokenize.max_length)  # running mean, sizes pack-mode tokenizer calls
        self._documents_packed = 0
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

    def _next_document(self) -> str | list[int]:
        while len(self.buffer) <= self.shuffle_buffer:
            try:
                record = next(self.iterator)
                self.buffer.append(record["text"] if "text" in record else record["ids"])  # ids: prepared data
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
