"""The --optimizer names: one table of every optimizer and method, which everything that lists names reads.

An entry says what the name builds (a "module:attribute" path, imported on first use, so this table costs nothing
to import and can feed TrainConfig's help text), the constructor's keywords from a TrainConfig, where its state
layout comes from (the memory estimator's source), its 8-bit variant, its row name in reports, whether it is
GaLore-family (projected param group) or runs under FSDP, the target group's own keys and the config fields only it
reads, and its state per weight as `galore-train optimizers` prints it. Methods (LoRA, ReLoRA, low-rank) change the
model, not the optimizer: their entry names the Method class and the optimizer that trains their parameters. Adding
an optimizer: write its class (galore_train/optim/, with a `state_layout`), add one entry here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Optional

from galore_train.errors import UserError

Settings = Callable[[Any], dict[str, Any]]  # a TrainConfig -> the constructor's keyword arguments


def _adam(cfg: Any) -> dict[str, Any]:
    return {
        "lr": cfg.lr,
        "betas": (0.9 if cfg.beta1 is None else cfg.beta1, cfg.beta2),
        "eps": cfg.eps,
        "weight_decay": cfg.weight_decay,
    }


def _adafactor(cfg: Any) -> dict[str, Any]:
    return {"lr": cfg.lr, "beta1": cfg.beta1, "weight_decay": cfg.weight_decay}


def _natural(cfg: Any) -> dict[str, Any]:
    return {**_adam(cfg), "fisher_history": cfg.fisher_history, "fisher_damping": cfg.fisher_damping}


def _fira(cfg: Any) -> dict[str, Any]:
    return {**_adam(cfg), "residual": cfg.fira_residual}


def _apollo(cfg: Any) -> dict[str, Any]:
    return {**_adam(cfg), "proj_seed": cfg.seed}  # the random projections follow --seed


def _limited(cfg: Any) -> dict[str, Any]:
    """The target-matrix group of Fira and APOLLO: --norm-growth-limit, unset = the papers' 1.01, 0 = off."""
    from galore_train.optim.norm_growth import DEFAULT_LIMIT

    limit = DEFAULT_LIMIT if cfg.norm_growth_limit is None else cfg.norm_growth_limit or None
    return {"norm_growth_limit": limit}


def _apollo_matrices(cfg: Any, mini: bool = False) -> dict[str, Any]:
    """APOLLO's target-matrix group; APOLLO-Mini is rank 1, tensor-wise, scale sqrt(128) (unless --apollo-scale)."""
    from galore_train.optim.apollo import APOLLO_SCALE, MINI_SCALE

    default_scale = MINI_SCALE if mini else APOLLO_SCALE
    group = {
        **_limited(cfg),
        "proj": cfg.apollo_proj,
        "scale_type": "tensor" if mini else cfg.apollo_scale_type,
        "scale": cfg.apollo_scale if cfg.apollo_scale is not None else default_scale,
    }
    return {**group, "rank": OPTIMIZERS["apollo_mini"].rank} if mini else group


# The GaLore keys of the target weights' group (every GaLore-family optimizer, spec.galore) -> their TrainConfig field.
GALORE_KEYS = {
    "rank": "rank",
    "update_proj_gap": "gap",
    "scale": "scale",
    "proj_type": "proj_type",
    "svd": "svd",
    "stagger_refresh": "stagger_refresh",
    "proj_bits": "proj_bits",
    "proj_group_size": "proj_group_size",
    "adaptive_gap": "adaptive_gap",
    "cos_threshold": "cos_threshold",
}


def galore_group(cfg: Any) -> dict[str, Any]:
    """The GaLore keys of the target weights' group, from the config."""
    return {key: getattr(cfg, field) for key, field in GALORE_KEYS.items()}


class _FieldRecorder:
    """Stands in for a TrainConfig and records which fields a settings function reads."""

    def __init__(self, config: Any) -> None:
        self._config, self.read = config, set()

    def __getattr__(self, name: str) -> Any:
        self.read.add(name)
        return getattr(self._config, name)


def _resolve(path: str) -> Any:
    module, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module), attribute)


