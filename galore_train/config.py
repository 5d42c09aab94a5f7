"""TrainConfig: every option of a training run, named once.

The CLI builds `galore-train pretrain`'s flags from these fields (help text in the field metadata),
the config is validated once, printed at start, saved in every checkpoint and sent to W&B.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from galore_train.errors import UserError
from galore_train.registry import EIGHTBIT_VARIANTS, MOMENTS_DTYPES, MOMENTS_NAMES, OPTIMIZERS, listing
from galore_train.weights.options import check_weight_options


def option(default: Any, help: str, flag: Optional[str] = None, section: str = "Training") -> Any:
    """A dataclass field that also describes its CLI flag."""
    meta = {"help": help, "flag": flag, "section": section}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def flag(name: str) -> str:
    """The command-line flag of the TrainConfig field `name` (--8bit for eightbit, --tag for tags)."""
    metadata = next(f.metadata for f in dataclasses.fields(TrainConfig) if f.name == name)
    return metadata.get("flag") or "--" + name.replace("_", "-")


_TOKEN_SUFFIXES = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}


def parse_token_count(text: str | int | None) -> Optional[int]:
    """'1.1B' -> 1_100_000_000; plain integers pass through; None stays None."""
    if text is None or isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMBT]?)\s*", str(text).upper())
    if not match:
        raise UserError(f"cannot read token count {text!r}: use a number with an optional K/M/B/T suffix, e.g. 1.1B")
    return int(round(float(match.group(1)) * _TOKEN_SUFFIXES[match.group(2)]))


# The TrainConfig fields the memory estimate reads beyond model, optimizer, rank and --8bit (galore_train/memory/fit.py,
# and the flags of `galore-train memory`).
ESTIMATE_OPTIONS = tuple(
    "layerwise dtype batch_size max_length activation_checkpointing galore_targets proj_type proj_bits proj_group_size"
    " beta1 fisher_history moments_dtype norm_growth_limit apollo_proj distributed total_batch_size int8_weights"
    " int8_group_size accumulate_projected stochastic_rounding gap stagger_refresh".split()
)
# Settings newer than some checkpoints: what a saved config without them ran with.
ABSENT_MEANS = {"moments_dtype": "param", "int8_weights": False, "int8_group_size": 256, "stochastic_rounding": False}


# ReLoRA's scripts re-warm for 100 steps after each restart, with restarts every 1000 or more steps.
MAX_DEFAULT_RESTART_WARMUP = 100


def restart_warmup(restart_warmup_steps: Optional[int], relora_reset: int) -> int:
    """ReLoRA's re-warm-up after each restart: the explicit value, else a tenth of the cycle (ReLoRA's ratio),
    at most 100: so the default fits any valid --relora-reset (it must stay shorter than the cycle)."""
    if restart_warmup_steps is not None:
        return restart_warmup_steps
    return min(MAX_DEFAULT_RESTART_WARMUP, relora_reset // 10)


@dataclass
class TrainConfig:
    # --- model and data -------------------------------------------------------------------------
    model: str = option(
        "llama_60m",
        "Config name from configs/ (see `galore-train models`) or a path to a LlamaConfig JSON.",
        section="Model and data",
    )
    init_from: Optional[str] = option(
        None,
        "Start from existing LLaMA weights instead of random init: a checkpoint folder, a run folder or its"
        " checkpoints/ folder (= its latest checkpoint), or a hub id.",
        section="Model and data",
    )
    tokenizer: str = option(
        "t5-base", "Tokenizer: hub id, a local directory, or a path to a spiece.model.", section="Model and data"
    )
    dataset: str = option(
        "allenai/c4", "Hub dataset to stream when --data-files is not given.", section="Model and data"
    )
    dataset_config: str = option("en", "Hub dataset configuration.", section="Model and data")
    data_files: Optional[str] = option(
        None,
        "Glob of local C4 json/json.gz shards for training (instead of the hub), or a directory made by"
        " `galore-train prepare-data`.",
        section="Model and data",
    )
    eval_data_files: Optional[str] = option(
        None,
        "Glob of local C4 shards for validation (instead of the hub's validation split).",
        section="Model and data",
    )
    max_length: int = option(256, "Tokens per sequence.", section="Model and data")
    pack: bool = option(
        False,
        "Concatenate documents with EOS into full sequences (default: one document per sequence, padded, pad"
        " excluded from the loss, as in the paper).",
        section="Model and data",
    )
    shuffle_buffer: int = option(
        10_000, "Documents in the seeded shuffle buffer (0 disables shuffling).", section="Model and data"
    )
    eval_tokens: int = option(
        10_000_000, "Held-out target tokens scored at every evaluation (paper: 10M).", section="Model and data"
    )
    seed: int = option(0, "Seed for model init, data order and dropout.", section="Model and data")

    # --- optimisation ---------------------------------------------------------------------------
    optimizer: str = option("adamw", f"Optimizer or method: {', '.join(OPTIMIZERS)} (see `galore-train optimizers`).")
    eightbit: bool = option(
        False,
        "Use the 8-bit variant of --optimizer"
        f" ({', '.join(f'{name} -> {variant}' for name, variant in EIGHTBIT_VARIANTS.items())}).",
        flag="--8bit",
    )
    layerwise: bool = option(False, "Update each parameter inside its gradient hook and free the gradient at once.")
    lr: float = option(1e-3, "Peak learning rate.")
    weight_decay: float = option(0.0, "Decoupled weight decay.")
    beta1: Optional[float] = option(None, "First-moment decay (default: 0.9 for Adam-type, none for Adafactor).")
    beta2: float = option(0.999, "Second-moment decay (Adam-type optimizers).")
    eps: float = option(1e-8, "Adam epsilon.")
    grad_clipping: float = option(0.0, "Clip the global gradient norm to this value (0 = off).")
    batch_size: int = option(8, "Micro-batch size per device.")
    total_batch_size: Optional[int] = option(
        None,
        "Sequences per optimizer step across all devices (accumulation is derived; default: batch size x devices).",
    )
    num_training_steps: Optional[int] = option(None, "Optimizer steps (or give --max-train-tokens).")
    max_train_tokens: Optional[str] = option(
        None, "Token budget, e.g. 1.1B; sets the number of steps from the total batch."
    )
    warmup_steps: Optional[int] = option(None, "Linear warm-up steps (default: 10% of the training steps).")
    scheduler: str = option("cosine", "cosine, linear or constant.")
    min_lr_ratio: float = option(0.1, "Final learning rate as a fraction of --lr (cosine and linear).")
    dtype: str = option(
        "auto", "auto (bf16 on GPUs that support it, fp32 on CPU), bf16 (pure bf16 weights, like the paper) or fp32."
    )
    activation_checkpointing: bool = option(False, "Recompute activations in the backward pass to save memory.")
    int8_weights: bool = option(False, "Store the target linear weights as INT8 with per-group scales (docs/int8.md).")
    int8_group_size: int = option(256, "Values per INT8 weight scale, within a row (must divide the row length).")
    int8_rounding: str = option("stochastic", "How updated INT8 weights are requantized: stochastic or nearest.")
    stochastic_rounding: bool = option(
        False, "--dtype bf16: round each updated weight to bf16 stochastically, not to nearest (docs/int8.md)."
    )
    accumulate_projected: bool = option(
        False, "--layerwise, GaLore family: sum the low-rank P^T G over micro-batches, not the full gradient G."
    )
    compile: bool = option(False, "torch.compile the model.")
    recipe: Optional[str] = option(
        None, "Fill in a published configuration (see `galore-train recipes`); explicit flags win."
    )

    # --- GaLore ---------------------------------------------------------------------------------
    rank: int = option(
        128, "Rank of the GaLore projection / LoRA / low-rank factorization.", section="GaLore and low-rank methods"
    )
    gap: int = option(
        200,
        "Steps between SVD refreshes of the GaLore projection (update_proj_gap).",
        section="GaLore and low-rank methods",
    )
    scale: float = option(
        0.25, "GaLore scale alpha applied to the projected-back update.", section="GaLore and low-rank methods"
    )
    proj_type: str = option("std", "std, reverse_std, left, right or full.", section="GaLore and low-rank methods")
    galore_targets: list[str] = option(
        ["attn", "mlp"],
        "Which linear layers get low-rank treatment: 'attn', 'mlp' or a regex on module names.",
        section="GaLore and low-rank methods",
    )
    svd: str = option(
        "full",
        "Projection refresh: full SVD, or randomized (range finder + power iterations).",
        section="GaLore and low-rank methods",
    )
    stagger_refresh: bool = option(
        False,
        "Spread the SVD refreshes of different matrices over the gap window (implied by --accumulate-projected).",
        flag="--stagger-refresh/--no-stagger-refresh",
        section="GaLore and low-rank methods",
    )
    proj_bits: int = option(
        32,
        "Store projection matrices in 32, 8 or 4 bits (group-wise quantized).",
        section="GaLore and low-rank methods",
    )
    proj_group_size: int = option(
        256, "Group size of the projection quantization.", section="GaLore and low-rank methods"
    )
    adaptive_gap: bool = option(
        False, "Double a layer's refresh interval while its subspace stays put.", section="GaLore and low-rank methods"
    )
    cos_threshold: float = option(
        0.4,
        "Subspace similarity above which --adaptive-gap lengthens the interval.",
        section="GaLore and low-rank methods",
    )
    moments_dtype: str = option(
        "param",
        "Adam moments of the GaLore group (low-rank, r x n each): param = the "
        "weights' dtype, i.e. pure bf16 with --dtype bf16, as in the paper and its Table 2 "
        "memory; fp32 = float32, small, and what lets a bf16 run's second moment decay "
        f"(0.999 v rounds back to v in bf16). For {listing(MOMENTS_NAMES)}.",
        section="GaLore and low-rank methods",
    )
    fisher_history: int = option(
        20, "Natural GaLore: projected gradients kept for the empirical Fisher.", section="GaLore and low-rank methods"
    )
    fisher_damping: float = option(
        1e-3, "Natural GaLore: damping lambda of the empirical Fisher.", section="GaLore and low-rank methods"
    )
    lora_alpha: float = option(
        32.0, "LoRA/ReLoRA scaling numerator (update scale = alpha / rank).", section="GaLore and low-rank methods"
    )
    lora_dropout: float = option(
        0.1, "LoRA/ReLoRA dropout on the adapter input.", section="GaLore and low-rank methods"
    )
    relora_reset: int = option(
        5000,
        "ReLoRA: merge and restart the adapters every N steps (ReLoRA's own runs: about a tenth of the run, e.g."
        " 1000 of 10k).",
        section="GaLore and low-rank methods",
    )
    optimizer_reset_ratio: float = option(
        0.999,
        "ReLoRA: fraction of adapter optimizer state pruned (by magnitude) at a restart.",
        section="GaLore and low-rank methods",
    )
    restart_warmup_steps: Optional[int] = option(
        None,
        "ReLoRA: learning-rate warm-up after each restart (default: a tenth of --relora-reset, at most 100 as in"
        " ReLoRA's 1000-step cycles).",
        section="GaLore and low-rank methods",
    )
    relora_warm_start: int = option(
        0, "ReLoRA: full-rank training steps before the adapters are attached.", section="GaLore and low-rank methods"
    )

    # --- beyond GaLore: Fira, APOLLO, Muon, the norm-growth limiter (docs/beyond_galore.md) ------
    fira_residual: str = option(
        "code",
        "Fira: out-of-subspace residual G - scale P P^T G as in the authors' code "
        "(what produced their numbers), or 'paper': G - P P^T G.",
        section="GaLore and low-rank methods",
    )
    apollo_proj: str = option(
        "random",
        "APOLLO: projection from a seeded Gaussian (no SVD, nothing stored), or 'svd' (GaLore's projector).",
        section="GaLore and low-rank methods",
    )
    apollo_scale_type: str = option(
        "channel",
        "APOLLO: channel-wise or tensor-wise gradient scaling (apollo_mini is always tensor-wise, rank 1).",
        section="GaLore and low-rank methods",
    )
    apollo_scale: Optional[float] = option(
        None,
        "APOLLO: gradient scale factor (default: 1 for apollo_adamw, "
        "sqrt(128) for apollo_mini; the factor itself: the authors' package square-roots its scale, so their "
        "128 is sqrt(128) here; --scale is GaLore's and Fira's).",
        section="GaLore and low-rank methods",
    )
    norm_growth_limit: Optional[float] = option(
        None,
        "Limit each matrix's update norm to this factor x its previous "
        "one (fira_adamw, apollo_adamw, apollo_mini; default 1.01; 0 = off).",
        section="GaLore and low-rank methods",
    )

    # --- run control ----------------------------------------------------------------------------
    eval_every: int = option(1000, "Evaluate every N optimizer steps (and at the end).", section="Run control")
    eval_batch_size: Optional[int] = option(
        None, "Sequences per evaluation batch (default: --batch-size, at least 16).", section="Run control"
    )
    save_every: int = option(10_000, "Checkpoint every N optimizer steps (and at the end).", section="Run control")
    keep_last: int = option(2, "Step checkpoints to keep (the final one is always kept).", section="Run control")
    output_dir: Optional[str] = option(None, "Run directory (default: runs/<run name>).", section="Run control")
    resume: bool = option(False, "Continue the run in --output-dir from its latest checkpoint.", section="Run control")
    resume_from: Optional[str] = option(None, "Continue from this checkpoint directory.", section="Run control")
    allow_data_change: bool = option(
        False,
        "Resume with other training data, tokenizer, --max-length or --pack (continued pretraining): the"
        " weights, optimizer and schedule continue, the new data is read from its beginning.",
        section="Run control",
    )
    skip_nonfinite: bool = option(
        False, "Skip optimizer steps whose loss or gradient norm is NaN/inf instead of stopping.", section="Run control"
    )
    spike_threshold: Optional[float] = option(
        None, "Skip a step whose loss exceeds this factor x the running mean.", section="Run control"
    )
    max_spikes: int = option(10, "Stop after this many consecutive skipped steps.", section="Run control")
    distributed: str = option("ddp", "ddp or fsdp (under torchrun).", section="Run control")
    lowrank_sync: Optional[bool] = option(
        None,
        "Under DDP, average GaLore matrices' gradients as the projected R between refreshes (n/r times fewer bytes;"
        " exact). Default: on wherever it is exact (DDP, also --layerwise, with galore_adamw/_adafactor/_adamw8bit"
        " or natural_galore_adamw).",
        flag="--lowrank-sync/--no-lowrank-sync",
        section="Run control",
    )
    dist_timeout: float = option(
        60.0,
        "Minutes a collective waits for the other processes before the run fails "
        "(torchrun; rank 0 writing a large checkpoint makes the others wait).",
        section="Run control",
    )
    log_every: int = option(1, "Print/log every N optimizer steps.", section="Run control")
    skip_fit_check: bool = option(
        False,
        "Start on a GPU even where the memory estimate exceeds its free memory (checked before the model is built).",
        section="Run control",
    )

    # --- logging --------------------------------------------------------------------------------
    wandb_project: str = option("galore-train", "W&B project.", section="Logging")
    run_name: Optional[str] = option(None, "Run name (default: <model>-<optimizer>-<time>).", section="Logging")
    tags: list[str] = option([], "W&B tags (repeat the flag).", flag="--tag", section="Logging")
    wandb_mode: Optional[str] = option(
        None, "online, offline or disabled (default: $WANDB_MODE, else online).", section="Logging"
    )

    # ---------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    def validate(self) -> "TrainConfig":
        """Check everything that can be checked without the model or the data; raise UserError."""
        positive = (
            "max_length batch_size eval_every save_every log_every eval_tokens gap rank relora_reset max_spikes".split()
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.lr <= 0:
            raise UserError(f"--lr must be positive, got {self.lr}")
        if self.num_training_steps is not None and self.num_training_steps <= 0:
            raise UserError("--num-training-steps must be positive")
        parse_token_count(self.max_train_tokens)
        choices = {
            "scheduler": ("cosine", "linear", "constant"),
            "dtype": ("auto", "bf16", "fp32"),
            "proj_type": ("std", "reverse_std", "left", "right", "full"),
            "svd": ("full", "randomized"),
            "distributed": ("ddp", "fsdp"),
            "fira_residual": ("code", "paper"),  # beyond GaLore (issue 18)
            "apollo_proj": ("random", "svd"),
            "apollo_scale_type": ("channel", "tensor"),
            "moments_dtype": MOMENTS_DTYPES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise UserError(
                    f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}"
                )
        if self.wandb_mode not in (None, "online", "offline", "disabled"):
            raise UserError(f"--wandb-mode must be online, offline or disabled; got {self.wandb_mode!r}")
        if self.proj_bits not in (4, 8, 32):
            raise UserError(f"--proj-bits must be 4, 8 or 32; got {self.proj_bits}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise UserError(f"--min-lr-ratio must be within [0, 1], got {self.min_lr_ratio}")
        if not 0.0 <= self.optimizer_reset_ratio <= 1.0:
            raise UserError(f"--optimizer-reset-ratio must be within [0, 1], got {self.optimizer_reset_ratio}")
        if self.num_training_steps is None and self.max_train_tokens is None:
            raise UserError("give --num-training-steps or --max-train-tokens")
        if self.resume and self.resume_from:
            raise UserError("give --resume or --resume-from, not both")
        check_weight_options(self)
        return self
