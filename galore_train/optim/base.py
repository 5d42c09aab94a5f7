"""`GaLoreOptimizer`: the torch.optim base class of the GaLore optimizers.

It holds what the GaLore family shares: the param-group convention (groups with a "rank" key are
projected, others run the plain full-rank optimizer), their validation, the per-parameter step loop
around the projector (projector.py), decoupled weight decay, a load_state_dict that keeps 8-bit and fp32
states in their own dtypes, and the state layout the memory estimator asks for. Layer-wise drivers
(layerwise.py) call step() with only one `.grad` set; nothing else is needed here.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Optional

import torch
from torch import Tensor

from galore_train.optim.layout import StateTensor
from galore_train.optim.projector import PROJ_TYPES, SVD_METHODS, GaLoreProjector, RefreshStats, stagger_offsets
from galore_train.optim.quantize import QUANT_BITS
from galore_train.optim.refresh_sharing import DueRefresh, RefreshSharing
from galore_train.optim.row_shards import RowShard, is_row_sharded, keep_local_state, local_state

GALORE_GROUP_DEFAULTS = {
    "update_proj_gap": 200,
    "scale": 0.25,
    "proj_type": "std",
    "svd": "full",
    "stagger_refresh": False,
    "proj_bits": 32,
    "proj_group_size": 256,
    "adaptive_gap": False,
    "cos_threshold": 0.4,
}


def group_names(group: dict[str, Any]) -> list[str]:
    """The names of a param group's parameters, for messages (positions when the group has none)."""
    return group.get("param_names") or [f"parameter {i}" for i in range(len(group["params"]))]


def check_galore_group(group: dict[str, Any]) -> None:
    """ValueError for GaLore settings that cannot work (build_optimizer turns these into UserErrors)."""
    rank, gap = group["rank"], group["update_proj_gap"]
    if not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"GaLore rank must be a positive integer, got {rank!r}")
    if not isinstance(gap, int) or gap <= 0:
        raise ValueError(f"GaLore update_proj_gap must be a positive integer, got {gap!r}")
    if group["proj_type"] not in PROJ_TYPES:
        raise ValueError(f"unknown GaLore proj_type {group['proj_type']!r}; known: {', '.join(PROJ_TYPES)}")
    if group["svd"] not in SVD_METHODS:
        raise ValueError(f"unknown GaLore svd {group['svd']!r}; known: {', '.join(SVD_METHODS)}")
    if group["proj_bits"] not in QUANT_BITS + (32,):
        raise ValueError(f"GaLore proj_bits must be 4, 8 or 32, got {group['proj_bits']!r}")
    if not isinstance(group["proj_group_size"], int) or group["proj_group_size"] <= 0:
        raise ValueError(f"GaLore proj_group_size must be a positive integer, got {group['proj_group_size']!r}")
    if not 0.0 <= group["cos_threshold"] <= 1.0:
        raise ValueError(f"GaLore cos_threshold must be within [0, 1], got {group['cos_threshold']!r}")
    for name, p in zip(group_names(group), group["params"]):
        if p.dim() != 2:
            raise ValueError(f"GaLore projects 2-D weights; {name} has shape {tuple(p.shape)}")
        if rank > min(p.shape):
            raise ValueError(f"GaLore rank {rank} exceeds min{tuple(p.shape)} of {name}")


