"""C4 documents -> tokenized training batches that know their own position.

documents: which source a run reads; sources: local shards or the hub; prepared: `prepare-data`'s token
files; tokens: text -> ids (tokenizing only what is kept);
stream: the resumable, shuffled batch stream; prefetch: batches made ahead on a producer thread;
evaluation: the fixed held-out batches; eval_cache: those tokenized once per run.
"""

from galore_train.data.documents import document_source
from galore_train.data.eval_cache import cached_eval_batches, eval_cache_key
from galore_train.data.evaluation import build_eval_batches
from galore_train.data.prefetch import PretrainingStream, pin_batches
from galore_train.data.sources import BAD_LINES, expand_data_files, read_c4_lines
from galore_train.data.tokens import IGNORE_INDEX, Tokenize, load_tokenizer

__all__ = [
    "BAD_LINES",
    "IGNORE_INDEX",
    "PretrainingStream",
    "Tokenize",
    "build_eval_batches",
    "cached_eval_batches",
    "document_source",
    "eval_cache_key",
    "expand_data_files",
    "load_tokenizer",
    "pin_batches",
    "read_c4_lines",
]
