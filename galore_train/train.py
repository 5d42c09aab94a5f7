"""The training loop: micro-batches, accumulation, clipping, step, eval, save, resume.

`Trainer(cfg).run()` is the whole of `galore-train pretrain`. Components (data stream, optimizer,
schedule, method, layer-wise driver, metrics, checkpoints) are built by their own modules; this file
only drives them, so a reader can follow one optimizer step from top to bottom in `_train_step`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import LlamaConfig

from galore_train import checkpoint, distributed
from galore_train.config import TrainConfig, plan_steps
from galore_train.data import PretrainingStream, Tokenize, cached_eval_batches, document_source, eval_cache_key, load_tokenizer, BAD_LINES, pin_batches
from galore_train.errors import TrainingStopped, UserError
from galore_train.evaluate import evaluate, summed_loss
from galore_train.guard import LossGuard
from galore_train.memory import MemoryMeter
from galore_train.methods import METHOD_NAMES, base_optimizer_name, build_method, scheduler_kwargs
from galore_train.metrics import MetricsSink
from galore_train.model import architecture_differences, build_model, dtype_name, load_model_config, load_pretrained_llama, resolve_dtype
from galore_train.optim import build_optimizer, resolve_optimizer_name
from galore_train.optim.layerwise import LayerwiseUpdater
from galore_train.schedule import build_scheduler

log = logging.getLogger(__name__)


def default_run_name(cfg: TrainConfig) -> str:
    method = cfg.optimizer if cfg.optimizer in METHOD_NAMES else resolve_optimizer_name(cfg.optimizer, cfg.eightbit)
    return f"{Path(cfg.model).stem}-{method}-{datetime.now():%Y%m%d-%H%M%S}"


class StopRequest:
    """Turns SIGINT/SIGTERM into 'finish this step, save, exit'; a second signal stops at once."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


# --- the trainer ---------------------------------------------------------------------------------

def _built_optimizer(name: str, eightbit: bool) -> str:
    """What --optimizer NAME [--8bit] builds, so that two spellings of one optimizer compare equal."""
    try:
        return resolve_optimizer_name(name, eightbit)
    except UserError:  # a method (lora, relora, low_rank): its name and flag as given
        return f"{name} --8bit" if eightbit else name


