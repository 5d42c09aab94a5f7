"""Text -> token ids, tokenizing only the part of a document that is kept.

A padded (paper-mode) sequence keeps the first `max_length` tokens of a document, about half of an average C4
document. The text is therefore cut to a character budget before tokenizing, and the cut result is used only
when it provably equals tokenizing the whole text:

* The tokenizer's pre-tokenizer splits the normalized text into words at whitespace (T5: WhitespaceSplit +
  Metaspace), and the model tokenizes each word on its own; its normalizer maps characters without looking
  across words (T5: the SentencePiece charsmap). So a word's tokens depend on that word only.
* Cutting the text at any character leaves every word before the one the cut falls in (or just after)
  unchanged: each is still followed by the whitespace that ended it. Only the prefix's last word can differ.
* The cut result is used only if the kept tokens all come from words strictly before the prefix's last word
  (`word_ids`); then they are the first tokens of the whole text too. Otherwise (the budget held too few
  tokens: under 1% of C4 documents at 6 characters per token) the whole text is tokenized.

Tokenizers whose pipeline is not of that kind are never cut. Truncation and special tokens are applied
afterwards exactly as the tokenizer's own `truncation=True` does (truncate the content, then post-process),
and tests compare both on every document of the shared C4 shards.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from galore_train.errors import UserError

IGNORE_INDEX = -100
CHARS_PER_TOKEN = 6  # the cut's budget; 99% of C4 documents need under 5.5 characters per T5 token
# Pipeline parts that map characters or split at whitespace without looking across words.
WORD_LOCAL_NORMALIZERS = {"Precompiled", "NFC", "NFD", "NFKC", "NFKD", "Lowercase", "StripAccents", "BertNormalizer"}
WORD_SPLITTING_PRETOKENIZERS = {"WhitespaceSplit", "Whitespace", "Metaspace", "ByteLevel", "BertPreTokenizer"}


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
                raise UserError(
                    f"--tokenizer file must be a SentencePiece 'spiece.model' (or give its directory): {path}"
                )
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


def _parts(component: dict | None) -> list[str]:
    """Type names of a serialized normalizer/pre-tokenizer, Sequences flattened."""
    if component is None:
        return []
    if component["type"] == "Sequence":
        inner = component.get("normalizers", component.get("pretokenizers", []))
        return [name for part in inner for name in _parts(part)]
    return [component["type"]]


def cuttable(pipeline: dict) -> bool:
    """Whether a document's kept tokens may be computed from a cut of its text (see the module docstring)."""
    splitters = _parts(pipeline["pre_tokenizer"])
    return (
        bool(splitters)
        and set(splitters) <= WORD_SPLITTING_PRETOKENIZERS
        and set(_parts(pipeline["normalizer"])) <= WORD_LOCAL_NORMALIZERS
    )


def special_ids(pipeline: dict) -> tuple[list[int], list[int]] | None:
    """The ids a single sequence's template puts before and after its tokens (T5: none and </s>), or None when
    the post-processor is not a plain template (then each sequence goes through the tokenizer's own)."""
    processor = pipeline["post_processor"]
    if processor is None:
        return [], []
    if processor["type"] != "TemplateProcessing":
        return None
    pieces = processor["single"]
    sequence = next(i for i, piece in enumerate(pieces) if "Sequence" in piece)

    def ids(part: list[dict]) -> list[int]:
        return [i for piece in part for i in processor["special_tokens"][piece["SpecialToken"]["id"]]["ids"]]

    before, after = ids(pieces[:sequence]), ids(pieces[sequence + 1 :])
    return before, after


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the tokenizer's full definition (its Rust pipeline, or its name without one)."""
    backend = Tokenize.private_backend(tokenizer)
    definition = backend.to_str() if backend is not None else tokenizer.name_or_path
    return hashlib.sha256(definition.encode()).hexdigest()