class GaLoreOptimizer(torch.optim.Optimizer):
    """Base of the GaLore optimizers, torch.optim style.

    Param groups with a "rank" key are GaLore groups (keys as in galore-torch: rank, update_proj_gap,
    scale, proj_type; plus svd and stagger_refresh); their 2-D parameters get low-rank moments. Groups
    without "rank" run the plain full-rank optimizer. Parameters may be given as (name, tensor) pairs
    (torch's named-parameter groups): the names then appear in SVD warnings.

    Subclasses implement `_update(p, grad, group, state)`, called once per parameter with a gradient;
    state["step"] has already been incremented. For GaLore groups `grad` is the low-rank R, held in a
    scratch buffer that the update may overwrite (it is reused for the next parameter); otherwise it
    is p.grad itself. They finish with `_apply`.

    Why per parameter: the scratch buffer makes a GaLore step allocate nothing, and on CPU the page faults of
    fresh temporaries cost more than the dispatch that foreach ops save (scripts/bench_optimizer.py). The buffer
    (as large as the largest R) is not state. On CUDA, where each dispatch is a kernel launch, a subclass may
    step a whole group at once instead (`_step_together`: GaLoreAdamW's grouped step, grouped.py).
    """

    # FSDP2: the dim each state tensor created on a row shard is sharded on (default 0), None for replicated
    STATE_SHARDING: Mapping[str, Optional[int]] = {}
    # The update reads only the low-rank R of a GaLore group, so micro-batches may be summed as R (layerwise.py)
    ACCUMULATES_PROJECTED = True

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        self.refresh_stats = RefreshStats()
        self._scratch: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        self._sharing: Optional[RefreshSharing] = None
        self._refreshed: dict[Tensor, bool] = {}  # this step's shared refreshes, already stored
        self._shard: Optional[RowShard] = None  # FSDP2: the rows the running update works on (row_shards.py)
        self._presynced: dict[Tensor, Optional[Tensor]] = {}  # low-rank sync: this step's averaged R (project_for_sync)
        self._low_rank: dict[Tensor, Tensor] = {}  # R summed over micro-batches, for the parameter's next step
        self._refreshed_for: dict[Tensor, int] = {}  # the step a micro-batch already refreshed the projection for
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if "rank" not in group:
            return
        for key, value in GALORE_GROUP_DEFAULTS.items():
            group.setdefault(key, value)
        check_galore_group(group)
        if group["stagger_refresh"]:
            for p, offset in zip(group["params"], stagger_offsets(len(group["params"]), group["update_proj_gap"])):
                self.state[p]["refresh_offset"] = offset

    def share_refresh(self, process_group: Optional[Any] = None) -> None:
        """Data parallelism (every process steps on the same averaged gradients): compute each GaLore
        matrix's refreshes on one process and broadcast them (refresh_sharing.py). Every process of the
        group must call this, and from then on step in lockstep (each step is collective)."""
        self._sharing = RefreshSharing(self.projected_params(), process_group)

    def projected_params(self) -> list[Tensor]:
        """The parameters GaLoreProjector projects, in optimizer order."""
        return [p for group in self.param_groups if self._uses_projector(group) for p in group["params"]]

    def due_refreshes(self) -> list[DueRefresh]:
        """The parameters (with a gradient) whose projection this step refreshes, in optimizer order."""
        return self._due_refreshes()

    @torch.no_grad()
    def project_for_sync(self) -> dict[Tensor, Optional[Tensor]]:
        """Low-rank gradient sync (lowrank_sync.py): run this step's refreshes now (the caller has averaged the
        gradients of `due_refreshes()` across processes) and project every gradient of `projected_params()`. The
        caller averages the others' R in place; step() then updates from these R instead of projecting `.grad`
        (None: skip that update, a non-finite gradient at its refresh). zero_grad() forgets them."""
        if self._sharing is not None:
            self._refreshed = self._sharing.refresh(self._due_refreshes(), self.state, self.refresh_stats)
        projected = {}
        for group in self.param_groups:
            if not self._uses_projector(group):
                continue
            projector, names = GaLoreProjector.from_group(group), group.get("param_names")
            for index, p in enumerate(group["params"]):
                if p.grad is not None:
                    state, name = self.state[p], names[index] if names else None
                    refreshed = self._refreshed.pop(p, None)
                    step = state.get("step", 0)
                    projected[p] = projector.project(p.grad, state, step, self.refresh_stats, name, refreshed=refreshed)
        self._presynced = projected
        return projected

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._presynced = {}
        super().zero_grad(set_to_none)

    def _uses_projector(self, group: dict[str, Any]) -> bool:
        """Whether this group's parameters are projected by GaLoreProjector (APOLLO's random ones are not)."""
        return "rank" in group

    def svd_metrics(self) -> dict[str, float]:
        """svd_seconds / svd_refreshes since the last call, svd_failures_total since construction; with
        adaptive_gap also svd_skipped_total, the SVDs the lazy refresh saved over the run (checkpointed)."""
        metrics = self.refresh_stats.read()
        lazy = [group for group in self.param_groups if group.get("adaptive_gap")]
        if lazy:
            metrics["svd_skipped_total"] = sum(
                self.state[p].get("svd_skipped", 0) for group in lazy for p in group["params"]
            )
        return metrics

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Tensor]] = None) -> Optional[Tensor]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._sharing is not None:  # presynced parameters were refreshed by project_for_sync
            due = [item for item in self._due_refreshes() if item.param not in self._presynced]
            self._refreshed = self._sharing.refresh(due, self.state, self.refresh_stats)
        for group in self.param_groups:
            names = group.get("param_names") or [None] * len(group["params"])
            stepping = [(name, p) for name, p in zip(names, group["params"]) if p.grad is not None]
            # The grouped step projects the gradients itself: not for an R handed in (low-rank sync, accumulation).
            handed_in = any(p in self._presynced or p in self._low_rank for _, p in stepping)
            if not handed_in and self._step_together(group, stepping):
                continue
            projector = GaLoreProjector.from_group(group) if "rank" in group else None
            for name, p in stepping:
                self._step_parameter(p, group, projector, name)
        # Presynced R of parameters not stepped in this call stay: INT8 weights and stochastic rounding step one
        # matrix per call (weights/stepping.py). project_for_sync replaces them all, zero_grad forgets them.
        return loss

    def _step_together(self, group: dict[str, Any], params: list[tuple[Optional[str], Tensor]]) -> bool:
        """Step these (name, parameter) pairs of `group` in one grouped step if the optimizer has one (GaLoreAdamW:
        grouped.py); False: step them one by one."""
        return False

    def _step_parameter(
        self, p: Tensor, group: dict[str, Any], projector: Optional[GaLoreProjector], name: Optional[str]
    ) -> None:
        if p.grad.is_sparse:
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
        state = self.state[p]
        grad = p.grad
        if is_row_sharded(p):
            self._step_row_shard(p, group, projector, name)
            return
        if projector is not None:
            presynced = p in self._presynced
            grad = self._presynced.pop(p) if presynced else self._project(p, grad, group, projector, name)
            if grad is None:  # non-finite gradient at a refresh: skip this parameter's update
                return
        state["step"] = state.get("step", 0) + 1
        self._update(p, grad, group, state)

    def _project(
        self, p: Tensor, grad: Tensor, group: dict[str, Any], projector: GaLoreProjector, name: Optional[str]
    ) -> Optional[Tensor]:
        """The low-rank gradient of `grad` (p's, or under FSDP2 this rank's rows of it; None: non-finite at a
        refresh), in a scratch buffer reused across parameters; or the R summed over micro-batches that
        `use_low_rank` handed in."""
        state = self.state[p]
        if p in self._low_rank:
            return self._low_rank.pop(p)
        out = self._scratch_buffer(projector.low_rank_shape(grad.shape), grad)
        refreshed = self._refreshed.pop(p, None)
        return projector.project(
            grad, state, state.get("step", 0), self.refresh_stats, name, out=out, refreshed=refreshed
        )

    def projector_of(self, p: Tensor) -> Optional[tuple[GaLoreProjector, Optional[str]]]:
        """The projector of p's group and p's name; None for a parameter GaLoreProjector does not project."""
        for group in self.param_groups:
            if self._uses_projector(group):
                for index, q in enumerate(group["params"]):
                    if q is p:
                        names = group.get("param_names")
                        return GaLoreProjector.from_group(group), names[index] if names else None
        return None

    def project_gradient(self, p: Tensor, grad: Tensor) -> Optional[Tensor]:
        """R = P^T G of one micro-batch's `grad` (a new tensor) in the projection of p's next step, for summing
        micro-batches in the low-rank space. None: sum G instead, because p has no projection or its next step
        refreshes one it has (that refresh then takes the basis of the summed G, as without projected
        accumulation). A first projection (no basis yet) not given by `take_first_projection` comes from the first
        micro-batch's gradient, once per step. NaN after a non-finite gradient at that first refresh."""
        found = self.projector_of(p)
        if found is None:
            return None
        (projector, name), state = found, self.state[p]
        step = state.get("step", 0)
        refreshed = True if self._refreshed_for.get(p) == step else None  # by an earlier micro-batch
        if not refreshed and "projection" in state and projector.refresh_due(state, step):
            return None
        low_rank = projector.project(grad, state, step, self.refresh_stats, name, refreshed=refreshed)
        self._refreshed_for[p] = step
        if low_rank is None:  # non-finite at the refresh: NaN, so the step is not applied
            return grad.new_full(projector.low_rank_shape(grad.shape), float("nan"))
        return low_rank

    @torch.no_grad()
    def take_first_projection(self, p: Tensor, grad: Tensor) -> bool:
        """p's first projection from `grad`, the next step's whole gradient (summed over its micro-batches by the
        layer-wise updater's replay); that step's micro-batches then project onto it without refreshing, exactly
        as full-gradient accumulation. False (no projection): `grad` is not finite."""
        projector, name = self.projector_of(p)
        state = self.state[p]
        step = state.get("step", 0)
        if projector.project(grad, state, step, self.refresh_stats, name) is None:
            return False
        self._refreshed_for[p] = step
        return True

    def use_low_rank(self, p: Tensor, low_rank: Optional[Tensor]) -> None:
        """p's next step uses this R (summed by `project_gradient` over micro-batches) instead of projecting
        (None: forget one handed in)."""
        if low_rank is None:
            self._low_rank.pop(p, None)
        else:
            self._low_rank[p] = low_rank

    def _step_row_shard(
        self, p: Tensor, group: dict[str, Any], projector: Optional[GaLoreProjector], name: Optional[str]
    ) -> None:
        """FSDP2: update this rank's rows of the weight (row_shards.py), projected on the right for GaLore groups
        (step() has already run the refresh, shared, from the gathered gradient). The update sees its rows
        through `self._shard` (for the reductions over rows some updates need)."""
        if projector is not None and (projector.proj_type != "right" or self._sharing is None):
            raise ValueError(
                f"GaLore on row-sharded {name or 'parameters'} needs proj_type 'right' and share_refresh()"
            )
        state = self.state[p]
        grad = rows = p.grad.to_local()
        if projector is not None:
            grad = self._project(p, rows, group, projector, name)
            if grad is None:
                return
        local = local_state(state)
        local["step"] = state.get("step", 0) + 1
        self._shard = RowShard(p.shape[0], p.device_mesh.get_group(), rows)
        try:
            self._update(p.to_local(), grad, group, local)
        finally:
            self._shard = None
        keep_local_state(state, local, p, self.STATE_SHARDING)

    def _gradient_rows(self, p: Tensor) -> Tensor:
        """The unprojected gradient of the weight `_update` works on: p.grad, or under FSDP2 this rank's rows of it
        (`p` is then the local shard, which has no .grad). For updates that read G itself (Fira, APOLLO)."""
        return p.grad if self._shard is None else self._shard.grad

    def _due_refreshes(self) -> list[DueRefresh]:
        """The parameters (with a gradient) whose projection this step refreshes, in optimizer order."""
        due = []
        for group in self.param_groups:
            if not self._uses_projector(group):
                continue
            projector, names = GaLoreProjector.from_group(group), group.get("param_names")
            for index, p in enumerate(group["params"]):
                if p.grad is not None and projector.refresh_due(self.state[p], self.state[p].get("step", 0)):
                    due.append(DueRefresh(p, projector, names[index] if names else None))
        return due

    def _scratch_buffer(self, shape: tuple[int, int], like: Tensor) -> Tensor:
        key = (like.device, like.dtype)
        numel = shape[0] * shape[1]
        buffer = self._scratch.get(key)
        if buffer is None or buffer.numel() < numel:
            buffer = self._scratch[key] = torch.empty(numel, device=like.device, dtype=like.dtype)
        return buffer[:numel].view(shape)

    def _update(self, p: Tensor, grad: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        raise NotImplementedError

    @classmethod
    def state_layout(cls, shape: tuple[int, ...], group: Mapping[str, Any], itemsize: int) -> list[StateTensor]:
        """The state tensors kept for a parameter of `shape` in a param group with these settings (GaLore
        when it has "rank"; omitted settings take their defaults), gradients of `itemsize` bytes per element:
        the moments of the (low-rank) gradient, then the projection matrices."""
        if "rank" not in group:
            return cls._moment_layout(tuple(shape), group, itemsize)
        projector = GaLoreProjector.from_group({**GALORE_GROUP_DEFAULTS, **group})
        moments = cls._moment_layout(projector.low_rank_shape(shape), group, itemsize)
        return moments + projector.state_layout(shape, itemsize)

    @classmethod
    def _moment_layout(cls, shape: tuple[int, ...], group: Mapping[str, Any], itemsize: int) -> list[StateTensor]:
        """The optimizer's own state for a gradient of `shape` (the low-rank R under GaLore)."""
        raise NotImplementedError

    @staticmethod
    def _apply(p: Tensor, update: Tensor, group: dict[str, Any], state: dict[str, Any], step_size: float) -> None:
        """Decoupled weight decay and the step: W <- (1 - lr wd) W - step_size * [scale * back(update)]."""
        decay = 1.0 - group["lr"] * group["weight_decay"]
        if "rank" in group:
            GaLoreProjector.from_group(group).project_back_add_(
                p, update, state, alpha=-step_size * group["scale"], beta=decay
            )
            return
        if decay != 1.0:
            p.mul_(decay)
        p.add_(update if _widens(update.dtype, p.dtype) else update.to(p.dtype), alpha=-step_size)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load the groups through torch, then each state tensor once, in its own dtype, on its parameter's device.

        torch's own load casts every state tensor to its parameter's dtype on the parameter's device: 8-bit
        moments and float32 block maxima of bf16 weights would pass through bf16 first (7B: ~7 GiB of transient
        bf16 state on the GPU, before they could be restored). So torch gets the groups without the state, and
        the state is put back as saved (8-bit, float32 moments, bf16 projections alike). The saved parameter
        ids are matched by position, as torch does (indices, or names under FSDP's state loading)."""
        super().load_state_dict({**state_dict, "state": {}})
        saved_ids = [index for group in state_dict["param_groups"] for index in group["params"]]
        params = dict(zip(saved_ids, (p for group in self.param_groups for p in group["params"])))
        for index, saved in state_dict["state"].items():
            param = params[index]
            self.state[param] = {key: _on_device(value, param.device) for key, value in saved.items()}


def _on_device(value: Any, device: torch.device) -> Any:
    """A saved state value on `device`, its dtype kept (tensors inside dicts and lists too)."""
    if isinstance(value, Tensor):
        return value.to(device=device)
    if isinstance(value, dict):
        return {key: _on_device(item, device) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_on_device(item, device) for item in value)
    return value


def _widens(source: torch.dtype, target: torch.dtype) -> bool:
    """Whether every `source` value is exact in `target` (bf16/fp16 -> fp32, ...): then `add_` casts as it adds, with
    no full-size copy. Compared on the host (torch.promote_types would be one more dispatched op per parameter)."""
    floats = source.is_floating_point and target.is_floating_point
    return source == target or (floats and source.itemsize < target.itemsize)