class Trainer:
    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg.validate()
        self.env = distributed.setup()
        self.device = self.env.device
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        self.plan = plan_steps(cfg, self.env.world_size)
        self.run_name = cfg.run_name or default_run_name(cfg)
        self.output_dir = Path(cfg.output_dir or Path("runs") / self.run_name)
        self.checkpoint_root = self.output_dir / "checkpoints"
        self.model_config = load_model_config(cfg.model)
        self.resume_dir = self._find_resume_dir()
        if self.resume_dir is not None:
            self._check_resume_settings()

        tokenizer = load_tokenizer(cfg.tokenizer)
        self.tokenize = Tokenize(tokenizer, cfg.max_length, self.model_config.vocab_size)
        self.step = 0
        self.tokens_seen = 0
        self.guard = LossGuard(spike_threshold=cfg.spike_threshold, skip_nonfinite=cfg.skip_nonfinite, max_consecutive=cfg.max_spikes)
        if self.resume_dir is not None:
            trainer_state, data_states = checkpoint.load_trainer_state(self.resume_dir)
            self.step = trainer_state["step"]
        self.method = build_method(cfg)
        self.model = self._build_model()
        self.optimizer, self.scheduler, self.layerwise = self._build_optimizer()
        self.train_model = self._training_module()
        self.train_stream = PretrainingStream(
            lambda: document_source(cfg.data_files, "--data-files", cfg.dataset, cfg.dataset_config, "train", self.tokenize),
            self.tokenize, batch_size=cfg.batch_size, pack=cfg.pack, shuffle_buffer=cfg.shuffle_buffer,
            seed=cfg.seed, rank=self.env.rank, world_size=self.env.world_size,
            prefetch=2 * self.plan.accumulation, pin_memory=pin_batches(self.device),
        )
        eval_key = eval_cache_key(cfg.eval_data_files, f"{cfg.dataset}/{cfg.dataset_config}/validation", self.tokenize, cfg.eval_tokens)
        self.eval_batches, self.eval_tokens = cached_eval_batches(
            self.output_dir / "eval_cache", eval_key,
            lambda: document_source(cfg.eval_data_files, "--eval-data-files", cfg.dataset, cfg.dataset_config, "validation"),
            self.tokenize, batch_size=cfg.eval_batch_size or cfg.batch_size, builder=self.env.is_main,
            agree=lambda failed: distributed.any_rank(failed, self.env))
        self.eval_batches = distributed.lockstep_batches(self.eval_batches, self.model, self.env)
        if self.resume_dir is not None:
            self._restore(trainer_state, data_states)
        self.memory = MemoryMeter(self.model, self.optimizer, self.device)

    # --- construction --------------------------------------------------------------------------
    def _check_resume_settings(self) -> None:
        """Refuse settings the checkpoint's state cannot be loaded with; warn about ones that change the run."""
        saved_file = self.resume_dir / "train_config.json"
        if not saved_file.is_file():
            return
        cfg, saved = self.cfg, json.loads(saved_file.read_text())
        if _built_optimizer(saved["optimizer"], saved["eightbit"]) == _built_optimizer(cfg.optimizer, cfg.eightbit):
            saved.update(optimizer=cfg.optimizer, eightbit=cfg.eightbit)  # e.g. adamw --8bit == adam8bit
        built_differently = self._built_differently()
        if built_differently is not None:  # compared as built, not as spelled: llama_9m == configs/llama_9m.json
            saved.update(model=cfg.model, dtype=cfg.dtype)
        fatal, changed = cfg.resume_differences(saved)
        fatal = (built_differently or []) + fatal
        if fatal:
            recipe = f"; it was trained with --recipe {saved['recipe']}: pass it again" if saved.get("recipe") != cfg.recipe else ""
            raise UserError(f"cannot resume {self.resume_dir} with a different {'; '.join(fatal)} "
                            f"(its saved state was built for the old value{recipe}; or start a new run, with --init-from for the weights)")
        if changed:
            log.warning("resuming with settings changed since the checkpoint, so the run will differ from an "
                        "uninterrupted one: %s", "; ".join(changed))

    def _built_differently(self) -> Optional[list[str]]:
        """How the checkpoint's model (its config.json) differs from the one this run builds: architecture
        and dtype (`--dtype auto` resolves per device: a bf16 GPU checkpoint resumed on a CPU would be fp32).
        None if the checkpoint has no config.json to tell."""
        if not (self.resume_dir / "config.json").is_file():
            return None
        saved = LlamaConfig.from_pretrained(self.resume_dir)
        differences = [f"model: {name} {old} -> {new}" for name, old, new in architecture_differences(saved, self.model_config)]
        if saved.dtype != self.dtype:
            differences.append(f"dtype: {dtype_name(saved.dtype)} -> {dtype_name(self.dtype)}")
        return differences

    def _find_resume_dir(self) -> Optional[Path]:
        cfg = self.cfg
        if cfg.resume_from:
            path = Path(cfg.resume_from)
            if not (path / "trainer_state.pt").is_file():
                raise UserError(f"--resume-from {path} is not a galore-train checkpoint")
            return path
        holds_run = (self.output_dir / "metrics.jsonl").exists() or checkpoint.list_checkpoints(self.checkpoint_root)
        if cfg.resume:
            return checkpoint.latest_checkpoint(self.checkpoint_root)  # None: nothing saved yet, start fresh
        if holds_run:
            raise UserError(f"{self.output_dir} already holds a run: pass --resume to continue it, or choose another --output-dir")
        return None

    def _build_model(self) -> nn.Module:
        cfg = self.cfg
        if cfg.init_from:
            model = load_pretrained_llama(cfg.init_from, self.model_config, self.dtype)
        else:
            model = build_model(self.model_config, cfg.seed, self.dtype)
        if self.method is not None:
            model = self.method.prepare(model, self.step)
        if cfg.activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.to(self.device).train()
        return distributed.shard_model(model, cfg, self.env)  # FSDP2 under torchrun --distributed fsdp; else as is

    def _training_module(self) -> nn.Module:
        """What forward and backward run through: the model, DDP-wrapped under torchrun, compiled with --compile.

        `self.model` stays the plain module: optimizers, methods and checkpoints see its parameter names.
        """
        module = distributed.wrap_model(self.model, self.env)  # DDP under torchrun
        return torch.compile(module) if self.cfg.compile else module

    def _build_optimizer(self, start_step: int = 0):
        """Optimizer, LR schedule (starting at `start_step`) and, with --layerwise, its gradient hooks."""
        cfg = self.cfg
        name = base_optimizer_name(cfg) if self.method is not None else cfg.optimizer
        optimizer = build_optimizer(self.model, cfg.replace(optimizer=resolve_optimizer_name(name, cfg.eightbit)))
        scheduler = build_scheduler(optimizer, kind=cfg.scheduler, total_steps=self.plan.total_steps, warmup_steps=self.plan.warmup_steps,
                                    min_ratio=cfg.min_lr_ratio, start_step=start_step, **scheduler_kwargs(cfg))
        layerwise = LayerwiseUpdater(self.model, optimizer, grad_clipping=cfg.grad_clipping) if cfg.layerwise else None
        return optimizer, scheduler, layerwise

    def _rebuild_optimizer(self) -> None:
        """The trainable parameter set changed (ReLoRA warm start ended): new optimizer, same schedule step."""
        if self.layerwise is not None:
            self.layerwise.remove()
        self.optimizer, self.scheduler, self.layerwise = self._build_optimizer(start_step=self.step)
        self.train_model = self._training_module()
        self.memory.remove()
        self.memory = MemoryMeter(self.model, self.optimizer, self.device)

    # --- checkpoints ---------------------------------------------------------------------------
    def _trainer_state(self) -> dict[str, Any]:
        state = {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "guard": self.guard.state_dict(),
            "optimizer": distributed.optimizer_state_dict(self.model, self.optimizer),
            "scheduler": self.scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        }
        if self.method is not None:
            state["method"] = self.method.state_dict()
            state["model"] = self.model.state_dict()  # wrapped weights (adapters); the folder holds merged ones
        return state

    def save(self) -> Path:
        data_states = self._gather_data_states()
        # On every rank: under FSDP, gathering the full weights and optimizer state is collective.
        weights = distributed.full_model_state(self.model)
        trainer_state = self._trainer_state()
        if not self.env.is_main:
            return self.checkpoint_root

        def write(directory: Path) -> None:
            plain = self.method.merged_model(self.model) if self.method is not None else self.model
            plain.save_pretrained(directory, state_dict=weights)
            self.cfg.save(str(directory / "train_config.json"))
            checkpoint.save_trainer_state(directory, trainer_state, data_states)

        return checkpoint.save_checkpoint(self.checkpoint_root, self.step, write, self.cfg.keep_last)

    def _gather_data_states(self) -> list[dict[str, Any]]:
        state = self.train_stream.state_dict()
        if not self.env.enabled:
            return [state]
        gathered: list[Any] = [None] * self.env.world_size
        torch.distributed.all_gather_object(gathered, state)
        return gathered

    def _restore(self, state: dict[str, Any], data_states: list[dict[str, Any]]) -> None:
        if len(data_states) != self.env.world_size:
            raise UserError(f"checkpoint {self.resume_dir} was written by {len(data_states)} process(es); resume with the same number")
        if self.method is not None:
            self.model.load_state_dict(state["model"])
            self.method.load_state_dict(state["method"])
        else:
            distributed.load_model_state_dict(self.model, load_file(str(self.resume_dir / "model.safetensors"), device=str(self.device)))
        current = [{key: value for key, value in group.items() if key != "params"} for group in self.optimizer.param_groups]
        distributed.load_optimizer_state_dict(self.model, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self._keep_current_hyperparameters(current)
        torch.set_rng_state(state["rng"]["torch"])
        if torch.cuda.is_available() and state["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.tokens_seen = state["tokens_seen"]
        self.guard.load_state_dict(state["guard"])
        self.train_stream.load_state_dict(data_states[self.env.rank])

    def _keep_current_hyperparameters(self, current: list[dict[str, Any]]) -> None:
        """Loading optimizer and scheduler state also loads the checkpoint's hyperparameters (peak lr, betas,
        weight decay, GaLore's gap and scale, ...); put this run's back, so that a flag changed on resume (and
        warned about) takes effect. Unchanged flags give back the same values bit for bit."""
        groups = self.optimizer.param_groups
        for group, settings in zip(groups, current):
            group.update({key: value for key, value in settings.items() if key != "lr"})
        self.scheduler.base_lrs = [group["initial_lr"] for group in groups]
        for group, base, factor in zip(groups, self.scheduler.base_lrs, self.scheduler.lr_lambdas):
            group["lr"] = base * factor(self.scheduler.last_epoch)  # what LambdaLR.step() computes

    # --- one optimizer step --------------------------------------------------------------------
    def _train_step(self) -> dict[str, Any]:
        plan = self.plan
        micro_batches = [{k: v.to(self.device, non_blocking=True) for k, v in self.train_stream.next_batch().items()}
                         for _ in range(plan.accumulation)]
        local_targets = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro_batches)
        local_tokens = sum(int(b["attention_mask"].sum()) for b in micro_batches)
        global_targets, global_tokens = distributed.all_reduce_sum([float(local_targets), float(local_tokens)], self.env)
        # Per-rank scale so that DDP's gradient average equals the gradient of the global token mean.
        loss_scale = self.env.world_size / max(global_targets, 1.0)

        loss_sum = 0.0
        for index, batch in enumerate(micro_batches):
            last = index == len(micro_batches) - 1
            with self._accumulation_context(last):
                loss, targets = summed_loss(self.train_model, batch)
                loss_value = loss.item()
                reason = self.guard.reason_to_skip(loss_value / max(targets, 1))
                if distributed.any_rank(reason is not None, self.env):  # all ranks skip together, or none does
                    return self._skip_step(reason or "another process's loss was rejected", loss_value / max(targets, 1))
                (loss * loss_scale).backward()
                loss_sum += loss_value

        if self.layerwise is not None:  # parameters were updated during the last backward
            grad_norm = float(self.layerwise.pop_grad_norm())
        else:
            max_norm = self.cfg.grad_clipping if self.cfg.grad_clipping > 0 else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        if self.method is not None and self.method.after_optimizer_step(self.step, self.model, self.optimizer):
            self._rebuild_optimizer()
        (loss_sum,) = distributed.all_reduce_sum([loss_sum], self.env)
        self.tokens_seen += int(global_tokens)
        step_loss = loss_sum / max(global_targets, 1.0)
        self.guard.accept(step_loss)
        return {"loss": step_loss, "grad_norm": grad_norm, "step_tokens": int(global_tokens)}

    def _accumulation_context(self, last_micro_batch: bool):
        """Earlier micro-batches only accumulate: no DDP all-reduce, no layer-wise update."""
        if last_micro_batch:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        if self.layerwise is not None:
            stack.enter_context(self.layerwise.accumulating())
        stack.enter_context(distributed.no_sync(self.train_model))
        return stack

    def _skip_step(self, reason: str, loss_value: float) -> dict[str, Any]:
        """A bad loss never reaches the weights: the guard stops the run or this step's update is dropped.

        A skipped step still counts (schedule and token budget stay aligned); its data is not replayed.
        """
        self.optimizer.zero_grad(set_to_none=True)
        if self.layerwise is not None:
            self.layerwise.zero_grad()  # micro-batches the updater holds
        latest = checkpoint.latest_checkpoint(self.checkpoint_root)
        where = f" at step {self.step + 1}; last good checkpoint: {latest}" if latest else f" at step {self.step + 1}; no checkpoint was saved yet"
        self.guard.reject(reason, where)
        log.warning("skipping step %d: %s", self.step + 1, reason)
        self.scheduler.step()
        self.step += 1
        return {"loss": loss_value, "skipped": True}

    # --- the run -------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg, plan = self.cfg, self.plan
        sink = MetricsSink(self.output_dir, enabled=self.env.is_main, total_steps=plan.total_steps,
                           config=cfg.to_dict(), wandb_mode=cfg.wandb_mode, project=cfg.wandb_project,
                           run_name=self.run_name, tags=cfg.tags, resume=self.resume_dir is not None)
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
        if self.env.is_main:  # the resolved configuration, readable before the first checkpoint exists
            cfg.save(str(self.output_dir / "train_config.json"))
        if self.step == 0:
            sink.log({"step": 0, "tokens_seen": 0, **evaluate(self.train_model, self.eval_batches, self.device, self.env)})
        window_start, window_tokens = time.perf_counter(), 0
        last_eval: dict[str, Any] = {}
        while self.step < plan.total_steps:
            with self.memory.track():
                record = self._train_step()
            record["data_wait_seconds"] = self.train_stream.take_wait_seconds()
            window_tokens += record.get("step_tokens", 0)
            if self.step % cfg.log_every == 0 or self.step == plan.total_steps:
                elapsed = time.perf_counter() - window_start
                record.update(step=self.step, lr=self.scheduler.get_last_lr()[0], tokens_seen=self.tokens_seen,
                              tokens_per_second=window_tokens / max(elapsed, 1e-9), epoch=self.train_stream.epoch,
                              skipped_steps=self.guard.total_skips, **self.memory.read_and_reset())
                if hasattr(self.optimizer, "svd_metrics"):  # GaLore: time in SVD, refreshes, failures
                    record.update(self.optimizer.svd_metrics())
                record.update(distributed.rank_metrics(record, self.env))
                sink.log(record)
                sink.progress(self.step, f"loss {record['loss']:.3f}  {record['tokens_per_second']:,.0f} tok/s")
                window_start, window_tokens = time.perf_counter(), 0
            if self.step % cfg.eval_every == 0 or self.step == plan.total_steps:
                last_eval = evaluate(self.train_model, self.eval_batches, self.device, self.env)
                sink.log({"step": self.step, "tokens_seen": self.tokens_seen, **last_eval})
                sink.print(f"step {self.step}: val loss {last_eval['val_loss']:.4f}, perplexity {last_eval['val_perplexity']:.2f}")
                window_start = time.perf_counter()  # eval time is not training throughput
            if self.step % cfg.save_every == 0 or self.step == plan.total_steps:
                self.save()
                window_start = time.perf_counter()
            if distributed.any_rank(stop.signum is not None, self.env):  # all ranks stop after the same step
                saved = self.save()
                signum = stop.signum or signal.SIGTERM  # a rank the signal has not reached yet
                raise TrainingStopped(f"{signal.Signals(signum).name}: stopped after step {self.step}; checkpoint saved to {saved} (continue with --resume)", 128 + signum)
        summary = {"run_name": self.run_name, "model": cfg.model, "optimizer": cfg.optimizer, "dtype": dtype_name(self.dtype), "steps": self.step,
                   "tokens_seen": self.tokens_seen, "epochs": self.train_stream.epoch, "skipped_steps": self.guard.total_skips,
                   "bad_data_lines": BAD_LINES.count, "remapped_token_ids": self.tokenize.remapped_ids, **last_eval}
        sink.write_summary(summary)
        return summary

    def _announce(self, sink: MetricsSink) -> None:
        plan = self.plan
        parameters = sum(p.numel() for p in self.model.parameters())
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        where = f"resuming from {self.resume_dir} at step {self.step}" if self.resume_dir else "starting from scratch"
        sink.print(
            f"[bold]{self.run_name}[/bold]: {self.cfg.model} ({parameters / 1e6:.1f}M parameters, {trainable / 1e6:.1f}M trainable), "
            f"{self.cfg.optimizer}, {plan.total_steps} steps x {plan.total_batch_size} sequences of {self.cfg.max_length} "
            f"(accumulation {plan.accumulation}, {self.env.world_size} process(es)), {self.dtype}, {self.device}; "
            f"validation on {self.eval_tokens:,} tokens; {where}; output in {self.output_dir}")
        defaults = TrainConfig()
        chosen = {k: v for k, v in self.cfg.to_dict().items() if v != getattr(defaults, k)}
        sink.print("resolved configuration (non-default values): " + ", ".join(f"{k}={v}" for k, v in chosen.items()))
