"""The order in which `datasets` streams a sharded source to one rank, computed from the shards' document counts.

`pretrain --data-files DIR` (prepared data) must give the batches of streaming the json shards, and the two must
be able to resume from each other's checkpoints, so it reproduces the document order *and* the position
(`state_dict`) of the pipeline `BatchStream` builds on `datasets` (5.x) -- without paying `datasets`' ~30 us per
document. That pipeline, for one epoch:

1. The shard list is permuted by `default_rng(seed)`, and again by `default_rng(epoch)` after epoch 0.
2. Rank split: if the shard count is a multiple of the world size, rank r keeps shards r, r + W, ...; otherwise
   every rank reads all shards and keeps documents r, r + W, ... of the result (reading them in groups of W).
3. The kept shards are cut into at most 10 contiguous groups (`shuffle`'s `max_buffer_input_shards`); a group
   reads its shards one after the other, and the groups are read round-robin, one document each, skipping groups
   that are exhausted.

`tests/test_data.py` compares order and `state_dict` with `datasets` itself at every position (ranks, epochs,
more than 10 shards, an empty shard) and resumes from its states, so a `datasets` release that changes any of
this fails there instead of silently changing the batches.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
from datasets.utils.sharding import _shuffle_gen_kwargs

from galore_train.errors import UserError

MAX_GROUPS = 10  # datasets' `IterableDataset.shuffle(max_buffer_input_shards=10)`
CHUNK_ROUNDS = 4096  # rounds of the round-robin materialized at a time


def shard_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    """The shard list's order in this epoch (with `datasets`' own gen_kwargs shuffle)."""
    order = _shuffle_gen_kwargs(np.random.default_rng(seed), {"shards": list(range(num_shards))})["shards"]
    if epoch:
        order = _shuffle_gen_kwargs(np.random.default_rng(epoch), {"shards": order})["shards"]
    return order


class ShardOrder:
    """One rank's documents of one epoch as global document indices, with `datasets`' state dicts.

    `counts[k]` is the number of documents of shard k; document j of shard k has global index
    `sum(counts[:k]) + j`. Iterating yields global indices; `state_dict()` is what the `datasets` pipeline would
    report after the same documents, and `state` (such a dict, e.g. from a run on the json shards) resumes.
    """

    def __init__(
        self, counts: list[int], seed: int, epoch: int, rank: int, world_size: int, state: dict | None = None
    ) -> None:
        self.epoch = epoch if world_size == 1 else 0  # `split_dataset_by_node` drops the epoch `set_epoch` gave
        shards = shard_order(len(counts), seed, self.epoch)
        self.step, self.offset = 1, 0
        if world_size > 1 and len(counts) % world_size == 0:
            shards = shards[rank::world_size]
        elif world_size > 1:
            self.step, self.offset = world_size, rank
        first = np.concatenate([[0], np.cumsum(counts)])
        size, extra = divmod(len(shards), min(len(shards), MAX_GROUPS))
        self.groups: list[list[int]] = []
        for group in range(min(len(shards), MAX_GROUPS)):
            start = size * group + min(group, extra)
            self.groups.append(shards[start : start + size + (group < extra)])
        # Per group: documents before each of its shards, and the global index of each shard's first document.
        self.bounds = [np.concatenate([[0], np.cumsum([counts[k] for k in group])]) for group in self.groups]
        self.first = [np.array([first[k] for k in group], dtype=np.int64) for group in self.groups]
        self.lengths = np.array([bounds[-1] for bounds in self.bounds], dtype=np.int64)
        self.total = int(self.lengths.sum())
        self.position = 0  # documents of the round-robin read so far (before the rank's step)
        self.finished = False
        if state is not None and state.get("epoch") == self.epoch:  # datasets ignores another epoch's position
            self._load(state)
        self._documents = self._read()

    def __iter__(self) -> Iterator[int]:
        return self._documents

    # --- the order ----------------------------------------------------------------------------
    def _round_at(self, position: int) -> tuple[int, int]:
        """The round of the round-robin read holding document `position`, and the position that round starts at."""
        low, high = 0, int(self.lengths.max(initial=0))  # the last round t with sum(min(L, t)) <= position
        while low < high:
            middle = (low + high + 1) // 2
            low, high = (middle, high) if np.minimum(self.lengths, middle).sum() <= position else (low, middle - 1)
        return low, int(np.minimum(self.lengths, low).sum())

    def _read(self) -> Iterator[int]:
        """This rank's documents from `self.position` on (keeping the position current)."""
        round_, position = self._round_at(self.position)
        skip, end = self.position - position, int(self.lengths.max(initial=0))
        while round_ < end:
            rounds = np.arange(round_, min(round_ + CHUNK_ROUNDS, end))
            which, groups = np.nonzero(self.lengths[None, :] > rounds[:, None])
            documents = self._global(groups, rounds[which]).tolist()
            first = skip + (self.offset - position - skip) % self.step  # this rank's first document from `skip` on
            for index in range(first, len(documents), self.step):
                # the rank's step reads its whole group of `step` documents (to the end, if fewer are left)
                read = position + index - self.offset + self.step
                self.position, self.finished = (read, False) if read <= self.total else (self.total, True)
                yield documents[index]
            position += len(documents)
            round_, skip = int(rounds[-1]) + 1, 0
        self.position, self.finished = self.total, True

    def _global(self, groups: np.ndarray, rounds: np.ndarray) -> np.ndarray:
        """Global indices of the documents number `rounds` of `groups`."""
        documents = np.empty(len(groups), dtype=np.int64)
        for group in np.unique(groups):
            mask = groups == group
            shard = np.searchsorted(self.bounds[group], rounds[mask], side="right") - 1
            documents[mask] = self.first[group][shard] + rounds[mask] - self.bounds[group][shard]
        return documents

    # --- the position, as datasets reports it ---------------------------------------------------------------
    def _read_per_group(self) -> np.ndarray:
        round_, start = self._round_at(self.position)
        counts = np.minimum(self.lengths, round_)
        counts[np.flatnonzero(self.lengths > round_)[: self.position - start]] += 1
        return counts

    def _group_of(self, position: int) -> int:
        round_, start = self._round_at(position)
        return int(np.flatnonzero(self.lengths > round_)[position - start])

    def state_dict(self) -> dict[str, Any]:
        read = self._read_per_group()
        nonempty_before = np.cumsum(self.lengths > 0) - (self.lengths > 0)
        visited = [self.finished or self.position > nonempty_before[g] for g in range(len(self.groups))]
        previous: list[dict | None] = []
        for group, count in enumerate(read):
            if self.lengths[group] == 0:  # read (and found empty) once the round-robin passed it
                previous.append(self._reader_state(len(self.groups[group]), 0) if visited[group] else None)
            elif count == 0:
                previous.append(None)
            else:  # right after its last document was read
                shard = int(np.searchsorted(self.bounds[group], count - 1, side="right")) - 1
                previous.append(self._reader_state(shard, int(count - self.bounds[group][shard])))
        exhausted = [
            bool(visited[g]) if self.lengths[g] == 0 else bool(read[g] == self.lengths[g])
            for g in range(len(self.groups))
        ]
        cycling = {
            "ex_iterable_idx": self._next_group(),
            "previous_states": previous,
            "is_exhausted": exhausted,
            "type": "CyclingMultiSourcesExamplesIterable",
        }
        if self.step > 1:
            cycling = {"examples_iterable": cycling, "stepped": 0, "type": "StepExamplesIterable"}
        return {"examples_iterable": cycling, "epoch": self.epoch}

    @staticmethod
    def _reader_state(shard: int, read: int) -> dict[str, Any]:
        return {"shard_idx": shard, "shard_example_idx": read, "type": "ExamplesIterable"}

    def _next_group(self) -> int:
        """The round-robin's next group: after the last read one; at the end, one further on, past the empty groups
        it had not reached yet (it visits them before it sees that every group is exhausted)."""
        count = len(self.groups)
        if self.position == 0:
            return 0
        group = (self._group_of(self.position - 1) + 1) % count
        if not self.finished:
            return group
        nonempty_before = np.cumsum(self.lengths > 0) - (self.lengths > 0)
        unvisited = {g for g in range(count) if self.lengths[g] == 0 and self.position <= nonempty_before[g]}
        while unvisited:
            unvisited.discard(group)
            group = (group + 1) % count
        return (group + 1) % count

    def _load(self, state: dict[str, Any]) -> None:
        try:
            cycling = state["examples_iterable"]
            previous = (cycling["examples_iterable"] if self.step > 1 else cycling)["previous_states"]
            if len(previous) != len(self.groups):
                raise ValueError(f"{len(previous)} groups of shards, this data has {len(self.groups)}")
            self.position = sum(
                0 if reader is None else int(bounds[reader["shard_idx"]]) + reader["shard_example_idx"]
                for reader, bounds in zip(previous, self.bounds)
            )
        except (KeyError, TypeError, IndexError, ValueError) as err:
            raise UserError(f"the saved data position does not fit this data or process count ({err})") from None