@dataclass(frozen=True)
class OptimizerSpec:
    """One --optimizer name. `state` is per m x n target weight (m <= n), rank r."""

    name: str
    label: str  # the row name in reports (the paper's where it has one)
    state: str
    build: str  # "module:attribute": called as (params, **settings(cfg)); for a method, its Method class
    settings: Optional[Settings] = None  # None for methods
    layout: Optional[str] = None  # "module:attribute" of the state layout, if not the built class's own
    eightbit: Optional[str] = None  # the name --8bit turns this one into
    galore: bool = False  # the target weights form a GaLore param group
    matrix_group: Optional[Settings] = None  # a TrainConfig -> more keys of the target weights' own group
    options: tuple[str, ...] = ()  # the TrainConfig fields it reads beyond its settings functions
    fsdp: bool = False  # correct on FSDP2's DTensor shards
    reads_only_r: bool = False  # its update reads R, not G: DDP may average R instead (optim/lowrank_sync.py)
    base: Optional[str] = None  # a method's optimizer over its trainable parameters
    rank: Optional[int] = None  # a rank of its own, whatever --rank says (APOLLO-Mini: 1)

    def fields_read(self, config: Any) -> frozenset[str]:
        """The TrainConfig fields this name reads, as its settings functions read them (traced on `config`, any
        TrainConfig), plus those its `options` declare; a method reads its base optimizer's. What decides which
        flags mean nothing for it (galore_train/implied.py)."""
        recorder = _FieldRecorder(config)
        base = OPTIMIZERS[self.base] if self.base else self
        if base.settings is not None:
            base.settings(recorder)
        own = self.matrix_group(recorder) if self.matrix_group is not None else {}
        if self.galore:  # GaLore's keys, except those the optimizer's own group replaces (APOLLO's scale, rank)
            recorder.read |= {field for key, field in GALORE_KEYS.items() if key not in own}
        if self.galore or self.matrix_group is not None:
            recorder.read.add("galore_targets")  # the target weights form a group of their own
        return frozenset(recorder.read | set(self.options))

    @property
    def is_method(self) -> bool:
        return self.base is not None

    def rank_used(self, rank: int) -> int:
        """The rank its target weights get when --rank is `rank`."""
        return rank if self.rank is None else self.rank

    @property
    def norm_growth(self) -> bool:
        """Whether it takes --norm-growth-limit."""
        return "norm_growth_limit" in self.options

    @property
    def moments(self) -> bool:
        """Whether it takes --moments-dtype (the Adam moments of its GaLore group)."""
        return "moments_dtype" in self.options

    @property
    def kind(self) -> str:
        """What `galore-train optimizers` shows: method, GaLore or full-rank, and FSDP if it runs sharded."""
        kind = "method" if self.is_method else "GaLore" if self.galore else "full-rank"
        return kind + (", FSDP" if self.fsdp else "")

    @property
    def other_8bit(self) -> str:
        """The 8-bit variant if it is another optimizer, else ''."""
        return self.eightbit if self.eightbit not in (None, self.name) else ""

    def load(self) -> Any:
        """The optimizer class (or constructor) or Method class, imported now."""
        return _resolve(self.build)

    def state_layout(self) -> Callable[..., list]:
        """`(shape, group, itemsize) -> list[StateTensor]`: the state this optimizer keeps for one parameter."""
        return _resolve(self.layout) if self.layout else self.load().state_layout


_TORCH_ADAM = "galore_train.optim.external:torch_adam_state_layout"
_MOMENTS = ("moments_dtype",)  # float32 Adam moments of the GaLore group (for pure bf16 runs)
_FIRA = ("fira_residual", "norm_growth_limit", *_MOMENTS)
_APOLLO = ("apollo_proj", "apollo_scale_type", "apollo_scale", "norm_growth_limit", *_MOMENTS)
_STATELESS = "none (stateless: the gradient normalized each step); AdamW's moments + a step elsewhere"
_LORA = ("rank", "galore_targets", "lora_alpha", "lora_dropout")
_RELORA = (*_LORA, "relora_reset", "optimizer_reset_ratio", "restart_warmup_steps", "relora_warm_start")
_LORA_STATE = "mn frozen weight + (m+n)r adapters, AdamW moments of the adapters 2(m+n)r"

