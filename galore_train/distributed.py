"""Multi-process training under torchrun: process group, DDP wrapping, collectives, rank metrics.

Single-process runs (no torchrun, WORLD_SIZE=1) pay nothing: every helper here is then the identity.

Two data-parallel modes (`--distributed`, see docs/distributed.md):
  ddp   every rank holds the whole model and optimizer; backward averages gradients across ranks
        (all-reduce), so every optimizer, GaLore included, sees the same gradient on every rank.
  fsdp  FSDP2 `fully_shard` on each decoder layer and the root: weights, gradients and optimizer state
        are sharded; galore_train/fsdp.py shards the model and moves its state in and out of checkpoints.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from galore_train.errors import UserError
from galore_train.optim import traffic


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    launched: bool = False  # under torchrun: a process group exists, even for one process

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


# Set to "cpu" to keep a process off the GPUs even where CUDA is available (the CPU test suite does, so that its
# torchrun children use gloo on a GPU machine instead of NCCL on GPUs that may not exist).
DEVICE_ENV = "GALORE_TRAIN_DEVICE"


def launched_by_torchrun() -> bool:
    """Whether torchrun (or another env:// launcher) started this process: what init_process_group reads is set."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def choose_device(local_rank: int = 0, local_world_size: int = 1) -> torch.device:
    """cuda:LOCAL_RANK where CUDA is available (and not refused by GALORE_TRAIN_DEVICE=cpu), else the CPU.

    More processes on this node than GPUs is a one-line error: two processes on one GPU would each hold a
    whole model, and a local rank past the last GPU dies in CUDA with a traceback."""
    forced = os.environ.get(DEVICE_ENV, "")
    if forced not in ("", "cpu"):
        raise UserError(f"{DEVICE_ENV} may be 'cpu' or unset; got {forced!r}")
    if forced == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if local_world_size > count:
        raise UserError(
            f"torchrun started {local_world_size} processes on this machine but it has {count} GPU(s): pass"
            f" --nproc_per_node {count} (or fewer)"
        )
    return torch.device("cuda", local_rank)


def setup(timeout_minutes: float = 60.0) -> DistEnv:
    """Read torchrun's RANK/WORLD_SIZE/LOCAL_RANK; NCCL on CUDA, gloo on CPU.

    Under torchrun the process group is created even for one process (`--nproc_per_node 1`), so that
    `--distributed fsdp` on one GPU runs the FSDP path it asks for. `timeout_minutes` bounds every collective:
    a rank waiting longer (e.g. while rank 0 writes a 7B checkpoint, minutes on a slow filesystem) fails
    instead of hanging; torch's NCCL default is 10."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = choose_device(local_rank, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    launched = world_size > 1 or launched_by_torchrun()
    if launched and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=timeout_minutes)
        )
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=device, launched=launched)


GLOO_DRAIN_SECONDS = 0.1


def teardown() -> None:
    """Destroy the process group, first letting gloo's worker threads finish with the last collectives.

    A gloo worker frees a finished collective's tensors after the caller has moved on, and freeing one
    whose Python object is already gone takes the GIL. The group itself is destroyed later, when the
    DDP wrapper is freed, by a destructor that joins those workers while holding the GIL: a worker
    still waiting for it then hangs the process forever, after the last checkpoint (measured on CPU:
    1 in 8 two-process CLI runs, 1 in 20 bare launches). Sleeping releases the GIL so the workers finish
    first: 0 hangs in 30 CLI runs and 20 bare launches since.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_backend() == "gloo":
        time.sleep(GLOO_DRAIN_SECONDS)
    dist.destroy_process_group()


def all_reduce_sum(values: list[float], env: DistEnv) -> list[float]:
    """Sum plain numbers over ranks (identity when single-process)."""
    if not env.enabled:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=env.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def any_rank(flag: bool, env: DistEnv) -> bool:
    """True on every rank when `flag` is True on any rank (e.g. a stop signal that reached only some)."""
    if not env.enabled:
        return flag
    return all_reduce_sum([float(flag)], env)[0] > 0


def gather_floats(value: float, env: DistEnv) -> list[float]:
    """One number from every rank, in rank order."""
    if not env.enabled:
        return [value]
    tensor = torch.tensor([value], dtype=torch.float64, device=env.device)
    gathered = [torch.empty_like(tensor) for _ in range(env.world_size)]
    dist.all_gather(gathered, tensor)
    return [t.item() for t in gathered]


def gather_objects(value: Any, env: DistEnv) -> list[Any]:
    """One picklable value from every rank, in rank order, on every rank."""
    if not env.enabled:
        return [value]
    gathered: list[Any] = [None] * env.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def gather_to_main(value: Any, env: DistEnv) -> Optional[list[Any]]:
    """One picklable value from every rank, in rank order, on rank 0 only (None elsewhere): what only the
    checkpoint writer needs does not travel through every GPU."""
    if not env.enabled:
        return [value]
    gathered: Optional[list[Any]] = [None] * env.world_size if env.is_main else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


def all_finite(tensors: Iterable[torch.Tensor], env: DistEnv) -> bool:
    """Whether every element of `tensors` is finite on every rank (FSDP: each rank checks its shards).
    One device sync, not one per tensor."""
    checks = [torch.isfinite(t.to_local() if hasattr(t, "to_local") else t).all() for t in tensors]
    finite = bool(torch.stack(checks).all()) if checks else True
    return not any_rank(not finite, env)


# --- wrapping ------------------------------------------------------------------------------------


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def wrap_model(
    model: nn.Module, env: DistEnv, *, layerwise: bool = False, synced_elsewhere: Sequence[torch.Tensor] = ()
) -> nn.Module:
    """The module that runs forward/backward: a DDP wrapper under torchrun, else `model` itself
    (single process, or already FSDP-sharded). `model` stays the plain module for optimizers,
    methods and checkpoints; DDP shares its parameters.

    Layer-wise updates average each gradient in their own hooks (`gradient_averager`), which must run
    before the update, so the model is not wrapped: its weights are broadcast from rank 0 here, as
    DDP's constructor would.

    `synced_elsewhere`: parameters whose gradients the step driver averages itself (low-rank sync,
    optim/lowrank_sync.py): left out of DDP's buckets, their weights broadcast from rank 0 here. DDP's bucket
    all-reduces go through a hook that counts their bytes (optim/traffic.py)."""
    if not env.enabled or is_sharded(model):
        return model
    # INT8 weights (weights/int8_linear.py): a surrogate parameter has no storage to broadcast into; its
    # state (codes, scales) is in the state dict, broadcast here instead of by DDP's constructor.
    surrogates = any(0 in p.stride() for p in model.parameters() if p.dim())
    if layerwise or surrogates:
        with torch.no_grad():
            for tensor in model.state_dict().values():
                dist.broadcast(tensor, src=0)
    if layerwise:
        return model
    device_ids = [env.device.index] if env.device.type == "cuda" else None
    if synced_elsewhere:
        ignored = {id(p) for p in synced_elsewhere}
        names = [name for name, p in model.named_parameters() if id(p) in ignored]
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
        with torch.no_grad():
            for p in () if surrogates else synced_elsewhere:  # with surrogates: broadcast above, as state
                dist.broadcast(p, src=0)
    # Gradients as views into DDP's buckets: otherwise every gradient exists twice (+13.5 GB at 7B in bf16).
    wrapped = nn.parallel.DistributedDataParallel(
        model,
        device_ids=device_ids,
        gradient_as_bucket_view=True,
        **_no_forward_buffer_sync(),
        **({"init_sync": False} if surrogates else {}),
    )
    wrapped.register_comm_hook(None, traffic.counting_allreduce_hook)
    return wrapped


def _no_forward_buffer_sync() -> dict[str, bool]:
    """DDP's keyword to skip re-broadcasting buffers before every forward (and so keep evaluation
    forwards free of collectives): LLaMA's only buffers are the rotary frequencies, computed from the
    config, identical on every rank and never changed.

    torch >= 2.13 calls it `forward_sync_buffers` (and warns on the older name); torch 2.6-2.12, which
    pyproject allows and GPU users keep with their CUDA build, know only `broadcast_buffers`, whose False
    also skips the broadcast at construction: a copy of identical values, so nothing is lost.
    """
    accepted = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in accepted else {"broadcast_buffers": False}


def gradient_averager(env: DistEnv) -> Optional[Callable[[nn.Parameter], torch.Tensor]]:
    """In-place mean of a parameter's gradient over ranks, as DDP computes it (divide, then sum), returned;
    None single-process.

    Used by layer-wise updates, one parameter at a time inside backward: simpler than DDP's buckets, at
    the cost of no overlap between this all-reduce and the rest of backward."""
    if not env.enabled:
        return None

    def average(param: nn.Parameter) -> torch.Tensor:
        kind = "projected_matrices" if param in traffic.TRAFFIC.projected_params else "other_gradients"
        param.grad.div_(env.world_size)
        traffic.all_reduce(param.grad, kind)
        return param.grad

    return average


def share_projection_refresh(optimizer: torch.optim.Optimizer, cfg: Any, env: DistEnv) -> None:
    """Several processes with a GaLore optimizer (DDP, layer-wise DDP, FSDP2): each matrix's projection refresh
    is computed by one process, its owner, and broadcast to the others (galore_train/optim/refresh_sharing.py),
    instead of every process running the same SVD; under FSDP the owner gathers the gradient's row shards
    first (FSDP on one process too: row-sharded GaLore refreshes through it). Nothing single-process. Muon the
    same way: each matrix's Newton-Schulz on its owner (galore_train/optim/orthogonalize.py)."""
    if env.launched and hasattr(optimizer, "share_refresh"):
        optimizer.share_refresh()
    if env.launched and hasattr(optimizer, "share_orthogonalization"):
        optimizer.share_orthogonalization()


def no_sync(module: nn.Module) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce / reduce-scatter in this backward (earlier micro-batches)."""
    if hasattr(module, "no_sync"):
        return module.no_sync()
    if hasattr(module, "set_requires_gradient_sync"):
        return _fsdp_no_sync(module)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(module: nn.Module) -> Iterator[None]:
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def lockstep_batches(
    batches: list[dict[str, torch.Tensor]], model: nn.Module, env: DistEnv
) -> list[dict[str, torch.Tensor]]:
    """Evaluation batches padded so every rank scores the same number of them.

    Ranks score every world_size-th batch; FSDP all-gathers weights inside each forward, so ranks must
    run equally many. The padding batches have no labels: they score zero tokens. Identity unless sharded.
    """
    missing = -len(batches) % env.world_size
    if not is_sharded(model) or not missing:
        return batches
    blank = {**batches[0], "labels": torch.full_like(batches[0]["labels"], -100)}
    return batches + [blank] * missing


# --- metrics ---------------------------------------------------------------------------------------


def rank_metrics(record: dict[str, Any], env: DistEnv) -> dict[str, Any]:
    """Per-rank and aggregate numbers for a logged training record ({} single-process).

    Every rank must call it (it gathers). `peak_memory_gb` becomes the maximum over ranks (what must fit
    on each device), with `peak_memory_gb_per_rank` beside it, and so does `peak_reserved_gb` (CUDA);
    `tokens_per_second` is already the
    aggregate (global tokens / wall time) and `tokens_per_second_per_device` = aggregate / world size
    (ranks step in lockstep, so this is each device's throughput). GaLore's `svd_refreshes` becomes the
    sum over ranks (the matrices refreshed, as one process counts them), with `svd_refreshes_per_rank`
    beside it (the SVDs each rank ran: shared refresh divides them).
    """
    if not env.enabled:
        return {}
    metrics: dict[str, Any] = {}
    if "tokens_per_second" in record:
        metrics["tokens_per_second_per_device"] = record["tokens_per_second"] / env.world_size
    if "peak_memory_gb" in record:
        peaks = gather_floats(record["peak_memory_gb"], env)
        metrics.update(peak_memory_gb=max(peaks), peak_memory_gb_per_rank=peaks)
    if "peak_reserved_gb" in record:  # CUDA: what the allocator holds, the most of any rank
        metrics.update(peak_reserved_gb=max(gather_floats(record["peak_reserved_gb"], env)))
    if "svd_refreshes" in record:  # shared refresh: each rank computes its own matrices' SVDs
        refreshes = [int(count) for count in gather_floats(record["svd_refreshes"], env)]
        metrics.update(svd_refreshes=sum(refreshes), svd_refreshes_per_rank=refreshes)
    return metrics


def comm_metrics(step: int, model: nn.Module) -> dict[str, float]:
    """Bytes each process sent into the gradient synchronisation per optimizer step since the last call
    (`comm_bytes` and its kinds, optim/traffic.py); {} single-process, and under FSDP2, whose reduce-scatters and
    all-gathers run inside FSDP and are not counted (a partial count would mislead)."""
    counted = traffic.TRAFFIC.read(step)
    return {} if is_sharded(model) else counted
