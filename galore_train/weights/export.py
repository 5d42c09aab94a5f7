"""Checkpoints of a run with INT8 weights: plain-transformers weights beside the exact INT8 state.

A checkpoint folder keeps its usual `model.safetensors` (what `from_pretrained` reads, then `generate`,
`galore-train eval`, `--init-from`): here every INT8 layer's weight dequantized to the run's dtype, so the
folder is an ordinary LLaMA checkpoint. Beside it, `int8_weights.safetensors` holds the codes and scales
themselves (`<layer>.weight_int8`, `<layer>.weight_scale`): resuming reads those (resume.load_weights), so
the continued run starts from the very codes the stopped one had, not a requantization of their values.

The dequantized copy is built on the CPU one layer at a time (the device never holds a float model); the
host holds it while it is written, as it holds an FSDP run's gathered weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file
from torch import nn

from galore_train.weights.int8_linear import int8_linears

INT8_FILE = "int8_weights.safetensors"
INT8_KEYS = ("weight_int8", "weight_scale")


def dequantized_state(model: nn.Module) -> Optional[dict[str, torch.Tensor]]:
    """The model's weights as a plain LLaMA state dict on the CPU (INT8 layers dequantized); None when the
    model has no INT8 layers (save it as usual)."""
    layers = dict(int8_linears(model))
    if not layers:
        return None
    state = {
        name: tensor.detach().cpu()
        for name, tensor in model.state_dict().items()
        if name.rpartition(".")[0] not in layers
    }
    for name, layer in layers.items():
        state[f"{name}.weight"] = layer.dequantized().cpu()
    return state


def save_int8_state(model: nn.Module, directory: Path) -> None:
    """Write the exact INT8 state (codes and scales) of every INT8 layer into `directory`, if there is any."""
    state = {
        f"{name}.{key}": getattr(layer, key).detach().cpu().contiguous()
        for name, layer in int8_linears(model)
        for key in INT8_KEYS
    }
    if state:
        save_file(state, str(Path(directory) / INT8_FILE))


def int8_state_files(directory: Path) -> list[Path]:
    """[the INT8 state file] if the checkpoint has one: read after model.safetensors when resuming."""
    path = Path(directory) / INT8_FILE
    return [path] if path.is_file() else []