OPTIMIZERS: dict[str, OptimizerSpec] = {
    spec.name: spec
    for spec in (
        OptimizerSpec(
            "adamw",
            "Full-Rank",
            "2mn moments + a float32 step",
            "torch.optim:AdamW",
            _adam,
            _TORCH_ADAM,
            eightbit="adam8bit",
            fsdp=True,
        ),
        OptimizerSpec(
            "adam",
            "Full-Rank (Adam)",
            "2mn moments + a float32 step",
            "torch.optim:Adam",
            _adam,
            _TORCH_ADAM,
            eightbit="adam8bit",
            fsdp=True,
        ),
        OptimizerSpec(
            "adafactor",
            "Adafactor",
            "m + n fp32 (factored second moment); + mn fp32 with --beta1",
            "galore_train.optim:GaLoreAdafactor",
            _adafactor,
            fsdp=True,
        ),
        OptimizerSpec(
            "adam8bit",
            "8-bit Adam",
            "2mn bytes + fp32 absmax per 256 values (fp32 moments below 4096 values)",
            "galore_train.optim.external:bitsandbytes_adamw8bit",
            _adam,
            "galore_train.optim.external:bitsandbytes_adamw8bit_state_layout",
            eightbit="adam8bit",
        ),
        OptimizerSpec(
            "galore_adamw",
            "GaLore",
            "mr projection + 2nr moments",
            "galore_train.optim:GaLoreAdamW",
            _adam,
            eightbit="galore_adamw8bit",
            galore=True,
            options=_MOMENTS,
            fsdp=True,
            reads_only_r=True,
        ),
        OptimizerSpec(
            "galore_adafactor",
            "GaLore-Adafactor",
            "mr projection + r + n fp32; + nr fp32 with --beta1",
            "galore_train.optim:GaLoreAdafactor",
            _adafactor,
            galore=True,
            fsdp=True,
            reads_only_r=True,
        ),
        OptimizerSpec(
            "galore_adamw8bit",
            "8-bit GaLore",
            "mr projection + 2nr bytes + fp32 absmax per 256 values",
            "galore_train.optim:GaLoreAdamW8bit",
            _adam,
            eightbit="galore_adamw8bit",
            galore=True,
            fsdp=True,
            reads_only_r=True,
        ),
        OptimizerSpec(
            "natural_galore_adamw",
            "Natural GaLore",
            "mr projection + 2nr moments + s nr gradient history + s^2 fp64 (s = --fisher-history)",
            "galore_train.optim:NaturalGaLoreAdamW",
            _natural,
            galore=True,
            options=_MOMENTS,
            fsdp=True,
            reads_only_r=True,
        ),
        OptimizerSpec(
            "fira_adamw",
            "Fira",
            "mr projection + 2nr moments + a float32 norm (unless --norm-growth-limit 0)",
            "galore_train.optim:FiraAdamW",
            _fira,
            galore=True,
            matrix_group=_limited,
            options=_FIRA,
            fsdp=True,
        ),
        OptimizerSpec(
            "apollo_adamw",
            "APOLLO",
            "2nr moments + a float32 norm; the random projection is regenerated, not stored (+ mr with "
            "--apollo-proj svd)",
            "galore_train.optim:ApolloAdamW",
            _apollo,
            galore=True,
            matrix_group=_apollo_matrices,
            options=_APOLLO,
            fsdp=True,
        ),
        OptimizerSpec(
            "apollo_mini",
            "APOLLO-Mini",
            "2n moments (rank 1: O(m + n)) + a float32 norm",
            "galore_train.optim:ApolloAdamW",
            _apollo,
            galore=True,
            matrix_group=lambda cfg: _apollo_matrices(cfg, mini=True),
            options=tuple(name for name in _APOLLO if name != "apollo_scale_type"),
            rank=1,
            fsdp=True,
        ),  # always tensor-wise, always rank 1
        OptimizerSpec(
            "muon",
            "Muon",
            "mn momentum (torch.optim.Muon's: no step count); AdamW's moments + a float32 step elsewhere",
            "galore_train.optim:MuonAdamW",
            _adam,
            eightbit="muon8bit",
            matrix_group=lambda cfg: {"muon": True},
            fsdp=True,
        ),
        OptimizerSpec(
            "muon8bit",
            "8-bit Muon",
            "mn bytes of momentum + fp32 absmax per 256 values (fp32 below 4096 values); AdamW's moments elsewhere",
            "galore_train.optim:MuonAdamW",
            _adam,
            eightbit="muon8bit",
            matrix_group=lambda cfg: {"muon": True, "momentum_bits": 8},
            fsdp=True,
        ),
        OptimizerSpec(
            "swan",
            "SWAN",
            _STATELESS,
            "galore_train.optim:SwanAdamW",
            _adam,
            matrix_group=lambda cfg: {"stateless": True},
        ),
        OptimizerSpec(
            "sinkgd",
            "SinkGD",
            _STATELESS,
            "galore_train.optim:SinkGDAdamW",
            _adam,
            matrix_group=lambda cfg: {"stateless": True},
        ),
        OptimizerSpec("lora", "LoRA", _LORA_STATE, "galore_train.methods.lora:LoRA", base="adamw", options=_LORA),
        OptimizerSpec(
            "relora",
            "ReLoRA",
            _LORA_STATE + "; merged and restarted every --relora-reset steps",
            "galore_train.methods.relora:ReLoRA",
            base="adamw",
            options=_RELORA,
        ),
        OptimizerSpec(
            "low_rank",
            "Low-Rank",
            "(m+n)r factors replace the weight, AdamW moments 2(m+n)r",
            "galore_train.methods.low_rank:LowRank",
            base="adamw",
            options=("rank", "galore_targets"),
        ),
    )
}
OPTIMIZER_NAMES = tuple(name for name, spec in OPTIMIZERS.items() if not spec.is_method)
METHOD_NAMES = tuple(name for name, spec in OPTIMIZERS.items() if spec.is_method)
GALORE_NAMES = tuple(name for name, spec in OPTIMIZERS.items() if spec.galore)
FSDP_NAMES = tuple(name for name, spec in OPTIMIZERS.items() if spec.fsdp)
NORM_GROWTH_NAMES = tuple(name for name, spec in OPTIMIZERS.items() if spec.norm_growth)
MOMENTS_NAMES = tuple(name for name, spec in OPTIMIZERS.items() if spec.moments)
MOMENTS_DTYPES = ("param", "fp32")
EIGHTBIT_VARIANTS = {name: spec.other_8bit for name, spec in OPTIMIZERS.items() if spec.other_8bit}


