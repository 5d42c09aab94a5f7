"""The training loop: micro-batches, accumulation, step, eval, save, resume.

`Trainer(cfg).run()` is the whole of `galore-train pretrain`. Components (data stream, method, optimizer,
schedule, weight updates, metrics, checkpoints, resume) are built by their own modules; this file only
drives them, so a reader can follow one optimizer step from top to bottom in `_train_step`.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from galore_train import checkpoint, distributed, fsdp, resume, storage
from galore_train.config import TrainConfig
from galore_train.data import (
    BAD_LINES,
    PretrainingStream,
    Tokenize,
    cached_eval_batches,
    document_source,
    eval_cache_key,
    load_tokenizer,
    pin_batches,
)
from galore_train.errors import TrainingStopped
from galore_train.evaluate import eval_batch_size, evaluate, summed_loss, target_count, to_device
from galore_train.guard import LossGuard
from galore_train.initial_weights import fill_weights
from galore_train.memory import fit
from galore_train.memory.meter import MemoryMeter
from galore_train.methods import METHOD_NAMES, build_method, scheduler_kwargs
from galore_train.metrics import MetricsSink
from galore_train.model import dtype_name, load_model_config, load_pretrained_llama, meta_llama, resolve_dtype
from galore_train.optimizers import build_optimizer
from galore_train.plan import plan_steps
from galore_train.registry import OPTIMIZERS, resolve_optimizer_name
from galore_train.schedule import build_scheduler
from galore_train.signals import StopRequest
from galore_train.updates import wrap_with_updates
from galore_train.weights import export, stepping

log = logging.getLogger(__name__)


def default_run_name(cfg: TrainConfig) -> str:
    method = cfg.optimizer if cfg.optimizer in METHOD_NAMES else resolve_optimizer_name(cfg.optimizer, cfg.eightbit)
    return f"{Path(cfg.model).stem}-{method}-{datetime.now():%Y%m%d-%H%M%S}"


# --- the trainer ---------------------------------------------------------------------------------


class Trainer:
    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg.validate()
        self.env = distributed.setup(cfg.dist_timeout)
        self.device = self.env.device
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        self.plan = plan_steps(cfg, self.env.world_size)
        self.run_name = cfg.run_name or default_run_name(cfg)
        self.output_dir = Path(cfg.output_dir or checkpoint.RUNS / self.run_name)
        self.checkpoint_root = self.output_dir / "checkpoints"
        self.model_config = load_model_config(cfg.model)
        fit.check_fits(cfg, self.model_config, self.env, distributed.gather_floats)  # before a GPU holds anything
        self.resume_dir = resume.find_checkpoint(cfg, self.output_dir, self.env)
        resume.check_ranks_agree(self.resume_dir, self.env)
        self.data_restarts = False  # --allow-data-change: the saved stream position is not restored
        if self.resume_dir is not None:
            self.data_restarts = resume.check_compatible(self.resume_dir, cfg, self.model_config, self.dtype)
            saved_state, data_states = checkpoint.load_trainer_state(self.resume_dir)

        self.tokenize = Tokenize(load_tokenizer(cfg.tokenizer), cfg.max_length, self.model_config.vocab_size)
        self.step = saved_state["step"] if self.resume_dir is not None else 0
        self.tokens_seen = 0
        self.guard = LossGuard(
            spike_threshold=cfg.spike_threshold, skip_nonfinite=cfg.skip_nonfinite, max_consecutive=cfg.max_spikes
        )
        self.method = build_method(cfg)  # LoRA/ReLoRA/low-rank rewrite the model; FullModel leaves it as built
        self.model = self._build_model()
        self.rounded = stepping.rounded_weights_for_run(self.model, cfg)  # INT8, --stochastic-rounding
        self._build_optimizer()
        self.train_stream = PretrainingStream(
            lambda: document_source(
                cfg.data_files, "--data-files", cfg.dataset, cfg.dataset_config, "train", self.tokenize
            ),
            self.tokenize,
            batch_size=cfg.batch_size,
            pack=cfg.pack,
            shuffle_buffer=cfg.shuffle_buffer,
            seed=cfg.seed,
            rank=self.env.rank,
            world_size=self.env.world_size,
            prefetch=2 * self.plan.accumulation,
            pin_memory=pin_batches(self.device),
        )
        eval_key = eval_cache_key(
            cfg.eval_data_files, f"{cfg.dataset}/{cfg.dataset_config}/validation", self.tokenize, cfg.eval_tokens
        )
        self.eval_batches, self.eval_tokens = cached_eval_batches(
            self.output_dir / "eval_cache",
            eval_key,
            lambda: document_source(
                cfg.eval_data_files, "--eval-data-files", cfg.dataset, cfg.dataset_config, "validation"
            ),
            self.tokenize,
            batch_size=eval_batch_size(cfg),
            builder=self.env.is_main,
            agree=lambda failed: distributed.any_rank(failed, self.env),
        )
        self.eval_batches = distributed.lockstep_batches(self.eval_batches, self.model, self.env)
        self.memory = MemoryMeter(self.model, self.optimizer, self.device)  # before the restore, which it measures
        self.restore_memory = resume.restore_trainer(self, saved_state, data_states) if self.resume_dir else {}
        if self.env.is_main:
            storage.warn_if_too_small(self.checkpoint_root, cfg, self.model_config, self.model, self.dtype)

    # --- construction --------------------------------------------------------------------------
    def _build_model(self) -> nn.Module:
        """Built on the meta device and filled on this rank's device (galore_train/initial_weights.py): no
        process holds the whole model on the host. Methods that rewrite layers from their weights (LoRA, ReLoRA,
        low-rank) and --int8-weights need values first; the plain model is filled after FSDP2 sharding, each
        rank writing only its shards (docs/distributed.md)."""
        cfg = self.cfg
        built_here = not cfg.init_from
        if built_here:
            model = meta_llama(self.model_config, self.dtype)
        else:
            model = load_pretrained_llama(cfg.init_from, self.model_config, self.dtype)
        fill_first = built_here and (self.method.changes_model or cfg.int8_weights)
        if fill_first:
            fill_weights(model, self.device, cfg.seed)
        model = stepping.quantize_targets(self.method.prepare(model, self.step), cfg)  # --int8-weights
        if cfg.activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # Sharded before it is filled (or, --init-from, moved layer by layer): no rank ever holds the whole
        # model on its device (--distributed fsdp under torchrun; otherwise as is).
        model = fsdp.shard_model(model.train(), cfg, self.env)
        if built_here and not fill_first:
            fill_weights(model, self.device, cfg.seed)
        return model.to(self.device)

    def _build_optimizer(self, start_step: int = 0) -> None:
        """Optimizer, LR schedule (starting at `start_step`), how updates reach the weights, and the module
        that forward and backward run through (DDP-wrapped under torchrun, compiled with --compile).

        `self.model` stays the plain module: optimizers, methods and checkpoints see its parameter names.
        """
        cfg = self.cfg
        name = resolve_optimizer_name(self.method.optimizer_name(), cfg.eightbit)
        self.optimizer = build_optimizer(self.model, cfg.replace(optimizer=name))
        distributed.share_projection_refresh(self.optimizer, cfg, self.env)
        self.scheduler = build_scheduler(
            self.optimizer,
            kind=cfg.scheduler,
            total_steps=self.plan.total_steps,
            warmup_steps=self.plan.warmup_steps,
            min_ratio=cfg.min_lr_ratio,
            start_step=start_step,
            **scheduler_kwargs(cfg),
        )
        # DDP-wrapped under torchrun; with --layerwise the optimizer steps inside backward, from gradient hooks.
        module, self.updates = wrap_with_updates(self.model, self.optimizer, name, cfg, self.env, self.rounded)
        self.train_model = torch.compile(module) if cfg.compile else module

    def _rebuild_optimizer(self) -> None:
        """The trainable parameter set changed (ReLoRA warm start ended): new optimizer, same schedule step."""
        self.updates.close()
        self._build_optimizer(start_step=self.step)
        self.memory.remove()
        self.memory = MemoryMeter(self.model, self.optimizer, self.device)

    # --- checkpoints ---------------------------------------------------------------------------
    def save(self) -> Path:
        """Write a checkpoint (collective under torchrun: every rank calls it; rank 0 writes).

        Never saves non-finite weights: a checkpoint is what a stopped run resumes from."""
        if not distributed.all_finite(self.model.parameters(), self.env):
            self._stop_without_saving("the weights are no longer finite")
        # Each rank's stream position and random state, to rank 0 (the writer) only.
        per_rank = distributed.gather_to_main((self.train_stream.state_dict(), resume.rng_state(self.device)), self.env)
        weights = fsdp.full_model_state(self.model) or export.dequantized_state(self.model)  # on the CPU, or None
        trainer_state = {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "guard": self.guard.state_dict(),
            "optimizer": fsdp.optimizer_state_dict(self.model, self.optimizer),
            "scheduler": self.scheduler.state_dict(),
            "rounding": self.rounded and self.rounded.state_dict(),
        }
        if self.method.changes_model:
            trainer_state["method"] = self.method.state_dict()
            trainer_state["model"] = self.model.state_dict()  # wrapped weights (adapters); the folder holds merged ones

        def write(directory: Path) -> None:  # rank 0 only
            trainer_state["rng"] = {"by_rank": [rng for _, rng in per_rank]}
            self.method.merged_model(self.model).save_pretrained(directory, state_dict=weights)
            export.save_int8_state(self.model, directory)  # the exact codes, for resuming
            self.cfg.save(str(directory / "train_config.json"))
            checkpoint.save_trainer_state(directory, trainer_state, [data for data, _ in per_rank])

        return storage.save_or_stop(self.checkpoint_root, self.step, write, self.cfg.keep_last, self.env)

    def _stop_without_saving(self, reason: str) -> None:
        latest = checkpoint.latest_checkpoint(self.checkpoint_root)
        last_good = f"last good checkpoint: {latest}" if latest else "no checkpoint was saved"
        raise TrainingStopped(f"{reason} after step {self.step}: not saved; {last_good}", 3)

    # --- one optimizer step --------------------------------------------------------------------
    def _train_step(self) -> dict[str, Any]:
        batches = [self.train_stream.next_batch() for _ in range(self.plan.accumulation)]
        # Counted on the host copies (numpy: no device read); one all-reduce per step.
        targets = [target_count(b) for b in batches]
        local_tokens = sum(int(b["attention_mask"].numpy().sum()) for b in batches)
        global_targets, global_tokens = distributed.all_reduce_sum([float(sum(targets)), float(local_tokens)], self.env)
        # Per-rank scale so that DDP's gradient average equals the gradient of the global token mean.
        loss_scale = self.env.world_size / max(global_targets, 1.0)
        lr = self.optimizer.param_groups[0]["lr"]  # what this step uses (the schedule steps after the update)
        self.updates.take_first_bases(lambda: self._replay(batches, loss_scale), len(batches))  # step 0's projections

        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)  # on the device: no read per micro-batch
        for index, (batch, count) in enumerate(zip(batches, targets)):
            last = index == len(batches) - 1
            with self._accumulation_context(last):
                loss = summed_loss(self.train_model, to_device(batch, self.device))
                if self.updates.applies_in_backward:  # layer-wise: this backward may update the weights, so check first
                    micro_loss = loss.item() / max(count, 1)
                    reason = self.guard.reason_to_skip(micro_loss)
                    if distributed.any_rank(reason is not None, self.env):  # all ranks skip together, or none does
                        return self._skip_step(reason or "another process's loss was rejected", micro_loss)
                (loss * loss_scale).backward()
                loss_sum += loss.detach()

        (loss_total,) = distributed.all_reduce_sum([loss_sum.item()], self.env)
        step_loss = loss_total / max(global_targets, 1.0)  # the same on every rank: no vote needed
        reason = None if self.updates.applies_in_backward else self.guard.reason_to_skip(step_loss)
        if reason is not None:
            return self._skip_step(reason, step_loss)
        grad_norm = self.updates.finish()  # the same norm on every rank (gradients are reduced first)
        reason = self.guard.reason_to_skip_gradient(grad_norm)
        if reason is not None:
            return self._skip_step(reason, step_loss)
        self.scheduler.step()
        self.step += 1
        if self.method.after_optimizer_step(self.step, self.model, self.optimizer):
            self._rebuild_optimizer()
        self.tokens_seen += int(global_tokens)
        self.guard.accept(step_loss)
        return {"loss": step_loss, "grad_norm": grad_norm, "lr": lr, "step_tokens": int(global_tokens)}

    def _replay(self, batches: list[dict[str, Any]], loss_scale: float) -> None:
        """Forward and backward of the step's micro-batches once more: the updates see only gradients."""
        for batch in batches:
            (summed_loss(self.train_model, to_device(batch, self.device)) * loss_scale).backward()

    def _accumulation_context(self, last_micro_batch: bool):
        """Earlier micro-batches only accumulate: no DDP all-reduce, no layer-wise update."""
        return contextlib.nullcontext() if last_micro_batch else self.updates.accumulating()

    def _skip_step(self, reason: str, loss_value: float) -> dict[str, Any]:
        """A bad loss or gradient never reaches the weights: the guard stops the run or this step's update
        is dropped. A skipped step still counts (schedule and token budget stay aligned); its data is not
        replayed."""
        self.updates.abandon()
        lr = self.optimizer.param_groups[0]["lr"]
        latest = checkpoint.latest_checkpoint(self.checkpoint_root)
        where = (
            f" at step {self.step + 1}; last good checkpoint: {latest}"
            if latest
            else f" at step {self.step + 1}; no checkpoint was saved yet"
        )
        self.guard.reject(reason, where)
        log.warning("skipping step %d: %s", self.step + 1, reason)
        self.scheduler.step()
        self.step += 1
        return {"loss": loss_value, "lr": lr, "skipped": True}

    # --- the run -------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg, plan = self.cfg, self.plan
        sink = MetricsSink(
            self.output_dir,
            enabled=self.env.is_main,
            total_steps=plan.total_steps,
            config=cfg.to_dict(),
            wandb_mode=cfg.wandb_mode,
            project=cfg.wandb_project,
            run_name=self.run_name,
            tags=cfg.tags,
            resume_step=self.step if self.resume_dir is not None else None,
        )
        try:
            with StopRequest() as stop:
                return self._run(sink, stop)
        finally:
            self.train_stream.close()
            sink.close()
            distributed.teardown()

    def _run(self, sink: MetricsSink, stop: StopRequest) -> dict[str, Any]:
        cfg, plan = self.cfg, self.plan
        self._announce(sink)
        distributed.comm_metrics(self.step, self.model)  # count the gradient traffic from this step on
        if self.env.is_main:  # the resolved configuration, readable before the first checkpoint exists
            cfg.save(str(self.output_dir / "train_config.json"))
        if self.restore_memory:
            sink.log({"step": self.step, **self.restore_memory})
        if self.step == 0:
            with self.memory.excluded():
                sink.log(
                    {
                        "step": 0,
                        "tokens_seen": 0,
                        **evaluate(self.train_model, self.eval_batches, self.device, self.env),
                    }
                )
        window_start, window_tokens = time.perf_counter(), 0
        last_eval: dict[str, Any] = {}
        while self.step < plan.total_steps:
            with self.memory.track():
                record = self._train_step()
            record["data_wait_seconds"] = self.train_stream.take_wait_seconds()
            window_tokens += record.get("step_tokens", 0)
            if self.step % cfg.log_every == 0 or self.step == plan.total_steps:
                elapsed = time.perf_counter() - window_start
                record.update(
                    step=self.step,
                    tokens_seen=self.tokens_seen,
                    tokens_per_second=window_tokens / max(elapsed, 1e-9),
                    epoch=self.train_stream.epoch,
                    skipped_steps=self.guard.total_skips,
                    **self.memory.read_and_reset(),
                )
                if hasattr(self.optimizer, "svd_metrics"):  # GaLore: time in SVD, refreshes, failures
                    record.update(self.optimizer.svd_metrics())
                record.update(distributed.rank_metrics(record, self.env))
                record.update(distributed.comm_metrics(self.step, self.model))  # bytes sent per step
                sink.log(record)
                sink.progress(self.step, f"loss {record['loss']:.3f}  {record['tokens_per_second']:,.0f} tok/s")
                window_start, window_tokens = time.perf_counter(), 0
            if self.step % cfg.eval_every == 0 or self.step == plan.total_steps:
                with self.memory.excluded():  # nor is its memory a training step's
                    last_eval = evaluate(self.train_model, self.eval_batches, self.device, self.env)
                sink.log({"step": self.step, "tokens_seen": self.tokens_seen, **last_eval})
                sink.print(
                    f"step {self.step}: val loss {last_eval['val_loss']:.4f}, perplexity"
                    f" {last_eval['val_perplexity']:.2f}"
                )
                window_start = time.perf_counter()  # eval time is not training throughput
            if self.step % cfg.save_every == 0 or self.step == plan.total_steps:
                self.save()
                window_start = time.perf_counter()
            if distributed.any_rank(stop.signum is not None, self.env):  # all ranks stop after the same step
                saved = self.save()
                signum = stop.signum or signal.SIGTERM  # a rank the signal has not reached yet
                raise TrainingStopped(
                    f"{signal.Signals(signum).name}: stopped after step {self.step}; checkpoint saved to {saved}"
                    " (continue with --resume)",
                    128 + signum,
                )
        summary = {
            "run_name": self.run_name,
            "model": cfg.model,
            "optimizer": cfg.optimizer,
            "dtype": dtype_name(self.dtype),
            "steps": self.step,
            "tokens_seen": self.tokens_seen,
            "epochs": self.train_stream.epoch,
            "skipped_steps": self.guard.total_skips,
            "bad_data_lines": BAD_LINES.count,
            "remapped_token_ids": self.tokenize.remapped_ids,
            **last_eval,
        }
        sink.write_summary(summary)
        return summary

    def _announce(self, sink: MetricsSink) -> None:
        plan = self.plan
        parameters = sum(p.numel() for p in self.model.parameters())
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        where = f"resuming from {self.resume_dir} at step {self.step}" if self.resume_dir else "starting from scratch"
        sink.print(
            f"[bold]{self.run_name}[/bold]: {self.cfg.model} ({parameters / 1e6:.1f}M parameters,"
            f" {trainable / 1e6:.1f}M trainable), {self.cfg.optimizer}, {plan.total_steps} steps x"
            f" {plan.total_batch_size} sequences of {self.cfg.max_length} "
            f"(accumulation {plan.accumulation}, {self.env.world_size} process(es)), {self.dtype}, {self.device}; "
            f"validation on {self.eval_tokens:,} tokens; {where}; output in {self.output_dir}"
        )
        defaults = TrainConfig()
        chosen = {k: v for k, v in self.cfg.to_dict().items() if v != getattr(defaults, k)}
        if (used := OPTIMIZERS[self.cfg.optimizer].rank_used(self.cfg.rank)) != self.cfg.rank:  # APOLLO-Mini
            chosen["rank"] = f"{used} ({self.cfg.optimizer}'s own; --rank {self.cfg.rank} does not apply)"
        sink.print("resolved configuration (non-default values): " + ", ".join(f"{k}={v}" for k, v in chosen.items()))
