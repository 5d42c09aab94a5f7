"""The grouped GaLore-AdamW step: one batched projection per weight shape, Adam on every moment with foreach ops.

The per-parameter step (base.py) dispatches about a dozen operations per matrix (770 at llama_60m); on a GPU
each is a kernel launch, so at 60M-130M the optimizer is launch-bound. Here one param group's parameters
are stepped together, with the same arithmetic as GaLoreAdamW._update (galore_adamw.py):

    refresh         per matrix, as before (projector.ready: the SVD, its checks and fallbacks)
    R = P^T G       per shape: G and P stacked, one torch.bmm (left / right / full sides alike)
    Adam            torch._foreach_* over every low-rank R of the group and its moments (what torch.optim's
                    foreach AdamW does): lerp_, mul_, addcmul_, sqrt, add_, then N' = M / (sqrt(V) + eps c2)
                    written back over R
    W <- W - a P N' per shape: N' scaled by each matrix's step size, one torch.bmm into the stacked
                    gradient's buffer (dead by then), then _foreach_mul_ (weight decay) and _foreach_add_

Plain groups (no "rank") run the same foreach Adam and torch's _foreach_addcdiv_. Bias corrections are Python
floats from each parameter's Python step counter: no device read. The state is per parameter exactly as in the
per-parameter step (checkpoints are interchangeable; tests/test_grouped_step.py checks <= 1e-6 agreement over
refreshes and a state_dict round trip). scripts/bench_optimizer.py counts the dispatched operations.

Memory: a shape's stacked gradients, projections and R are temporaries (the per-parameter step reuses one
R-sized buffer). The stack is cut into chunks of at most STACK_BYTES of gradient, so the transient stays
bounded at any model size (llama_60m and llama_130m fit in one chunk per shape; a 7B 4096 x 4096 bf16
gradient is 32 MiB, eight per chunk).

Where it applies (`applies`): GaLoreAdamW itself (a subclass that changes the update keeps the per-parameter
path), at least two parameters with a gradient (layer-wise updates step one parameter at a time), plain
tensors (FSDP2 row shards keep the per-parameter path), dense gradients in their parameter's dtype, and the
group's "foreach": None (the default) on CUDA, True anywhere, False never (`GaLoreAdamW(..., foreach=...)`).

Why not on CPU by default (as torch.optim's foreach default): there a kernel launch costs nothing and the
stacking copies and the separate add of the back-projection do (the fused per-matrix addmm_ has neither):
the grouped step of llama_60m's whole optimizer takes ~1.1x the CPU time of the per-parameter one
(docs/optimizers.md). CPU runs also keep their updates, and the committed CPU results, to the last digit.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from galore_train.optim.projector import GaLoreProjector

if TYPE_CHECKING:
    from galore_train.optim.base import GaLoreOptimizer

STACK_BYTES = 256 * 2**20  # stacked gradient bytes per batched matmul (a bound on the step's transient memory)
NamedParams = list[tuple[Optional[str], Tensor]]


def applies(group: dict[str, Any], params: NamedParams) -> bool:
    """Whether the grouped step can take this group's parameters with a gradient (see the module docstring)."""
    foreach = group.get("foreach")
    if foreach is False or len(params) < 2:
        return False
    return all(
        (foreach or p.device.type == "cuda")
        and not isinstance(p, DTensor)
        and not isinstance(p.grad, DTensor)
        and not p.grad.is_sparse
        and p.grad.dtype == p.dtype
        for _, p in params
    )