def listing(names: tuple[str, ...] | list[str], last: str = "and") -> str:
    """'a, b and c' (or 'a or b')."""
    return ", ".join(names[:-1]) + f" {last} {names[-1]}" if len(names) > 1 else "".join(names)


def resolve_optimizer_name(name: str, eightbit: bool) -> str:
    """The optimizer actually built for --optimizer NAME [--8bit] (NAME an optimizer, not a method)."""
    if name not in OPTIMIZER_NAMES:
        raise UserError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZER_NAMES)}")
    if not eightbit:
        return name
    variant = OPTIMIZERS[name].eightbit
    if variant is None:
        raise UserError(f"--8bit has no variant of {name!r}; it applies to {listing(list(EIGHTBIT_VARIANTS))}")
    return variant


def moments_group(name: str, moments_dtype: str) -> dict[str, Any]:
    """The GaLore group's key for --moments-dtype with the optimizer `name` (resolved): nothing for 'param'
    (moments in the gradient's dtype), moment_dtype float32 for 'fp32'; a UserError where it does not apply."""
    if moments_dtype not in MOMENTS_DTYPES:
        raise UserError(f"--moments-dtype must be one of {', '.join(MOMENTS_DTYPES)}; got {moments_dtype!r}")
    if moments_dtype == "param":
        return {}
    if not OPTIMIZERS[name].moments:
        message = f"--moments-dtype {moments_dtype} applies to the low-rank Adam moments of {listing(MOMENTS_NAMES)}"
        raise UserError(f"{message}, not to {name}")
    import torch

    return {"moment_dtype": torch.float32}
