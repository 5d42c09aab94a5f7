"""The fixed held-out batches every evaluation scores."""

from __future__ import annotations

import datasets
import torch

from galore_train.data.tokens import Tokenize
from galore_train.errors import UserError


def build_eval_batches(
    source: datasets.IterableDataset, tokenize: Tokenize, *, eval_tokens: int, batch_size: int
) -> tuple[list[dict[str, torch.Tensor]], int]:
    """The first documents of the held-out stream (in file order), until `eval_tokens` predicted tokens.

    Fixed for every run and checkpoint. Returns the batches and the exact number of scored tokens.
    """
    sequences, scored = eval_sequences(source, tokenize, eval_tokens=eval_tokens)
    return pad_batches(sequences, tokenize, batch_size), scored


def pad_batches(sequences: list[list[int]], tokenize: Tokenize, batch_size: int) -> list[dict[str, torch.Tensor]]:
    return [tokenize.pad(sequences[i : i + batch_size]) for i in range(0, len(sequences), batch_size)]


def eval_sequences(
    source: datasets.IterableDataset, tokenize: Tokenize, *, eval_tokens: int
) -> tuple[list[list[int]], int]:
    """The validation sequences (ids) and the number of tokens they score."""
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
    return sequences, scored
