"""The LoRA fine-tuning recipe: setup -> evaluate -> train -> evaluate -> save, read top to bottom."""

from __future__ import annotations

import getpass
import logging
import math
import socket
import sys
import time
from pathlib import Path

import hydra
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from medlora import batching, fast
from medlora.adapters import add_adapter
from medlora.audit import AuditTrail
from medlora.checkpoint import (
    Checkpoints,
    Stopped,
    StopSignals,
    config_hash,
    load_checkpoint,
    mark,
    resume_point,
    save_adapter,
)
from medlora.cli import RunInfo
from medlora.config import MedloraError, resolve_device, resolve_precision, validate
from medlora.data import load_splits
from medlora.fast import attention, compat
from medlora.fast.prefix import run_prefix
from medlora.files import folder_hashes
from medlora.loss import loss_sum, mean_loss
from medlora.model import load_model, load_tokenizer, resolve_checkpoint
from medlora.prepare import audit_data, prepare_data
from medlora.tracking import Tracker, git_commit

log = logging.getLogger(__name__)


def run(cfg: DictConfig, info: RunInfo, conversations: tuple[list, list] | None = None) -> float:
    """Fine-tune one adapter; return the metric named by `optimized_metric` (what sweepers optimise).

    `conversations`: (train, eval) as medlora.data.load_splits gives them, where the caller has
    read them already.
    """
    recipe = LoraRecipe(cfg, info)
    try:
        recipe.setup(conversations)
        if recipe.start_step == 0:  # a resumed run measured its start before it stopped
            recipe.evaluate("before")
        recipe.train()
        recipe.evaluate("after")
        recipe.save_adapter()
    except Stopped as stop:
        recipe.cleanup(stop)
        log.warning("%s", stop)
        sys.exit(128 + stop.signum)  # the shell's code for a process a signal ended
    except BaseException as err:
        recipe.cleanup(err)
        raise
    recipe.cleanup()
    return recipe.optimized_metric()


