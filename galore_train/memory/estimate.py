"""Estimated memory of a training setup from the model config alone: what `galore-train memory` prints.

From a meta-device model (so 7B is instant): weights, gradients (all, or the largest one with layer-wise
updates and one micro-batch per step), optimizer states as each optimizer describes them (its
`state_layout`, galore_train/optim/layout.py: the estimator adds up, it knows no optimizer's internals),
GaLore's projection matrices (part of that layout, reported apart), and activations from a documented
per-token formula. Units: bytes here, GiB (2**30) in the
tables (memory/tables.py, with the paper's Table 2). Formulas in docs/memory.md; what a run really uses is
measured by galore_train/memory/meter.py.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Any, Iterable

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from galore_train.config import TrainConfig
from galore_train.errors import UserError
from galore_train.fsdp import check_fsdp_supported
from galore_train.methods import method_class
from galore_train.model import target_linear_modules
from galore_train.optim.apollo import PROJECTIONS
from galore_train.optim.base import GALORE_GROUP_DEFAULTS
from galore_train.optim.layout import StateTensor
from galore_train.optim.natural_galore import FISHER_HISTORY
from galore_train.optim.norm_growth import check_norm_growth_limit
from galore_train.optim.projector import PROJ_TYPES, GaLoreProjector, stagger_offsets
from galore_train.optim.quantize import QUANT_BITS
from galore_train.plan import plan_steps
from galore_train.registry import OPTIMIZERS, OptimizerSpec, moments_group, resolve_optimizer_name
from galore_train.weights.estimate import check_weight_estimate
from galore_train.weights.int8 import int8_nbytes

DTYPE_BYTES = {"bf16": 2, "fp32": 4}
AUTO_DTYPE = "bf16"  # what --dtype auto picks on the GPUs these estimates are for


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of one training configuration, by part.

    `total` adds every part. `peak` models the step's high-water mark: activations are largest at the
    start of the backward pass, before any gradient exists, and gradients at its end, after the
    activations are freed, so only the larger of the two counts (the CPU bench confirms it); with gradient
    accumulation (`accumulating`) the earlier micro-batches' gradients are alive beside the last one's
    activations, so both count; so do they under DDP (`ddp_buckets`: the gradients live in DDP's buckets, allocated
    when the model is wrapped and never freed). Over several GPUs every part is one GPU's, and `distributed` is
    FSDP's gathered units.
    """

    label: str
    weights: int
    gradients: int
    optimizer_states: int
    projections: int
    activations: int
    distributed: int = 0
    accumulating: bool = False
    ddp_buckets: bool = False

    @property
    def gradients_held(self) -> bool:
        """Whether the gradients are alive beside the activations (accumulation, DDP's buckets)."""
        return self.accumulating or self.ddp_buckets

    dequantized: int = 0  # INT8 weights: the one matrix dequantized at a time; --stochastic-rounding: its fp32 copy

    @property
    def total(self) -> int:
        return (
            self.weights
            + self.gradients
            + self.optimizer_states
            + self.projections
            + self.activations
            + self.distributed
            + self.dequantized
        )

    @property
    def peak(self) -> int:
        return (
            self.weights
            + self.optimizer_states
            + self.projections
            + self.distributed
            + self.dequantized
            + (self.gradients + self.activations if self.gradients_held else max(self.gradients, self.activations))
        )


@dataclass(frozen=True)
class _Tensor:
    """A parameter of the estimate: `trainable` ones get gradients and optimizer state, `matrix` ones (the
    target weights of GaLore-family optimizers and Muon) their own param group."""

    shape: tuple[int, ...]
    trainable: bool = True
    matrix: bool = False
    int8: bool = False  # stored as INT8 codes and scales (--int8-weights)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def parameter_shapes(model_config: LlamaConfig, targets: Iterable[str]) -> list[tuple[str, tuple[int, ...], bool]]:
    """(name, shape, is_target_weight) for every parameter of the LLaMA model, built on the meta device."""
    with torch.device("meta"):
        model = LlamaForCausalLM(model_config)
    target_weights = {f"{name}.weight" for name in target_linear_modules(model, targets)}
    return [(name, tuple(p.shape), name in target_weights) for name, p in model.named_parameters()]


def fsdp_unit_bytes(named_shapes: Iterable[tuple[str, tuple[int, ...], bool]], dtype_bytes: int) -> dict[str, int]:
    """Bytes of each FSDP2 unit as galore_train/fsdp.py shards LLaMA: each decoder layer a unit, the rest
    (embeddings, final norm, lm_head) the root unit ("root")."""
    units: dict[str, int] = {}
    for name, shape, _ in named_shapes:
        match = re.match(r"model\.layers\.\d+\.", name)
        unit = match.group(0) if match else "root"
        units[unit] = units.get(unit, 0) + math.prod(shape) * dtype_bytes
    return units


