"""Layer-wise weight updates: drive any optimizer from per-parameter gradient hooks.

Normal training holds the gradient of every parameter at once before `optimizer.step()`. Here each
parameter is updated inside its post-accumulate-grad hook, as soon as backward has finished its
gradient, and the gradient is freed at once: at most one parameter's gradient is alive at a time
(plus what autograd is computing). For 7B that is 0.26 GB instead of 13.5 GB in BF16.

Design: there is ONE optimizer, so its `state_dict()` and checkpoints are exactly those of normal
training. The hook calls `optimizer.step()`, which updates only the hooked parameter because this
driver keeps every other gradient at None (optimizers skip parameters whose `.grad` is None; true
for torch.optim, bitsandbytes and galore_train.optim). The LR scheduler is not touched here: the
training loop steps it once per optimizer step, exactly as without `--layerwise`.

Gradient accumulation: inside `with updater.accumulating():` the hooks move each gradient into a
buffer owned by the updater (summed in the same order autograd would sum it), so `.grad` stays None
and the invariant above holds; the backward of the last micro-batch then adds the buffer and steps.
Accumulation therefore keeps a full gradient set between micro-batches (under FSDP2: the rank's shards,
1/N of it): correct, but the memory saving on gradients only materialises with one micro-batch per step.

Projected accumulation (`projected=True`, single process, GaLore-family optimizers: their update reads
only R = P^T G, and R is linear in G): the hooks of earlier micro-batches sum R (r x n) instead of G
(m x n) for every matrix with a projection (`optimizer.project_gradient`), and the last micro-batch adds
its own R and hands the sum to the optimizer (`use_low_rank`): the same update as from the summed G. A
matrix whose projection this step refreshes sums G instead, so the SVD sees the step's whole gradient, as
without projected accumulation: exact at every step. The cost is that matrix's full gradient while the step
accumulates, which `--stagger-refresh` (implied by --accumulate-projected) keeps to about count / gap matrices
per step; the memory estimate adds the largest such set. At step 0 every matrix takes its first projection,
and holding every full gradient then would cost the memory the option saves: instead `take_first_bases` replays
the step's micro-batches (forward and backward, nothing updated) once per group of matrices whose summed full
gradients fit in what the worst step holds between micro-batches anyway (each R, the other gradients, the
largest refreshing set), so the peak stays the estimate's: one replay when every matrix refreshes together, a
few at 7B staggered. Step 0 is then exact too, at the price of those replays once per run. Other parameters
(embeddings, norms) keep summing G. The step's norm counts each projected matrix's summed R: the gradient
inside its subspace.

Non-finite gradients: each hook checks its gradient's norm before stepping (one device sync per
parameter, the price of never applying a NaN; under FSDP2 the shards' squared norms are summed over
ranks first, one scalar all-reduce, so every rank takes the same decision). From the first non-finite
gradient on, no parameter of this step is updated, and `finish()` returns a non-finite norm so the loop
skips or stops the step as for a non-finite loss. What cannot be undone: parameters whose hooks ran
earlier in this backward (layers nearer the output) keep their update of this step; it was computed
from finite gradients.

Why the read per parameter stays (issue 23 asked for it to go): the decision must be taken on the host
before `optimizer.step()`, which changes the weight, the moments and host-side state (step counters,
projections refreshed at that step). Deciding on the device instead needs either a snapshot of the
parameter and its state to restore (two more passes over every weight per step, ~13.5 GB of traffic at 7B,
more than 291 reads cost) or a zeroed gradient (not "not applied": Adam's momentum still moves the weight,
the counter advances, a refresh would take the basis of a zero matrix). The cheapest correct design that
removes the pipeline drain is to check one parameter behind: copy the cumulative flag to pinned memory with
a CUDA event, and step parameter k in hook k + 1 after waiting on that event, which the GPU has normally
passed already; it holds one more gradient (the peak becomes the largest consecutive pair, an estimator
change) and needs a GPU to measure. Not done yet (docs/memory.md).

Several processes (data parallel): DDP's wrapper would all-reduce gradients in its own hooks, after
ours had stepped, so the model is not DDP-wrapped; instead each hook averages its completed gradient
across ranks (`reduce`, from the training loop) before the update. Every rank then applies the same
averaged gradient, as under DDP (with low-rank sync, a GaLore matrix's R: `reduce` returns what the
update reads, optim/lowrank_sync.py). FSDP2 (a `fully_shard`-ed model) needs no `reduce`: autograd never
sees its sharded parameters, and FSDP2 itself runs their post-accumulate-grad hooks once it has written
each reduce-scattered (averaged) gradient shard, one FSDP unit at a time, in the same order on every
rank; the hook then updates the rank's shard. FSDP2 reduce-scatters every micro-batch here (the
training loop does not turn its gradient sync off with layer-wise updates), so the hooks of earlier
micro-batches hold 1/N shards rather than FSDP2 keeping whole unsharded gradients between them.

Not supported, refused with a UserError: global gradient-norm clipping (it needs every gradient
before the first update) and a DDP-wrapped model. The global gradient norm is still available for
logging: the hooks sum each gradient's squared norm (`finish`).

The training loop drives this class and `galore_train.updates.PlainUpdates` through the same calls:
`take_first_bases(replay, k)`, `accumulating()`, `finish()`, `abandon()`, `close()`.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

from galore_train.distributed import is_sharded
from galore_train.errors import UserError

# Averages a parameter's gradient across processes; returns the averaged gradient the update reads (low-rank sync:
# its R, which the optimizer then uses: optim/lowrank_sync.py), whose norm the step's gradient norm sums.
GradientReduce = Callable[[nn.Parameter], torch.Tensor]
log = logging.getLogger(__name__)


def check_layerwise_supported(
    model: nn.Module, grad_clipping: float, reduce: Optional[GradientReduce], projected: bool = False
) -> None:
    """Raise UserError for the combinations layer-wise updates cannot honour."""
    if projected and (reduce is not None or is_sharded(model)):
        raise UserError("--accumulate-projected runs on one process (its refresh would need the averaged gradient)")
    if grad_clipping > 0:
        raise UserError(
            "--layerwise cannot clip the global gradient norm (each parameter is updated before the "
            "others' gradients exist); use --grad-clipping 0 with --layerwise"
        )
    several = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    reduced = reduce is not None or is_sharded(model)  # FSDP2 reduce-scatters before the hooks run
    if isinstance(model, nn.parallel.DistributedDataParallel) or (several and not reduced):
        raise UserError("--layerwise needs the unwrapped model and a gradient reduction across processes")


class LayerwiseUpdater:
    """Update each parameter of `optimizer` inside its gradient hook and free its gradient at once.

    Usage, one optimizer step with `k` micro-batches:

        updater = LayerwiseUpdater(model, optimizer)
        for micro_batch in batches[:-1]:
            with updater.accumulating():
                loss(micro_batch).backward()
        loss(batches[-1]).backward()      # parameters are updated during this backward
        grad_norm = updater.finish()
        scheduler.step()
    """

    applies_in_backward = True  # for the training loop: check a loss before its backward

    def __init__(
        self,
        model: nn.Module,
        optimizer: Optimizer,
        *,
        grad_clipping: float = 0.0,
        reduce: Optional[GradientReduce] = None,
        projected: bool = False,
    ) -> None:
        check_layerwise_supported(model, grad_clipping, reduce, projected)
        self.optimizer = optimizer
        self._projected = projected and hasattr(optimizer, "project_gradient")
        self._held_low_rank: dict[nn.Parameter, torch.Tensor] = {}
        self._reduce = reduce
        self._accumulating = False
        self._held: dict[nn.Parameter, torch.Tensor] = {}
        self._basis: Optional[dict[nn.Parameter, Optional[torch.Tensor]]] = None  # replaying: the whole gradients
        self._sq_norm: torch.Tensor | float = 0.0
        self._poisoned = False  # a non-finite gradient was seen in this step: update nothing more
        self._params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
        for p in self._params:
            p.grad = None  # the invariant "every other gradient is None" starts here
        self._handles = [p.register_post_accumulate_grad_hook(self._on_gradient) for p in self._params]

    @contextmanager
    def accumulating(self) -> Iterator[None]:
        """Backward passes inside this block only accumulate gradients (earlier micro-batches)."""
        self._accumulating = True
        try:
            yield
        finally:
            self._accumulating = False

    def finish(self) -> float:
        """Global L2 norm of this step's gradients (call once per optimizer step, after the last backward).
        Non-finite when a gradient was: the parameters from that one on were not updated."""
        norm = float(torch.as_tensor(self._sq_norm).sqrt())
        self._sq_norm = 0.0
        self._poisoned = False
        return norm

    def abandon(self) -> None:
        """Forget the gradients held from earlier micro-batches (a step abandoned half-way, e.g. on a
        non-finite loss); `optimizer.zero_grad()` cannot see them."""
        self._held.clear()
        self._held_low_rank.clear()
        self.optimizer.zero_grad(set_to_none=True)

    def close(self) -> None:
        """Detach the hooks; the model and optimizer go back to normal training."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.abandon()

    def take_first_bases(self, replay: Callable[[], None], micro_batches: int) -> int:
        """Projected accumulation, before a step in which matrices have no projection yet (step 0): give each its
        first projection from the step's whole gradient. `replay` runs the step's `micro_batches` (forward and
        backward); it is called once per group of matrices (`_first_basis_groups`), the hooks summing those
        matrices' gradients and dropping every other. Returns the number of replays (0: nothing to do, also with
        one micro-batch, whose gradient is the whole step's). A non-finite gradient leaves its matrix without a
        projection: the step then takes it from its first micro-batch, finds it non-finite too and is skipped."""
        replaying = self._projected and micro_batches > 1
        groups = _first_basis_groups(self.optimizer, self._params) if replaying else []
        for group in groups:
            self._basis = dict.fromkeys(group)
            try:
                replay()
                for param, grad in self._basis.items():
                    self.optimizer.take_first_projection(param, grad)
            finally:
                self._basis = None
        if groups:
            log.info("%d replay(s) of the step's micro-batches gave the matrices their first projections", len(groups))
        return len(groups)

    def _on_gradient(self, param: nn.Parameter) -> None:
        if self._basis is not None:
            self._sum_for_basis(param)
        elif self._accumulating:
            self._hold(param)
        else:
            self._update(param)

    @torch.no_grad()
    def _sum_for_basis(self, param: nn.Parameter) -> None:
        """A replay: sum the gradient of a matrix taking its first basis in this replay, drop any other."""
        if param in self._basis:
            held = self._basis[param]
            self._basis[param] = param.grad if held is None else held.add_(param.grad)
        param.grad = None

    @torch.no_grad()
    def _hold(self, param: nn.Parameter) -> None:
        """Move this micro-batch's gradient into the buffer, keeping `.grad` None."""
        if self._projected and self._hold_low_rank(param):
            return
        held = self._held.get(param)
        self._held[param] = param.grad if held is None else held.add_(param.grad)
        param.grad = None

    @torch.no_grad()
    def _update(self, param: nn.Parameter) -> None:
        """Complete the gradient with the held micro-batches, step this parameter, free the gradient."""
        held = self._held.pop(param, None)
        if held is not None:
            param.grad = held.add_(param.grad)
        grad = param.grad if self._reduce is None else self._reduce(param)
        low_rank = self._held_low_rank.pop(param, None)
        if low_rank is not None:  # one process only (check_layerwise_supported): grad is param.grad
            low_rank.add_(self.optimizer.project_gradient(param, param.grad))
            self.optimizer.use_low_rank(param, low_rank)
            grad = low_rank
        sq_norm = _squared_norm(grad)
        self._sq_norm = self._sq_norm + sq_norm
        self._poisoned = self._poisoned or not bool(torch.isfinite(sq_norm))  # the one sync per parameter
        if not self._poisoned:
            self.optimizer.step()
        elif low_rank is not None:
            self.optimizer.use_low_rank(param, None)  # not stepped: forget the handed-in sum
        param.grad = None

    def _hold_low_rank(self, param: nn.Parameter) -> bool:
        """Sum this micro-batch's R = P^T G instead of G; False for a parameter without a projection."""
        held = self._held_low_rank.get(param)
        if held is None:
            low_rank = self.optimizer.project_gradient(param, param.grad)
            if low_rank is None:
                return False
            self._held_low_rank[param] = low_rank
        else:
            held.add_(self.optimizer.project_gradient(param, param.grad))
        param.grad = None
        return True