class LoraRecipe:
    """One LoRA (or QLoRA, DoRA, ...) fine-tuning run of a causal LM, from config to saved adapter.

    Features, each with what it costs (measured in bench/results/train_throughput.md):
    - Everything that can reject the input (config values, data files, chat template) runs
      before the model loads, so a bad value costs seconds, not a model load.
    - Cleaned and tokenized data is cached by everything that shapes it (medlora.prepare); a
      sweep cleans once. Costs disk under paths.cache_dir.
    - Gradient accumulation is written out: every supervised token of an optimizer step weighs
      the same whichever micro-batch holds it, so batch_size and gradient_accumulation_steps trade
      memory for nothing else.
    - Packing with a shared prefix (training.shared_prefix): the system prompt every conversation
      begins with is computed once per row or per optimizer step. Same logits and gradients, but
      the prefix's LoRA dropout mask is drawn once per step or row instead of once per conversation.
    - The chunked loss (training.chunked_loss) runs the LM head only where a label exists: less
      time and memory, the same cross-entropy; models with a logit transform use their own loss.
    - The speed path (medlora.fast: attention per packed conversation, fused LoRA layers, fast
      dropout, the chunked loss, the shared prefix) is applied once in setup: less time and memory
      for the same maths. What actually ran, and why a trick did not where a model cannot take it,
      is self.applied, logged as resolved_* params.
    - Mixed precision through accelerate (precision); LoRA weights stay fp32.
    - Checkpoints every training.save_every steps or save_every_minutes, whichever comes first,
      resume exactly (weights, optimizer, scheduler, every RNG, the sampler's place) into the same
      run folder, audit trail and MLflow run; SIGTERM / Ctrl-C save one at the next step boundary
      (medlora.checkpoint). Each costs about three times the adapter on disk and a moment's write.
    - MLflow tracking and a hash-chained audit trail of data, redaction, evals and outputs.
    """

    def __init__(self, cfg: DictConfig, info: RunInfo):
        self.cfg, self.info = cfg, info
        self.config_hash = config_hash(cfg)
        # before the tracker starts: a resumed run goes on in its own MLflow run
        self.resume, self.run_dir = resume_point(cfg.training, cfg.tracking.uri, info, self.config_hash)
        self.checkpoints = Checkpoints.of(self.run_dir, cfg.training)
        self.tracker = Tracker(cfg, self.run_dir)
        if info.sweep_dir:
            # a sweep records every job under its parent, one that fails on a bad value too
            self._start_tracker()
        self.step = self.start_step = self.total_steps = 0
        self.last_eval: tuple[int, float] | None = None  # (step, eval loss): a checkpoint's score for keeping
        self.final: dict[str, float] = {}  # the metrics of the finished run, optimized_metric among them

    def _start_tracker(self) -> None:
        resumed = self.resume.state.get("run_id") if self.resume else None
        self.tracker.start(self.info.sweep_dir, list(self.info.overrides), resume_run_id=resumed)

    # --- setup -------------------------------------------------------------------------------

    def setup(self, conversations: tuple[list, list] | None = None) -> None:
        cfg = self.cfg
        validate(cfg)
        self.device = resolve_device(cfg.device)
        self.precision = resolve_precision(cfg.precision, self.device)
        set_seed(cfg.seed)
        train_convs, eval_convs = conversations or load_splits(cfg.data, cfg.seed)
        model_path, tokenizer_path = resolve_checkpoint(cfg.model, cfg.paths.cache_dir, cfg.seed)
        self.tokenizer = load_tokenizer(tokenizer_path, cfg.model.trust_remote_code)
        self.data = prepare_data(cfg, self.tokenizer, train_convs, eval_convs)
        self._setup_tracking()
        self._setup_model(model_path)
        self._setup_loaders()
        self._setup_optimizer()
        if self.resume:
            state = load_checkpoint(self.resume.checkpoint, self.model, self.optimizer, self.scheduler)
            self.start_step = state["step"]
            self.audit.record(
                "resume",
                inputs=folder_hashes(self.resume.checkpoint),
                step=self.start_step,
                checkpoint=str(self.resume.checkpoint),
            )
        self.step = self.start_step
        mark(self.run_dir, "running", step=self.step)
        self.audit.record(
            "train_start",
            counts={
                "trainable_params": self.trainable,
                "total_params": self.total,
                "train_examples": len(self.data.train_set),
                "total_steps": self.total_steps,
            },
            start_step=self.start_step,
            **({"resumed_from": str(self.resume.checkpoint)} if self.resume else {}),
        )

    def _setup_tracking(self) -> None:
        cfg, tracker = self.cfg, self.tracker
        if tracker.run_id is None:
            self._start_tracker()
        if tracker.url:
            log.info("MLflow run: %s  (open it with `make ui`)", tracker.url)
        tracker.set_tags({"device": self.device, "precision": self.precision, "medlora.run_dir": str(self.run_dir)})
        tracker.log_metrics(self.data.metrics(), step=0)
        # a resumed run appends to its own trail, whose chain continues
        self.audit = AuditTrail(
            self.run_dir / "audit.jsonl",
            actor=f"{getpass.getuser()}@{socket.gethostname()}",
            run_id=tracker.run_id or self.run_dir.name,
            config_hash=self.config_hash,
            git_commit=git_commit(cfg.paths.root_dir),
        )
        if not self.resume:  # the data a resumed run trains on is recorded already, by hash
            audit_data(self.audit, cfg, self.data)

    def _setup_model(self, model_path: str) -> None:
        t = self.cfg.training
        compat.reset_accelerator_state()  # a sweep's jobs in one process: each its own precision
        self.accelerator = Accelerator(
            cpu=self.device == "cpu", mixed_precision="no" if self.precision == "fp32" else self.precision
        )
        model = load_model(
            model_path,
            self.cfg.model,
            self.precision,
            str(self.accelerator.device),
            attn_implementation=attention.implementation(self.cfg.model.attn_implementation, t.packing),
        )
        self.model, self.trainable, self.total = add_adapter(model, self.cfg.lora, t.gradient_checkpointing)
        # what ran, not what was asked, decides the loaders, the loss and the step strategy
        self.applied = fast.apply(self.model, t, precision=self.precision)
        # chosen once: the loop itself has no prefix branches
        self._backward = (
            self._backward_with_step_prefix if self.applied.shared_prefix == "step" else self._backward_plain
        )
        self.tracker.log_params(
            {
                "trainable_params": self.trainable,
                "total_params": self.total,
                "trainable_percent": f"{100 * self.trainable / self.total:.4f}",
                "resolved_precision": self.precision,
                "resolved_device": self.device,
                **self.applied.params(),
            }
        )

    def _setup_loaders(self) -> None:
        t, share = self.cfg.training, self.applied.shared_prefix != "off"
        self.train_loader, self.eval_loader = batching.loaders(
            self.data, t, self.tokenizer.pad_token_id, self.cfg.seed, share
        )
        steps_per_epoch = math.ceil(len(self.train_loader) / t.gradient_accumulation_steps)
        self.total_steps = t.max_steps if t.max_steps > 0 else steps_per_epoch * t.num_epochs

    def _setup_optimizer(self) -> None:
        t = self.cfg.training
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = hydra.utils.instantiate(t.optimizer)(self.params)
        scheduler = hydra.utils.instantiate(t.scheduler)(
            optimizer=optimizer,
            num_warmup_steps=math.ceil(t.warmup_ratio * self.total_steps),
            num_training_steps=self.total_steps,
        )
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(self.model, optimizer, scheduler)

    # --- train and evaluate ------------------------------------------------------------------

    def evaluate(self, stage: str) -> dict[str, float]:
        """Eval loss and perplexity; `stage` is before or after training, or a step in between."""
        scores = mean_loss(self.model, self.eval_loader, self.accelerator, self.applied.chunked_loss)
        log.info(
            "%s: eval loss %.4f, perplexity %.2f",
            {"before": "before training", "after": "after training"}.get(stage, stage),
            scores["eval_loss"],
            scores["eval_perplexity"],
        )
        if stage == "before":
            self.tracker.log_metrics({f"{k}_before": v for k, v in scores.items()}, step=self.step)
        else:
            self.tracker.log_metrics(scores, step=self.step)
        if stage == "after":
            self.final.update(scores)
        self.last_eval = (self.step, scores["eval_loss"])
        self.audit.record("eval", counts=scores, step=self.step)
        return scores

    def train(self) -> None:
        """Optimizer steps to total_steps; throughput counts the steps alone, evals and checkpoints excluded."""
        t = self.cfg.training
        accum = t.gradient_accumulation_steps
        # place the sampler where the checkpoint left off, so a resumed run sees the same batches
        consumed = self.start_step * accum
        self.train_loader.batch_sampler.epoch = consumed // len(self.train_loader)
        micro_batches = batching.endless(self.train_loader, skip=consumed % len(self.train_loader))
        throughput = batching.Throughput()
        bar = tqdm(
            total=self.total_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True, mininterval=1.0
        )
        self.model.train()
        with StopSignals() as stop:
            while self.step < self.total_steps:
                self._train_step(micro_batches, throughput, bar)
                if self.checkpoints.due(self.step) or stop.received:
                    checkpoint = self.save_checkpoint()
                    if stop.received:
                        bar.close()
                        raise Stopped(stop.received, self.step, checkpoint)
        bar.close()
        speed = throughput.summary()
        log.info(
            "throughput: %.1f tokens/s (%.1f supervised) over %d steps; a shared prefix spared computing "
            "%.1f%% of the tokens",
            speed["train_tokens_per_second"],
            speed["train_supervised_tokens_per_second"],
            self.total_steps - self.start_step,
            100 * speed["train_shared_prefix_fraction"],
        )
        if self.device.startswith("cuda"):
            speed["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
        self.tracker.log_metrics(speed, step=self.step)
        self.final.update(speed)

    def _train_step(self, micro_batches, throughput: batching.Throughput, bar) -> None:
        """One optimizer step, its metrics logged, and an eval where training.eval_every falls."""
        t = self.cfg.training
        started = time.perf_counter()
        window = [
            batching.to_device(next(micro_batches), self.accelerator.device)
            for _ in range(t.gradient_accumulation_steps)
        ]
        metrics, tokens, supervised, spared = self._step(window)
        seconds = time.perf_counter() - started
        throughput.add(tokens, supervised, seconds, spared)
        metrics.update(tokens_per_second=tokens / seconds, supervised_tokens_per_second=supervised / seconds)
        bar.update(1)
        bar.set_postfix(
            loss=f"{metrics['train_loss']:.4f}",
            lr=f"{metrics['learning_rate']:.2e}",
            tok_s=f"{metrics['tokens_per_second']:.0f}",
        )
        if t.log_every and self.step % t.log_every == 0:
            self.tracker.log_metrics(metrics, self.step)
        if t.eval_every and self.step % t.eval_every == 0 and self.step < self.total_steps:
            self.evaluate(f"step {self.step}")

    def _step(self, window: list[dict]) -> tuple[dict[str, float], int, int, int]:
        """One optimizer step over `window`'s micro-batches: (metrics, tokens, supervised tokens, tokens spared)."""
        # every supervised token of the optimizer step weighs the same, whichever micro-batch holds it
        supervised = sum(batching.supervised_tokens(batch) for batch in window)
        tokens = sum(batching.real_tokens(batch) for batch in window)
        loss_total, spared = self._backward(window, supervised)
        # with max_grad_norm=0 the norm is still measured and logged, just not clipped
        grad_norm = self.accelerator.clip_grad_norm_(self.params, self.cfg.training.max_grad_norm or float("inf"))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad()
        self.step += 1
        metrics = {
            "train_loss": loss_total / supervised,
            "learning_rate": self.scheduler.get_last_lr()[0],
            "grad_norm": float(grad_norm),
        }
        return metrics, tokens, supervised, spared

    def _backward_plain(self, window: list[dict], supervised: int) -> tuple[float, int]:
        """Each micro-batch forward and backward; (summed loss, shared-prefix tokens the rows did not recompute)."""
        loss_total = 0.0
        for batch in window:
            # autocast is explicit: the chunked loss calls the decoder, not the wrapped model forward
            with self.accelerator.autocast():
                summed, _ = loss_sum(self.model, batch, self.applied.chunked_loss)
            self.accelerator.backward(summed / supervised)
            loss_total += summed.item()
        return loss_total, sum(batching.shared_tokens(batch) for batch in window)

    def _backward_with_step_prefix(self, window: list[dict], supervised: int) -> tuple[float, int]:
        """The prefix the step's conversations share runs once (medlora.fast.prefix), then the rows without it."""
        with self.accelerator.autocast():
            prefix, window = run_prefix(self.model, window)
        loss_total, spared = self._backward_plain(window, supervised)
        if prefix is None:
            return loss_total, spared
        prefix.backward()  # what every row sent to the system prompt, back through it once
        return loss_total, spared - prefix.length

    # --- save and finish ---------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """The whole training state at this step; older ones beyond training.keep_checkpoints go."""
        scored = self.last_eval is not None and self.last_eval[0] == self.step
        state = {
            "step": self.step,
            "total_steps": self.total_steps,
            "config_hash": self.config_hash,
            "run_id": self.tracker.run_id,
            "audit_head": self.audit.head,
            "eval_loss": self.last_eval[1] if scored else None,
        }
        # first: once the checkpoint exists no step before it runs again, so no write before it may be lost
        self.tracker.persist()
        saved = self.checkpoints.save(self.accelerator.unwrap_model(self.model), self.optimizer, self.scheduler, state)
        self.audit.record("checkpoint", outputs=folder_hashes(saved), step=self.step)
        return saved

    def save_adapter(self) -> Path:
        """The adapter, its evaluation where adapter_eval names one, the audit record and the artifacts."""
        cfg, tracker = self.cfg, self.tracker
        self.audit.record("train_end", step=self.step)
        adapter_dir = save_adapter(self.accelerator.unwrap_model(self.model), self.tokenizer, self.run_dir / "adapter")
        log.info("adapter saved to %s", adapter_dir)
        if cfg.adapter_eval is not None:
            # before the adapter's hashes are recorded and it is logged: the evaluation may write beside it
            scores = hydra.utils.instantiate(cfg.adapter_eval)(adapter_dir=adapter_dir, cfg=cfg)
            tracker.log_metrics(scores, step=self.step)
            self.audit.record("eval", counts=scores, step=self.step, kind="adapter_eval")
            self.final.update(scores)
        self.audit.record("adapter_export", outputs=folder_hashes(adapter_dir))
        tracker.set_tags({"audit_head": self.audit.head})
        resolved = self.run_dir / "config_resolved.yaml"
        resolved.write_text(OmegaConf.to_yaml(cfg, resolve=True))
        tracker.log_artifact(resolved)
        if cfg.tracking.log_adapter:
            tracker.log_artifact(adapter_dir, "adapter")
        for handler in logging.getLogger().handlers:
            handler.flush()
        for log_file in [*self.info.output_dir.glob("*.log"), self.run_dir / "audit.jsonl"]:
            tracker.log_artifact(log_file)
        return adapter_dir

    def cleanup(self, error: BaseException | None = None) -> None:
        """Close the MLflow run: FINISHED, KILLED by a signal, or FAILED with the error that stopped it
        (Tracker.finish never raises, so a store that fails now cannot put its error in the place of `error`)."""
        mark(self.run_dir, error, step=self.step)
        if error is None:
            self.tracker.finish()
        elif isinstance(error, Stopped):
            self.tracker.finish("KILLED", error=str(error))
        else:
            self.tracker.finish("FAILED", error=f"{type(error).__name__}: {error}")
        if self.tracker.url and error is None:
            log.info("MLflow run: %s", self.tracker.url)

    def optimized_metric(self) -> float:
        name = self.cfg.optimized_metric
        if name not in self.final:
            raise MedloraError(
                f"optimized_metric={name} was not measured by this run: use one of {', '.join(sorted(self.final))}."
            )
        return float(self.final[name])
