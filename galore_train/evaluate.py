"""Validation: token-weighted cross-entropy on a fixed set of held-out tokens; perplexity = exp(loss)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from galore_train.data import IGNORE_INDEX
from galore_train.distributed import DistEnv, all_reduce_sum, choose_device
from galore_train.errors import UserError
from galore_train.model import resolve_dtype

# Evaluation runs without gradients or saved activations, so it fits larger batches than training does; at the
# micro-batch of a 7B run (1) it would be tens of thousands of single-sequence forwards per evaluation.
EVAL_BATCH_SIZE = 16


def eval_batch_size(cfg: Any) -> int:
    """--eval-batch-size, else the training micro-batch but at least EVAL_BATCH_SIZE sequences: a forward
    without backward keeps no activations, and its largest tensors are the logits (7B at 16 x 256 tokens: 0.24 GiB
    in bf16, then about 1 GiB for their float32 copy and log-probabilities)."""
    return cfg.eval_batch_size or max(cfg.batch_size, EVAL_BATCH_SIZE)


def summed_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of next-token losses over the batch's labelled positions (count them with `target_count`)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # Shift the labels, not the logits: slicing the vocabulary-sized logits would copy them, and their
    # gradient again in backward (~15% of a llama_9m step on CPU, scripts/bench_loop.py).
    targets = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A host batch on `device`; non-blocking from pinned memory (the prefetch thread pins it on CUDA)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def target_count(batch: dict[str, torch.Tensor]) -> int:
    """Labelled next-token positions of a host (CPU) batch: counted without reading from the device."""
    return int((batch["labels"][:, 1:].numpy() != IGNORE_INDEX).sum())


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: list[dict[str, torch.Tensor]], device: torch.device, env: DistEnv = DistEnv()
) -> dict[str, float]:
    """Each rank scores every world_size-th batch; sums are reduced so the result equals one process's."""
    was_training = model.training
    model.eval()
    loss_sum, tokens = 0.0, 0
    for batch in batches[env.rank :: env.world_size]:
        loss_sum += summed_loss(model, to_device(batch, device)).item()
        tokens += target_count(batch)
    model.train(was_training)
    loss_sum, tokens = all_reduce_sum([loss_sum, float(tokens)], env)
    loss = loss_sum / max(tokens, 1.0)
    return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0)), "val_tokens": int(tokens)}


def score_checkpoint(
    path: Path,
    *,
    eval_data_files: Optional[str],
    tokenizer: Optional[str],
    eval_tokens: Optional[int],
    batch_size: Optional[int],
    dtype: str,
) -> dict[str, Any]:
    """`galore-train eval`: the run's own validation tokens (unless overridden) on a saved checkpoint."""
    from transformers import AutoModelForCausalLM

    from galore_train.checkpoint import resolve_checkpoint
    from galore_train.config import TrainConfig
    from galore_train.data import Tokenize, build_eval_batches, document_source, load_tokenizer

    path = resolve_checkpoint(Path(path))
    config_file = path / "train_config.json"
    if not config_file.is_file():
        raise UserError(f"{path} is not a galore-train checkpoint (no train_config.json)")
    cfg = TrainConfig.from_dict(json.loads(config_file.read_text()))
    device = choose_device()
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=resolve_dtype(dtype, device)).to(device)
    tokenize = Tokenize(load_tokenizer(tokenizer or cfg.tokenizer), cfg.max_length, model.config.vocab_size)
    files = eval_data_files or cfg.eval_data_files
    source = document_source(files, "--eval-data-files", cfg.dataset, cfg.dataset_config, "validation")
    batches, _ = build_eval_batches(
        source,
        tokenize,
        eval_tokens=eval_tokens or cfg.eval_tokens,
        batch_size=batch_size or eval_batch_size(cfg),
    )
    return {"checkpoint": str(path), **evaluate(model, batches, device)}