def fsdp_gathered_bytes(units: dict[str, int]) -> int:
    """The full (unsharded) tensors FSDP2 holds at once beside the shards: the root's weights and gradient,
    which stay unsharded all step (FSDP2 does not reshard the root after forward and reduce-scatters its
    gradient at the end of backward), plus the largest decoder layer's weights and gradient while it runs.
    An upper bound: the embedding gradient only appears after the last layer's."""
    layers = [size for unit, size in units.items() if unit != "root"]
    return 2 * units.get("root", 0) + 2 * max(layers, default=0)


def _weight_bytes(tensor: _Tensor, itemsize: int, group_size: int) -> int:
    """A weight's bytes: INT8 codes, scales and the one-element surrogate parameter, or `itemsize` per value."""
    return int8_nbytes(tensor.shape, group_size) + itemsize if tensor.int8 else tensor.numel * itemsize


def _held_gradients(
    tensors: list[_Tensor], itemsize: int, projected_group: dict[str, Any], gap: int, stagger: bool
) -> int:
    """What layer-wise accumulation holds between micro-batches with --accumulate-projected, at its worst step:
    each target matrix's low-rank R (the projector's shape) and every other trainable parameter's full gradient,
    except that the matrices whose projection the step refreshes hold their full gradient (optim/layerwise.py):
    with --stagger-refresh the largest set sharing a refresh offset, else all of them."""
    projector = GaLoreProjector.from_group({**GALORE_GROUP_DEFAULTS, **projected_group})
    matrices = [t for t in tensors if t.trainable and t.matrix]
    low_rank = sum(math.prod(projector.low_rank_shape(t.shape)) for t in matrices)
    others = sum(t.numel for t in tensors if t.trainable and not t.matrix)
    refreshing: dict[int, int] = {}  # refresh offset -> the full-minus-R values of the matrices sharing it
    offsets = stagger_offsets(len(matrices), gap) if stagger else [0] * len(matrices)
    for offset, t in zip(offsets, matrices):
        refreshing[offset] = refreshing.get(offset, 0) + t.numel - math.prod(projector.low_rank_shape(t.shape))
    return (low_rank + others + max(refreshing.values(), default=0)) * itemsize


def _method_tensors(method: Any, shape: tuple[int, ...], rank: int) -> list[_Tensor]:
    """A target weight under LoRA/ReLoRA/low-rank: the frozen dense weight (if kept) and two factors."""
    m, n = shape
    counts = method.matrix_parameter_counts(m, n, rank)
    frozen = counts.stored - counts.trainable
    return ([_Tensor((frozen,), trainable=False)] if frozen else []) + [_Tensor((rank, n)), _Tensor((m, rank))]


def _state(layouts: Iterable[list[StateTensor]]) -> tuple[int, int]:
    """(optimizer state, projection) bytes of the parameters' layouts; shared tensors count once."""
    state = projections = 0
    shared: dict[str, int] = {}
    for tensor in (t for layout in layouts for t in layout):
        if tensor.shared:
            shared[tensor.key] = tensor.nbytes
        elif tensor.projection:
            projections += tensor.nbytes
        else:
            state += tensor.nbytes
    return state + sum(shared.values()), projections


def _matrix_group(
    spec: OptimizerSpec, plain: dict[str, Any], galore: dict[str, Any], cfg: TrainConfig
) -> dict[str, Any]:
    """The target weights' param group as build_optimizer makes it: GaLore's keys (spec.galore), then the
    optimizer's own from the config (spec.matrix_group: the limiter, APOLLO's projection and rank, Muon's flag)."""
    group = {**plain, **galore} if spec.galore else dict(plain)
    if spec.matrix_group is not None:
        group.update(spec.matrix_group(cfg))
    return group


def activation_bytes(
    model_config: LlamaConfig, *, dtype_bytes: int, batch_size: int, max_length: int, checkpointing: bool
) -> int:
    """Peak activation bytes of one micro-batch (HF LLaMA, SDPA attention), per token:

        layer = 2 (4h + e h + 4) + e (6h + 4i) + 4a     two RMSNorms (fp32 internals), q/k/v/RoPE/
                                                         attention output, SwiGLU; a fp32 logsumexp per head
        head  = 12 V + 16 h                             fp32 log-probabilities and, at the start of the
                                                         backward, two fp32 vocabulary-sized gradients
        peak  = L layer + head                          (layers saved for backward, then the loss backward)
        with activation checkpointing: L e h + max(layer, head)   (layer inputs, then one recomputed layer)

    with h hidden, i intermediate, a heads, V vocabulary, L layers, e bytes per element. Fitted to, and
    checked against, the CPU MemoryMeter (see docs/memory.md); the logits are assumed not kept.
    """
    h, i = model_config.hidden_size, model_config.intermediate_size
    heads, vocab, layers = model_config.num_attention_heads, model_config.vocab_size, model_config.num_hidden_layers
    e = dtype_bytes
    layer = 2 * (4 * h + e * h + 4) + e * (6 * h + 4 * i) + 4 * heads
    head = 12 * vocab + 16 * h
    per_token = layers * e * h + max(layer, head) if checkpointing else layers * layer + head
    return batch_size * max_length * per_token


