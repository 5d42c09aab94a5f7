"""Model configs and construction: LlamaForCausalLM from configs/<name>.json.

Also home of the one rule that says which linear layers are "targets" (GaLore projects their
gradients, LoRA/ReLoRA/low-rank replace them, the memory estimator counts them).
"""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path
from typing import Iterable

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from galore_train.checkpoint import resolve_checkpoint
from galore_train.errors import UserError
from galore_train.initial_weights import fill_weights

_PACKAGE_DIR = Path(__file__).resolve().parent
# Installed wheels carry the configs inside the package; an editable checkout reads the top-level folder.
CONFIG_DIRS = (_PACKAGE_DIR / "configs", _PACKAGE_DIR.parent / "configs")

# Module-name rules for --galore-targets: LLaMA's attention and MLP projections.
TARGET_GROUPS = {
    "attn": r"\.self_attn\.(q_proj|k_proj|v_proj|o_proj)$",
    "mlp": r"\.mlp\.(gate_proj|up_proj|down_proj)$",
}


def config_dir() -> Path:
    for candidate in CONFIG_DIRS:
        if candidate.is_dir():
            return candidate
    raise UserError(f"no configs/ folder found (looked in {', '.join(map(str, CONFIG_DIRS))})")


def known_model_names() -> list[str]:
    return sorted(p.stem for p in config_dir().glob("*.json"))


def resolve_config_path(model: str) -> Path:
    """A config name (llama_60m) or a path to a JSON file."""
    path = Path(model)
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise UserError(f"model config file not found: {model}")
        return path
    candidate = config_dir() / f"{model}.json"
    if not candidate.is_file():
        raise UserError(
            f"unknown model {model!r}; known: {', '.join(known_model_names())} (or give a path to a JSON config)"
        )
    return candidate


def load_model_config(model: str) -> LlamaConfig:
    """Read a LlamaConfig, turning bad JSON or missing sizes into one-line errors."""
    path = resolve_config_path(model)
    try:
        with open(path) as f:
            raw = json.load(f)
    except json.JSONDecodeError as err:
        raise UserError(f"invalid JSON in model config {path}: {err}") from None
    except OSError as err:
        raise UserError(f"cannot read model config {path}: {err.strerror}") from None
    if not isinstance(raw, dict):
        raise UserError(f"model config {path} must hold a JSON object")
    required = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [key for key in required if key not in raw]
    if missing:
        raise UserError(f"model config {path} lacks {', '.join(missing)}")
    config = LlamaConfig(**raw)
    config.use_cache = False
    return config


