"""Muon's momentum buffer: full precision (torch.optim.Muon's) or 8-bit block-wise (`--8bit`, group key
"momentum_bits": 8).

The 8-bit momentum uses the block-wise code of the 8-bit GaLore and of bitsandbytes' 8-bit Adam: bitsandbytes'
signed dynamic map, blocks of 256 values with one float32 absmax each (layout.blockwise_8bit_moments), so an m x n
matrix keeps mn bytes + mn/64 bytes instead of 4mn. Each step dequantizes the buffer, takes the same
momentum step as the full-precision one (buf <- lerp(buf, g, 1 - mu); Nesterov: lerp(g, buf, mu)) and quantizes
it again (bitsandbytes' 8-bit optimizers do the same inside their kernel). Muon has no second moment; what is
orthogonalised is the Nesterov update computed from the dequantized buffer before requantization, as in the
full-precision step. Like bitsandbytes, matrices under 4096 values keep a full-precision buffer.

FSDP2 (row shards): each process quantizes its own rows; the blocks are those of the whole matrix when every
process's rows start a block (checked at construction, galore_adamw8bit's rule), so the state is one process's,
sharded, and the checkpoint is the same in every mode.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import Tensor

from galore_train.optim.base import group_names
from galore_train.optim.galore_adamw8bit import _check_blocks_follow_rows, _quantization_maps, import_bitsandbytes
from galore_train.optim.layout import EIGHTBIT_BLOCK, EIGHTBIT_MIN_SIZE, StateTensor, blockwise_8bit_moments
from galore_train.optim.row_shards import is_row_sharded, keep_local_state

BUFFER = "momentum_buffer"  # torch.optim.Muon's key; 8-bit: its uint8 codes
ABSMAX = f"{BUFFER}_absmax"


def quantized(group: Mapping[str, Any], numel: int) -> bool:
    """Whether a matrix of `numel` values (the whole matrix, also on a row shard) keeps an 8-bit momentum."""
    return group.get("momentum_bits", 32) == 8 and numel >= EIGHTBIT_MIN_SIZE


def check_group(group: dict[str, Any]) -> None:
    """ValueError for settings the momentum cannot honour: bits other than 32 and 8, and under FSDP2 8-bit
    blocks that would straddle two processes' rows."""
    bits = group.get("momentum_bits", 32)
    if bits not in (8, 32):
        raise ValueError(f"Muon's momentum_bits must be 8 or 32, got {bits}")
    for name, p in zip(group_names(group), group["params"]):
        if is_row_sharded(p) and quantized(group, p.numel()):
            _check_blocks_follow_rows(name, tuple(p.shape), p.device_mesh.size())


def layout(shape: tuple[int, ...], group: Mapping[str, Any], itemsize: int) -> list[StateTensor]:
    """The momentum's state tensors for one matrix (what the memory estimator adds up)."""
    numel = math.prod(shape)
    if quantized(group, numel):
        return blockwise_8bit_moments(numel, (BUFFER,), (ABSMAX,))
    return [StateTensor(BUFFER, numel, itemsize)]


def advance(p: Tensor, grad: Tensor, group: dict[str, Any], state: dict[str, Any]) -> Tensor:
    """One momentum step of parameter `p` from `grad` (this process's rows under FSDP2); returns the update to
    orthogonalise (Nesterov's, or the buffer itself)."""
    momentum = group["momentum"]
    if not quantized(group, p.numel()):
        if BUFFER not in state:
            state[BUFFER] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
        buf = state[BUFFER]
        buf = buf.to_local() if is_row_sharded(buf) else buf
        buf.lerp_(grad, 1 - momentum)
        return grad.lerp(buf, momentum) if group["nesterov"] else buf
    if BUFFER not in state:
        local = {
            BUFFER: torch.zeros(grad.shape, dtype=torch.uint8, device=grad.device),
            ABSMAX: torch.zeros(-(-grad.numel() // EIGHTBIT_BLOCK), dtype=torch.float32, device=grad.device),
        }
        if is_row_sharded(p):
            keep_local_state(state, local, p, {})  # DTensors: this process's rows and blocks
        else:
            state.update(local)
    codes, absmax = (state[key].to_local() if is_row_sharded(state[key]) else state[key] for key in (BUFFER, ABSMAX))
    functional = import_bitsandbytes().functional
    signed_map = _quantization_maps(grad.device)[0]
    buf = functional.dequantize_blockwise(codes, absmax=absmax, code=signed_map, blocksize=EIGHTBIT_BLOCK)
    buf = buf.to(grad.dtype)
    buf.lerp_(grad, 1 - momentum)
    update = grad.lerp(buf, momentum) if group["nesterov"] else buf
    functional.quantize_blockwise(buf.float(), code=signed_map, absmax=absmax, out=codes, blocksize=EIGHTBIT_BLOCK)
    return update


def restore_quantized(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
    """After torch's load, which casts every state tensor to its parameter's dtype (uint8 codes to float, float32
    block maxima to a bf16 weight's dtype): each 8-bit momentum's codes and maxima as saved. Saved parameter ids
    are matched by position, as torch does."""
    saved_ids = [index for group in state_dict["param_groups"] for index in group["params"]]
    params = dict(zip(saved_ids, (p for group in optimizer.param_groups for p in group["params"])))
    for index, saved in state_dict["state"].items():
        if ABSMAX in saved:
            for key in (BUFFER, ABSMAX):
                optimizer.state[params[index]][key] = saved[key].to(device=params[index].device)