def estimate_memory(
    model_config: LlamaConfig,
    optimizer: str,
    rank: int,
    *,
    eightbit: bool = False,
    layerwise: bool = False,
    dtype: str = "bf16",
    batch_size: int = 1,
    max_length: int = 256,
    activation_checkpointing: bool = False,
    galore_targets: Iterable[str] = ("attn", "mlp"),
    proj_type: str = "std",
    proj_bits: int = 32,
    proj_group_size: int = 256,
    beta1: float | None = None,
    fisher_history: int = FISHER_HISTORY,
    moments_dtype: str = "param",
    norm_growth_limit: float | None = None,
    apollo_proj: str = "random",
    distributed: str = "ddp",
    nproc: int = 1,
    total_batch_size: int | None = None,
    int8_weights: bool = False,
    int8_group_size: int = 256,
    accumulate_projected: bool = False,
    stochastic_rounding: bool = False,
    gap: int = 200,
    stagger_refresh: bool = False,
) -> MemoryEstimate:
    """Memory of training `model_config` with `optimizer` (a --optimizer name: optimizer or method).

    Weights, gradients and activations are in `dtype` ("auto" is taken as bf16); optimizer states are
    what the optimizer's `state_layout` says for each parameter; GaLore projection matrices are stored in
    the gradient's dtype, or group-wise quantized with `proj_bits` 8 or 4. `beta1` matters for Adafactor
    only (its optional first moment), `fisher_history` for natural_galore_adamw only, `moments_dtype` (fp32:
    float32 low-rank Adam moments) for the optimizers that take it (registry.MOMENTS_NAMES), `norm_growth_limit`
    (0 = off: no scalar) for Fira and APOLLO, `apollo_proj` ("svd" stores the projection) for APOLLO.
    With `nproc` > 1 the estimate is per GPU under `distributed` (see `_per_gpu`). `total_batch_size` (sequences
    per step over all GPUs, as in pretrain) sets the accumulation, which matters with `layerwise` only: its hooks
    hold every gradient (FSDP: every shard) between micro-batches; with `accumulate_projected` (GaLore family)
    a target matrix's held gradient is its low-rank R, except at the step that refreshes its projection (`gap`,
    `stagger_refresh`: which matrices refresh together). `int8_weights`: the target weights as INT8 codes and
    per-group fp32 scales (weights/int8.py), plus one dequantized matrix at a time (`dequantized`).
    `stochastic_rounding` (--dtype bf16): each update steps an fp32 copy of one parameter, the largest counted
    (the rounding's own temporaries are step temporaries, not counted: weights/bf16.py).
    """
    dtype = AUTO_DTYPE if dtype == "auto" else dtype
    if dtype not in DTYPE_BYTES:
        raise UserError(f"--dtype must be one of auto, {', '.join(DTYPE_BYTES)} for the estimate; got {dtype!r}")
    if proj_type not in PROJ_TYPES:
        raise UserError(f"--proj-type must be one of {', '.join(PROJ_TYPES)}; got {proj_type!r}")
    if proj_bits not in QUANT_BITS + (32,) or proj_group_size <= 0:
        raise UserError(
            f"--proj-bits must be 4, 8 or 32 and --proj-group-size positive; got {proj_bits}, {proj_group_size}"
        )
    if apollo_proj not in PROJECTIONS:
        raise UserError(f"--apollo-proj must be one of {', '.join(PROJECTIONS)}; got {apollo_proj!r}")
    try:
        check_norm_growth_limit(norm_growth_limit or None)
    except ValueError as err:
        raise UserError(str(err)) from None
    check_weight_estimate(
        optimizer,
        eightbit,
        int8_weights,
        int8_group_size,
        accumulate_projected,
        layerwise,
        nproc,
        dtype=dtype,
        stochastic_rounding=stochastic_rounding,
    )
    if nproc < 1 or distributed not in ("ddp", "fsdp"):
        raise UserError(f"--nproc must be positive and --distributed ddp or fsdp; got {nproc}, {distributed!r}")
    if nproc > 1 and distributed == "fsdp":
        check_fsdp_supported(
            TrainConfig(optimizer=optimizer, eightbit=eightbit, layerwise=layerwise, proj_type=proj_type)
        )
    step_batch = TrainConfig(batch_size=batch_size, total_batch_size=total_batch_size, num_training_steps=1)
    accumulation = plan_steps(step_batch, nproc).accumulation
    one_gradient = layerwise and accumulation == 1  # else every gradient (shard) is alive at the step's end
    e = DTYPE_BYTES[dtype]
    method = method_class(optimizer)
    name = resolve_optimizer_name(OPTIMIZERS[optimizer].base if method else optimizer, eightbit)
    spec = OPTIMIZERS[name]
    moments = moments_group(name, moments_dtype)
    plain_group = {"beta1": beta1, "fisher_history": fisher_history}
    galore = {
        "rank": rank,
        "proj_type": proj_type,
        "proj_bits": proj_bits,
        "proj_group_size": proj_group_size,
        **moments,
    }
    matrix_group = _matrix_group(
        spec, plain_group, galore, TrainConfig(norm_growth_limit=norm_growth_limit, apollo_proj=apollo_proj)
    )
    grouped = spec.galore or spec.matrix_group is not None
    rank = rank if method else matrix_group.get("rank", rank)  # APOLLO-Mini's is 1
    tensors: list[_Tensor] = []
    named_shapes = parameter_shapes(model_config, list(galore_targets))
    for _, shape, is_target in named_shapes:
        if is_target and ("rank" in matrix_group or method) and rank >= min(shape):
            raise UserError(f"--rank {rank} is not below min{shape} of a target matrix; lower --rank")
        if is_target and method:
            tensors.extend(_method_tensors(method, shape, rank))
        else:
            tensors.append(_Tensor(shape, matrix=is_target and grouped, int8=is_target and int8_weights))
    layout = spec.state_layout()
    states, projections = _state(
        layout(t.shape, matrix_group if t.matrix else plain_group, e) for t in tensors if t.trainable
    )
    trainable = [t.numel * e for t in tensors if t.trainable]
    held = _held_gradients(tensors, e, matrix_group, gap, stagger_refresh) if accumulate_projected else 0
    label = [f"{optimizer if method else name} rank {rank}" if spec.galore or method else name, dtype]
    label += ["fp32 moments"] if moments else []
    label += ["layer-wise"] if layerwise else []
    label += ["activation checkpointing"] if activation_checkpointing else []
    label += [f"{distributed.upper()} on {nproc} GPUs, per GPU"] if nproc > 1 else []
    label += (
        [f"accumulation {accumulation}{' in the projected space' * accumulate_projected}"] if accumulation > 1 else []
    )
    label += [f"INT8 weights (groups of {int8_group_size})"] if int8_weights else []
    label += ["stochastic rounding"] if stochastic_rounding else []
    estimate = MemoryEstimate(
        label=", ".join(label + [f"batch {batch_size}x{max_length}"]),
        weights=sum(_weight_bytes(t, e, int8_group_size) for t in tensors),
        gradients=max(trainable) if one_gradient else held + max(trainable) if accumulate_projected else sum(trainable),
        dequantized=max((t.numel * e for t in tensors if t.int8), default=0)
        + (
            max((t.numel * DTYPE_BYTES["fp32"] for t in tensors if t.trainable), default=0)
            if stochastic_rounding
            else 0
        ),
        accumulating=accumulation > 1,
        optimizer_states=states,
        projections=projections,
        activations=activation_bytes(
            model_config,
            dtype_bytes=e,
            batch_size=batch_size,
            max_length=max_length,
            checkpointing=activation_checkpointing,
        ),
    )
    return _per_gpu(estimate, nproc, distributed, layerwise, one_gradient, fsdp_unit_bytes(named_shapes, e))


