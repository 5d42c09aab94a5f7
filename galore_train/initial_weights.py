"""A meta-device LLaMA's initial weights, written where it trains: no process ever holds the whole model on the host.

`model.meta_llama` allocates nothing; `fill_weights` gives every tensor storage on the target device (`to_empty`)
and writes the values transformers' `PreTrainedModel._init_weights` gives LLaMA (transformers 5): normal(0,
initializer_range) for Linear and Embedding weights with the Embedding's padding row zero, ones for RMSNorm weights,
zeros for biases (a tied lm_head is the embedding, filled once); the rotary embedding's non-persistent buffers
(`inv_freq`) are recomputed on the host, as a host-built model has them (a few hundred floats), then copied.

Each parameter draws from its own generator on the target device, seeded from (run seed, parameter name), so the
values depend neither on the fill order nor on sharding: under FSDP2 (parameters are DTensors) each rank generates
the full parameter, one at a time, and keeps its shard (peak extra: one matrix), and N ranks hold exactly the
shards of the single-process model (tests/test_initial_weights.py). The values do depend on the device type: CPU
and CUDA generators give different streams (and CUDA's may differ between GPU models, whose launch grid places
the Philox offsets), so a run's weights are reproducible on the same kind of device.
"""

from __future__ import annotations

import hashlib
from typing import Iterator

import torch
from torch import nn


def parameter_seed(seed: int, name: str) -> int:
    """A 63-bit seed from (run seed, parameter name): stable across processes and Python runs (not `hash`)."""
    digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


@torch.no_grad()
def fill_weights(model: nn.Module, device: torch.device, seed: int) -> nn.Module:
    """Storage on `device` for a meta-built (possibly FSDP2-sharded) LLaMA and its initial values, in place.

    Also seeds the global generator with `seed`, for what draws from it after the build (LoRA's adapters,
    low-rank factors), as building on the host did."""
    torch.manual_seed(seed)
    _to_empty_keeping_ties(model, device)
    std = model.config.initializer_range or 0.02  # transformers' fallback
    for name, module, param in _owned_parameters(model):
        full = _full_tensor(param)
        generator = torch.Generator(device=full.device).manual_seed(parameter_seed(seed, name))
        _initial_values(full, module, name, std, generator)
        _keep_shard(param, full)
    _recompute_buffers(model)
    return model


def _to_empty_keeping_ties(model: nn.Module, device: torch.device) -> None:
    """`to_empty` gives each module its own new parameter: a tied weight (`tie_word_embeddings`: lm_head is
    embed_tokens) would come back as two. The ties are put back."""
    first: dict[int, tuple[nn.Module, str]] = {}
    ties = []
    for module in model.modules():
        for local_name, param in module.named_parameters(recurse=False):
            if id(param) in first:
                ties.append((module, local_name, *first[id(param)]))
            else:
                first[id(param)] = (module, local_name)
    model.to_empty(device=device)
    for module, local_name, owner, owner_name in ties:
        setattr(module, local_name, getattr(owner, owner_name))


def _owned_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Module, nn.Parameter]]:
    """(full name, owning module, parameter), each parameter once (a tied weight under its first name)."""
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for local_name, param in module.named_parameters(recurse=False):
            if id(param) not in seen:
                seen.add(id(param))
                yield f"{module_name}.{local_name}" if module_name else local_name, module, param


def _full_tensor(param: nn.Parameter) -> torch.Tensor:
    """Where the full parameter is generated: the parameter itself, or (a DTensor shard) a new tensor of the
    global shape on the shard's device."""
    if getattr(param, "placements", None) is None:
        return param
    local = param.to_local()
    return torch.empty(param.shape, dtype=local.dtype, device=local.device)


def _initial_values(full: torch.Tensor, module: nn.Module, name: str, std: float, generator: torch.Generator) -> None:
    """transformers' rule for LLaMA's modules (RMSNorm matched by class name, as transformers does)."""
    if name.endswith(".bias"):
        full.zero_()
    elif "RMSNorm" in type(module).__name__:
        full.fill_(1.0)
    elif isinstance(module, (nn.Linear, nn.Embedding)):
        full.normal_(0.0, std, generator=generator)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            full[module.padding_idx] = 0
    else:
        raise TypeError(f"no initial value known for {name} ({type(module).__name__})")


def _keep_shard(param: nn.Parameter, full: torch.Tensor) -> None:
    """Copy this rank's piece of `full` into a DTensor parameter (DTensor's Shard: torch.chunk per mesh dimension,
    trailing ranks possibly empty); nothing for a plain parameter, filled in place."""
    if full is param:
        return
    piece = full
    for mesh_dim, placement in enumerate(param.placements):
        if placement.is_shard():
            chunks = piece.chunk(param.device_mesh.size(mesh_dim), dim=placement.dim)
            index = param.device_mesh.get_local_rank(mesh_dim)
            piece = chunks[index] if index < len(chunks) else piece.narrow(placement.dim, 0, 0)
    local = param.to_local()
    if piece.shape != local.shape:
        raise RuntimeError(
            f"placements {param.placements} give a {tuple(piece.shape)} shard, the rank holds {tuple(local.shape)}"
        )
    local.copy_(piece)


def _recompute_buffers(model: nn.Module) -> None:
    """`to_empty` leaves buffers uninitialised: LLaMA's are the rotary embedding's, functions of its config."""
    for name, module in model.named_modules():
        buffers = dict(module.named_buffers(recurse=False))
        if not buffers:
            continue
        if "RotaryEmbedding" not in type(module).__name__:
            raise TypeError(f"cannot recompute the buffers {sorted(buffers)} of {name} ({type(module).__name__})")
        with torch.device("cpu"):
            fresh = type(module)(module.config)
        for key, value in fresh.named_buffers(recurse=False):
            buffers[key].copy_(value)