def step_group(optimizer: GaLoreOptimizer, group: dict[str, Any], params: NamedParams) -> None:
    """One GaLore-AdamW step of `params` (those of `group` with a gradient), all at once."""
    if "rank" not in group:
        for _, p in params:
            _advance(optimizer.state[p])
        _step_plain(optimizer, group, [p for _, p in params])
        return
    projector = GaLoreProjector.from_group(group)
    buckets: dict[tuple[Any, ...], list[Tensor]] = defaultdict(list)
    for name, p in params:
        state = optimizer.state[p]
        refreshed = optimizer._refreshed.pop(p, None)
        if projector.ready(p.grad, state, state.get("step", 0), optimizer.refresh_stats, name, refreshed):
            _advance(state)
            buckets[(p.shape, p.dtype, p.device)].append(p)
    for bucket in buckets.values():
        per_chunk = max(1, STACK_BYTES // (bucket[0].numel() * bucket[0].element_size()))
        for start in range(0, len(bucket), per_chunk):
            _step_matrices(optimizer, group, projector, bucket[start : start + per_chunk])


def _advance(state: dict[str, Any]) -> None:
    state["step"] = state.get("step", 0) + 1


def _corrections(group: dict[str, Any], steps: list[int]) -> tuple[list[float], list[float]]:
    """Adam's bias corrections c1 = 1 - b1^t and c2 = sqrt(1 - b2^t) per parameter, as Python floats."""
    beta1, beta2 = group["betas"]
    return [1.0 - beta1**t for t in steps], [math.sqrt(1.0 - beta2**t) for t in steps]


def _denominators(
    grads: list[Tensor], states: list[dict[str, Any]], group: dict[str, Any], c2: list[float]
) -> tuple[list[Tensor], list[Tensor]]:
    """Update the moments with `grads` (foreach); return (M, sqrt(V) + eps c2), as GaLoreAdamW._adam_direction."""
    for state, grad in zip(states, grads):
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(grad, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(grad, memory_format=torch.contiguous_format)
    exp_avgs = [state["exp_avg"] for state in states]
    exp_avg_sqs = [state["exp_avg_sq"] for state in states]
    beta1, beta2 = group["betas"]
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
    denominators = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(denominators, [group["eps"] * c for c in c2])
    return exp_avgs, denominators


def _step_plain(optimizer: GaLoreOptimizer, group: dict[str, Any], params: list[Tensor]) -> None:
    """AdamW on full-rank parameters: W <- (1 - lr wd) W - lr (c2 / c1) M / (sqrt(V) + eps c2)."""
    states = [optimizer.state[p] for p in params]
    c1, c2 = _corrections(group, [state["step"] for state in states])
    dtype = group.get("moment_dtype")
    grads = [p.grad if dtype is None else p.grad.to(dtype) for p in params]
    exp_avgs, denominators = _denominators(grads, states, group, c2)
    decay = 1.0 - group["lr"] * group["weight_decay"]
    if decay != 1.0:
        torch._foreach_mul_(params, decay)
    torch._foreach_addcdiv_(params, exp_avgs, denominators, [-group["lr"] * b / a for a, b in zip(c1, c2)])


def _step_matrices(
    optimizer: GaLoreOptimizer, group: dict[str, Any], projector: GaLoreProjector, params: list[Tensor]
) -> None:
    """The GaLore-AdamW update of same-shape matrices whose projections are ready, batched."""
    states = [optimizer.state[p] for p in params]
    shape, dtype = params[0].shape, params[0].dtype
    side = projector.side(shape)
    projection = torch.stack([projector.matrix(state, "projection", shape, dtype) for state in states])
    projection_right = (
        torch.stack([projector.matrix(state, "projection_right", shape, dtype) for state in states])
        if side == "full"
        else None
    )
    stacked = torch.stack([p.grad for p in params])
    low_rank = _project(stacked, projection, projection_right, side)
    moment_dtype = group.get("moment_dtype")
    work = low_rank if moment_dtype is None else low_rank.to(moment_dtype)
    rows = work.unbind(0)
    c1, c2 = _corrections(group, [state["step"] for state in states])
    exp_avgs, denominators = _denominators(list(rows), states, group, c2)
    torch._foreach_copy_(rows, exp_avgs)
    torch._foreach_div_(rows, denominators)  # N' = M / (sqrt(V) + eps c2), over R's buffer
    torch._foreach_mul_(rows, [-group["lr"] * group["scale"] * b / a for a, b in zip(c1, c2)])
    if work is not low_rank:
        low_rank.copy_(work)
    _project_back(
        low_rank, projection, projection_right, side, out=stacked
    )  # the gradients are dead: reuse their buffer
    decay = 1.0 - group["lr"] * group["weight_decay"]
    if decay != 1.0:
        torch._foreach_mul_(params, decay)
    torch._foreach_add_(params, stacked.unbind(0))


def _project(stacked: Tensor, projection: Tensor, projection_right: Optional[Tensor], side: str) -> Tensor:
    """R for each stacked gradient (projector.py's table; `projection` is P, or Q on the right side):
    P^T G, G Q^T or P^T G Q^T."""
    if side == "left":
        return torch.bmm(projection.mT, stacked)
    if side == "right":
        return torch.bmm(stacked, projection.mT)
    return torch.bmm(torch.bmm(projection.mT, stacked), projection_right.mT)


def _project_back(
    update: Tensor, projection: Tensor, projection_right: Optional[Tensor], side: str, out: Tensor
) -> None:
    """back(N) for each stacked update, into `out`: P N, N Q or P N Q."""
    if side == "left":
        torch.bmm(projection, update, out=out)
    elif side == "right":
        torch.bmm(update, projection, out=out)
    else:
        torch.bmm(torch.bmm(projection, update), projection_right, out=out)