def _per_gpu(
    estimate: MemoryEstimate, nproc: int, distributed: str, layerwise: bool, one_gradient: bool, units: dict[str, int]
) -> MemoryEstimate:
    """One GPU's share of a run on `nproc` (docs/memory.md). DDP: every GPU holds everything; the gradients are
    views into DDP's buckets (`gradient_as_bucket_view=True`, distributed.wrap_model), so no second copy, but the
    buckets exist from wrapping on, beside the activations (none with --layerwise: the model is not DDP-wrapped,
    each hook all-reduces its gradient in place). FSDP: weights, gradients and states divided by nproc, plus the
    unsharded units (`fsdp_gathered_bytes`); with --layerwise and one micro-batch per step, the gradient is one
    unit's shard (FSDP2 writes a unit's shards as views of one reduce-scatter output, freed after its last hook).
    Activations are per GPU already (--batch-size is per device)."""
    if nproc == 1:
        return estimate
    if distributed == "ddp":
        return estimate if layerwise else replace(estimate, ddp_buckets=True)
    gradients = max(units.values()) if one_gradient else estimate.gradients
    return replace(
        estimate,
        weights=-(-estimate.weights // nproc),
        gradients=-(-gradients // nproc),
        optimizer_states=-(-estimate.optimizer_states // nproc),
        distributed=fsdp_gathered_bytes(units),
    )
