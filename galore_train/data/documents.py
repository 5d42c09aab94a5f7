"""The documents a run reads: local C4 shards, a directory made by `galore-train prepare-data`, or the hub."""

from __future__ import annotations

import datasets

from galore_train.data.prepared import is_prepared, prepared_documents
from galore_train.data.sources import expand_data_files, hub_documents, local_documents
from galore_train.data.tokens import Tokenize
from galore_train.errors import UserError


def document_source(
    data_files: str | None, flag: str, dataset: str, config: str, split: str, tokenize: Tokenize | None = None
) -> datasets.IterableDataset:
    """Documents of local shards, of a directory made by `galore-train prepare-data` (given the run's `tokenize`,
    which it must have been prepared with), or of the hub."""
    if is_prepared(data_files):
        if tokenize is None:
            raise UserError(f"{flag} {data_files} is a prepared (tokenized) directory: only --data-files reads those")
        return prepared_documents(data_files, tokenize)
    if data_files:
        return local_documents(expand_data_files(data_files, flag))
    return hub_documents(dataset, config, split, flag)