class Tokenize:
    """Text -> ids of at most `max_length`, with ids the model cannot embed mapped to <unk>.

    The T5 tokenizer has 32,100 ids but the paper's LLaMA embeds 32,000: the 100 extra ids are the
    `<extra_id_N>` sentinels, produced only when a document literally contains that string.
    Safe to call from a producer thread and the main thread at once: the Rust tokenizer is a private copy
    whose settings are never changed, and `encode` has no side effects.
    """

    def __init__(self, tokenizer, max_length: int, vocab_size: int) -> None:
        special = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
        unembeddable = [i for i in range(vocab_size, len(tokenizer)) if i not in special]
        if unembeddable or tokenizer.unk_token_id >= vocab_size:
            raise UserError(
                f"the tokenizer has {len(tokenizer)} ids but the model embeds only {vocab_size}, and not all ids "
                "above that are special tokens: raise vocab_size in the model config"
            )
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.vocab_size = vocab_size
        self.unk_id = tokenizer.unk_token_id
        self.pad_id = tokenizer.pad_token_id
        self.eos_id = tokenizer.eos_token_id
        self.remapped_ids = 0
        self.backend = self.private_backend(tokenizer)
        self.fingerprint = tokenizer_fingerprint(tokenizer)
        self.cut_chars = None
        self.specials = None
        if self.backend is not None:
            self.content_length = max_length - tokenizer.num_special_tokens_to_add()
            pipeline = json.loads(self.backend.to_str())
            self.cut_chars = CHARS_PER_TOKEN * self.content_length if cuttable(pipeline) else None
            self.specials = special_ids(pipeline)

    @staticmethod
    def private_backend(tokenizer):
        """A copy of the Rust tokenizer that never truncates or pads (None for tokenizers without one)."""
        backend = copy.deepcopy(getattr(tokenizer, "backend_tokenizer", None))
        if backend is not None:
            backend.no_truncation()
            backend.no_padding()
        return backend

    def __call__(self, texts: list[str], truncate: bool) -> list[list[int]]:
        """`encode`, counting remapped ids (for calls from the main thread)."""
        encoded, remapped = self.encode(texts, truncate)
        self.remapped_ids += remapped
        return encoded

    def encode(self, texts: list[str], truncate: bool) -> tuple[list[list[int]], int]:
        """Ids of each text (the first `max_length` if `truncate`), and how many ids were mapped to <unk>."""
        if self.backend is None:  # a tokenizer without a Rust backend: its own (whole-text) path
            encoded = self.tokenizer(
                texts, truncation=truncate, max_length=self.max_length if truncate else None, add_special_tokens=True
            )["input_ids"]
        elif truncate:
            encoded = self._encode_kept(texts)
        else:
            encoded = [encoding.ids for encoding in self.backend.encode_batch(texts, add_special_tokens=True)]
        return self._in_vocab(encoded)

    def from_ids(self, documents: list[list[int]], truncate: bool) -> tuple[list[list[int]], int]:
        """`encode` for documents tokenized ahead (content ids without special tokens, see prepared.py)."""
        before, after = self.specials
        kept = self.content_length if truncate else None
        return self._in_vocab([before + ids[:kept] + after for ids in documents])

    def _in_vocab(self, encoded: list[list[int]]) -> tuple[list[list[int]], int]:
        remapped = sum(
            sum(i >= self.vocab_size for i in ids) for ids in encoded if max(ids, default=0) >= self.vocab_size
        )
        if remapped:
            encoded = [[i if i < self.vocab_size else self.unk_id for i in ids] for ids in encoded]
        return encoded, remapped

    def _encode_kept(self, texts: list[str]) -> list[list[int]]:
        budget = self.cut_chars
        cut = [text[:budget] if budget is not None and len(text) > budget else text for text in texts]
        encodings = self.backend.encode_batch(cut, add_special_tokens=False)
        redo = [
            i for i, encoding in enumerate(encodings) if cut[i] is not texts[i] and not self._kept_before_cut(encoding)
        ]
        if redo:
            for i, encoding in zip(redo, self.backend.encode_batch([texts[i] for i in redo], add_special_tokens=False)):
                encodings[i] = encoding
        if self.specials is not None:
            before, after = self.specials
            return [before + encoding.ids[: self.content_length] + after for encoding in encodings]
        kept = []
        for encoding in encodings:
            encoding.truncate(self.content_length)
            kept.append(self.backend.post_process(encoding).ids)
        return kept

    def _kept_before_cut(self, encoding) -> bool:
        """The kept tokens all lie in words before the last (possibly cut) word of the prefix."""
        words = encoding.word_ids
        return len(words) > self.content_length and words[self.content_length - 1] < words[-1]

    def pad(self, sequences: list[list[int]]) -> dict[str, torch.Tensor]:
        """Right-pad to max_length (see `batch`)."""
        input_ids = np.full((len(sequences), self.max_length), self.pad_id, dtype=np.int64)
        for row, ids in enumerate(sequences):
            input_ids[row, : len(ids)] = ids
        return self.batch(input_ids, np.array([len(ids) for ids in sequences], dtype=np.int64))

    @staticmethod
    def batch(input_ids: np.ndarray, lengths: np.ndarray) -> dict[str, torch.Tensor]:
        """A batch of rows holding `lengths` real ids each (then padding); labels ignore the padding so it is
        neither learned nor counted."""
        attention_mask = torch.from_numpy((np.arange(input_ids.shape[1]) < lengths[:, None]).astype(np.int64))
        input_ids = torch.from_numpy(input_ids)
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def remap(self, ids: np.ndarray, lengths: np.ndarray | None = None) -> int:
        """`_in_vocab` in place on an array (of rows holding `lengths` real ids each): how many ids it mapped."""
        unembeddable = ids >= self.vocab_size
        if lengths is not None:
            unembeddable &= np.arange(ids.shape[1]) < lengths[:, None]
        ids[unembeddable] = self.unk_id
        return int(unembeddable.sum())
