"""FSDP2 (`--distributed fsdp`): sharding the model, and its state in and out of the one checkpoint format.

Each decoder layer and the root are `fully_shard`-ed: weights, gradients and optimizer state become row-block
DTensors, all-gathered per layer for forward/backward. The optimizers marked fsdp in the registry run on
shards: adamw, adam (elementwise), adafactor, and GaLore-AdamW, its 8-bit variant, GaLore-Adafactor, Natural
GaLore, Fira, APOLLO and APOLLO-Mini with right-side projections (row-local between refreshes, up to a few small
all-reduces; a refresh gathers one matrix's gradient to its owner: galore_train/optim/row_shards.py), and Muon (its
8-bit variant too: each matrix's momentum rows gathered to its owner for Newton-Schulz, the result's rows scattered
back: galore_train/optim/orthogonalize.py). Others are refused.
With --layerwise each parameter is updated inside backward, from the gradient hook FSDP2 runs on its
reduce-scattered shard (`runs_sharded_gradient_hooks`; galore_train/optim/layerwise.py).

Checkpoints stay in one format whatever the mode: full weights (safetensors) and torch's index-keyed
optimizer state, gathered to rank 0's CPU on save and re-sharded on resume.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.torch_version import TorchVersion

from galore_train.distributed import DistEnv, is_sharded
from galore_train.errors import UserError
from galore_train.registry import FSDP_NAMES, OPTIMIZERS


def check_fsdp_supported(cfg: Any) -> None:
    """UserError for what FSDP2 sharding cannot run correctly yet (see the module docstring)."""
    if cfg.layerwise and not runs_sharded_gradient_hooks():
        raise UserError(
            f"--layerwise under --distributed fsdp needs an FSDP2 that runs the sharded parameters' gradient hooks"
            f" (torch >= 2.5); torch {torch.__version__} does not: use --distributed ddp"
        )
    spec = OPTIMIZERS.get(cfg.optimizer)
    built = (spec.eightbit or cfg.optimizer) if spec and cfg.eightbit else cfg.optimizer  # what --8bit builds
    if built not in FSDP_NAMES:  # FSDP-capable in the registry: correct on row shards
        chosen = f"{cfg.optimizer}{' --8bit' if cfg.eightbit else ''}"
        raise UserError(
            f"--distributed fsdp supports --optimizer {', '.join(FSDP_NAMES)} (--8bit: galore_adamw, muon) for now; "
            f"{chosen} does not run on sharded weights yet: use --distributed ddp"
        )
    if OPTIMIZERS[built].galore and cfg.proj_type != "right":
        raise UserError(
            "GaLore under --distributed fsdp projects each rank's rows of the gradient: use --proj-type "
            f"right (got {cfg.proj_type}; see docs/distributed.md)"
        )


# The torch release whose FSDP2 runs sharded parameters' post-accumulate-grad hooks (pytorch#129450).
SHARDED_GRADIENT_HOOKS_SINCE = (2, 5)


def runs_sharded_gradient_hooks(version: str = torch.__version__) -> bool:
    """Whether the installed FSDP2 runs a sharded parameter's post-accumulate-grad hooks right after writing its
    reduce-scattered gradient shard, which layer-wise updates under FSDP rely on.

    Autograd never sees FSDP2's sharded parameters (it accumulates into the unsharded ones), so their hooks run
    only because FSDP2's `foreach_reduce` calls them itself, since torch 2.5: a version check (TorchVersion
    compares dev and local builds such as 2.6.0a0+git1234 or 2.7.1+cu126 by their release), below the
    pyproject's floor of 2.6, so no supported torch is refused; tests/test_distributed_layerwise.py runs them."""
    return TorchVersion(version) >= SHARDED_GRADIENT_HOOKS_SINCE


def shard_model(model: nn.Module, cfg: Any, env: DistEnv) -> nn.Module:
    """With `--distributed fsdp` under torchrun (one process too): FSDP2-shard `model` in place (each decoder
    layer, then the root) and return it. Must run before the optimizer is built: sharding replaces the parameters."""
    if not env.launched or cfg.distributed != "fsdp":
        return model
    check_fsdp_supported(cfg)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(env.device.type, (env.world_size,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


# --- checkpoint state ------------------------------------------------------------------------------


def _full_state_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def _parameter_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Names of the optimizer's parameters in its own order (= the indices of its state_dict)."""
    names = {param: name for name, param in model.named_parameters()}
    return [names[p] for group in optimizer.param_groups for p in group["params"]]


def full_model_state(model: nn.Module) -> Optional[dict[str, torch.Tensor]]:
    """FSDP: the full weights, gathered on rank 0's CPU (collective: every rank must call; others get {}).
    None when not sharded: `save_pretrained` then reads the module itself."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full_state_options())


def optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """`optimizer.state_dict()`; under FSDP the same index-keyed format with full tensors, gathered on
    rank 0 (collective: every rank must call), so checkpoints do not depend on --distributed."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    full = get_optimizer_state_dict(model, optimizer, options=_full_state_options())
    if not full:  # ranks other than 0
        return {}
    index = {name: i for i, name in enumerate(_parameter_names(model, optimizer))}
    return {
        "state": {index[name]: state for name, state in full["state"].items()},
        "param_groups": [
            {**group, "params": [index[name] for name in group["params"]]} for group in full["param_groups"]
        ],
    }


def load_full_weights(model: nn.Module, read: Callable[[], dict[str, torch.Tensor]]) -> None:
    """FSDP: full weights into the sharded model; only rank 0 calls `read` (they stay on its CPU), and
    torch broadcasts them one tensor at a time, each rank keeping its shard (collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    state = read() if dist.get_rank() == 0 else {}
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def load_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load an index-keyed optimizer state (from any mode); under FSDP each rank keeps its shard."""
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _parameter_names(model, optimizer)
    by_name = {
        "state": {names[int(i)]: s for i, s in state["state"].items()},
        "param_groups": [{**group, "params": [names[i] for i in group["params"]]} for group in state["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
    if hasattr(optimizer, "svd_metrics"):  # GaLore: not the zero-gradient refreshes of torch's state initialisation
        optimizer.svd_metrics()