def _first_basis_groups(optimizer: Optimizer, params: list[nn.Parameter]) -> list[list[nn.Parameter]]:
    """The matrices without a projection, packed in optimizer order into groups whose full gradients together
    fit in the bytes projected accumulation holds between micro-batches at its worst step (every matrix's R,
    every other gradient, and the full-minus-R of the largest set sharing a refresh offset: what
    memory/estimate.py counts), none of which exists during a replay. That budget holds any single matrix."""
    projected = optimizer.projected_params()
    pending = [p for p in projected if "projection" not in optimizer.state[p]]
    if not pending:  # every step after the first: no work on the host
        return []
    budget, refreshing = 0, {}  # every R; per refresh offset, the full-minus-R of the matrices sharing it
    for p in projected:
        projector, _ = optimizer.projector_of(p)
        low_rank = math.prod(projector.low_rank_shape(p.shape)) * p.element_size()
        offset = optimizer.state[p].get("refresh_offset", 0)
        refreshing[offset] = refreshing.get(offset, 0) + p.numel() * p.element_size() - low_rank
        budget += low_rank
    budget += max(refreshing.values(), default=0)
    budget += sum(p.numel() * p.element_size() for p in set(params) - set(projected))
    groups: list[list[nn.Parameter]] = []
    used = 0
    for p in pending:
        size = p.numel() * p.element_size()
        if not groups or used + size > budget:
            groups.append([])
            used = 0
        groups[-1].append(p)
        used += size
    return groups


def _squared_norm(grad: torch.Tensor) -> torch.Tensor:
    """Squared L2 norm of a whole gradient, in float32. Computed in the gradient's own dtype (float accumulation
    inside): no full-size fp32 copy. A DTensor (FSDP2's row shards) sums its shards' squares over the ranks."""
    if not isinstance(grad, DTensor):
        return torch.linalg.vector_norm(grad).float().square()
    sq_norm = torch.linalg.vector_norm(grad.to_local()).float().square()
    dist.all_reduce(sq_norm, group=grad.device_mesh.get_group())
    return sq_norm