def meta_llama(model_config: LlamaConfig, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """LLaMA with SDPA attention in `dtype` on the meta device: shapes only, no storage, no values."""
    model_config._attn_implementation = "sdpa"
    with torch.device("meta"):
        return LlamaForCausalLM._from_config(model_config, dtype=dtype)


def build_model(
    model_config: LlamaConfig, seed: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> LlamaForCausalLM:
    """Random-init LLaMA (seeded) with SDPA attention, in `dtype` on `device`: built on the meta device and
    filled there (galore_train/initial_weights.py), so a 7B model never passes through the host.

    Built in `dtype` directly: the bf16 values equal the fp32 ones cast (tests/test_model.py)."""
    return fill_weights(meta_llama(model_config, dtype), torch.device(device), seed)


ARCHITECTURE_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "hidden_act",
    "tie_word_embeddings",
)


def architecture_differences(old: LlamaConfig, new: LlamaConfig) -> list[tuple[str, object, object]]:
    """(field, old value, new value) for each ARCHITECTURE_FIELDS entry that differs: configs that build
    different weights, whatever their file names."""
    return [
        (name, getattr(old, name), getattr(new, name))
        for name in ARCHITECTURE_FIELDS
        if getattr(old, name) != getattr(new, name)
    ]


def _looks_like_path(source: str) -> bool:
    """Not a hub id: those are "name" or "owner/name", never start with "." or "~", never hold a backslash.
    An "owner/name" whose "owner" folder exists here is taken as a path too."""
    path = Path(source)
    return (
        source.startswith((".", "~"))
        or path.is_absolute()
        or source.count("/") > 1
        or "\\" in source
        or (len(path.parts) > 1 and path.parent.exists())
    )


def init_weights_source(source: str) -> str:
    """--init-from as from_pretrained takes it: a local folder of weights, or the hub id unchanged.

    A run folder or its checkpoints/ folder means its latest checkpoint (as `galore-train eval --checkpoint`);
    a folder without config.json would otherwise load as a default-sized LlamaConfig.
    """
    path = Path(source).expanduser()
    if path.exists():
        folder = resolve_checkpoint(path)
        if not (folder / "config.json").is_file():
            raise UserError(
                f"--init-from {source} holds no model weights (no config.json, no checkpoint): "
                "give a checkpoint folder, a run folder or its checkpoints/ folder"
            )
        return str(folder)
    if _looks_like_path(source):
        raise UserError(f"--init-from {source}: no such file or directory")
    return source


def load_pretrained_llama(source: str, expected: LlamaConfig, dtype: torch.dtype) -> LlamaForCausalLM:
    """Existing HF LLaMA weights (a folder, a run's latest checkpoint, or a hub id) for continued pretraining,
    checked against --model."""
    source = init_weights_source(source)
    try:
        found = LlamaConfig.from_pretrained(source)
    except Exception as err:
        raise UserError(f"cannot read --init-from {source!r}: {str(err).splitlines()[0]}") from None
    differing = [f"{name} {old} (--model: {new})" for name, old, new in architecture_differences(found, expected)]
    if differing:
        raise UserError(f"--init-from {source} does not match --model: {', '.join(differing)}")
    model = LlamaForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation="sdpa")
    model.config.use_cache = False
    return model


def count_parameters(model_config: LlamaConfig) -> int:
    """Parameter count without allocating weights (meta device)."""
    return sum(p.numel() for p in meta_llama(model_config).parameters())


def target_patterns(targets: Iterable[str]) -> list[re.Pattern]:
    """Turn --galore-targets entries ('attn', 'mlp' or regexes) into compiled patterns."""
    patterns = []
    for target in targets:
        text = TARGET_GROUPS.get(target, target)
        try:
            patterns.append(re.compile(text))
        except re.error as err:
            raise UserError(f"--galore-targets entry {target!r} is not 'attn', 'mlp' or a valid regex: {err}") from None
    return patterns


def target_linear_modules(model: nn.Module, targets: Iterable[str]) -> dict[str, nn.Linear]:
    """Named nn.Linear modules that the low-rank methods act on, in model order. Each target must match."""
    targets = list(targets)
    patterns = target_patterns(targets)
    hits = [0] * len(patterns)
    found: dict[str, nn.Linear] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        for i, pattern in enumerate(patterns):
            if pattern.search(name):
                hits[i] += 1
                found[name] = module
    for target, count in zip(targets, hits):
        if count == 0:
            raise UserError(f"--galore-targets entry {target!r} matches no linear layer of the model")
    return found


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bf16 where the GPU computes it natively; fp32 on CPU (bf16 matmuls are ~50x slower there).

    bf16 means pure bf16 weights, gradients and optimizer states, as in the paper's runs and memory
    figures (no fp32 master copy); fp32 is plain fp32.
    """
    if name == "fp32":
        return torch.float32
    if name == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and bf16_native(device):
        return torch.bfloat16
    return torch.float32


def bf16_native(device: torch.device) -> bool:
    """Whether the GPU computes bf16 in hardware (Ampere and later). V100 and T4 only emulate it, which
    `torch.cuda.is_bf16_supported()` counts as support; torch without `including_emulation` (older than
    2.4... the argument is detected, not assumed) falls back to the compute capability."""
    check = torch.cuda.is_bf16_supported
    if "including_emulation" in inspect.signature(check).parameters:
        return bool(check(including_emulation=False))
    return torch.cuda.get_device_capability(device) >= (8, 0)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
