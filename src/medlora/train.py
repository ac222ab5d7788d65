"""The LoRA fine-tuning recipe: setup -> evaluate -> train -> evaluate -> save, read top to bottom."""

from __future__ import annotations

import getpass
import json
import logging
import math
import socket
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
from medlora.checkpoint import load_checkpoint, save_adapter, save_checkpoint
from medlora.cli import RunInfo
from medlora.config import MedloraError, resolve_device, resolve_precision, validate
from medlora.data import load_splits
from medlora.fast import attention, compat
from medlora.fast.prefix import run_prefix
from medlora.files import folder_hashes, sha256_text
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
        recipe.evaluate("before")
        recipe.train()
        recipe.evaluate("after")
        recipe.save_adapter()
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
    - Checkpoints every training.save_every steps resume exactly: weights, optimizer, scheduler,
      RNG and the sampler's place (medlora.checkpoint).
    - MLflow tracking and a hash-chained audit trail of data, redaction, evals and outputs.
    """

    def __init__(self, cfg: DictConfig, info: RunInfo):
        self.cfg, self.info = cfg, info
        self.tracker = Tracker(cfg)
        if info.sweep_dir:
            # a sweep records every job under its parent, one that fails on a bad value too
            self.tracker.start(info.sweep_dir, list(info.overrides))
        self.step = self.start_step = self.total_steps = 0
        self.final: dict[str, float] = {}  # the metrics of the finished run, optimized_metric among them

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
        if cfg.training.resume_from:
            self.start_step = load_checkpoint(cfg.training.resume_from, self.model, self.optimizer, self.scheduler)
        self.step = self.start_step
        self.audit.record(
            "train_start",
            counts={
                "trainable_params": self.trainable,
                "total_params": self.total,
                "train_examples": len(self.data.train_set),
                "total_steps": self.total_steps,
            },
            start_step=self.start_step,
            **({"resumed_from": str(cfg.training.resume_from)} if cfg.training.resume_from else {}),
        )

    def _setup_tracking(self) -> None:
        cfg, info, tracker = self.cfg, self.info, self.tracker
        if tracker.run_id is None:
            tracker.start(info.sweep_dir, list(info.overrides))
        if tracker.url:
            log.info("MLflow run: %s  (open it with `make ui`)", tracker.url)
        tracker.set_tags({"device": self.device, "precision": self.precision})
        tracker.log_metrics(self.data.metrics(), step=0)
        # the hash names the training setup: paths and tracking differ per run without changing it
        setup = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in ("paths", "tracking")}
        self.audit = AuditTrail(
            info.output_dir / "audit.jsonl",
            actor=f"{getpass.getuser()}@{socket.gethostname()}",
            run_id=tracker.run_id or info.output_dir.name,
            config_hash=sha256_text(json.dumps(setup, sort_keys=True)),
            git_commit=git_commit(cfg.paths.root_dir),
        )
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
        t, seed = self.cfg.training, self.cfg.seed
        pad_id, packed_tokens = self.tokenizer.pad_token_id, t.batch_size * t.max_seq_len if t.packing else 0
        share = self.applied.shared_prefix != "off"
        self.train_loader = batching.make_loader(
            self.data.train_set,
            t.batch_size,
            pad_id,
            seed,
            train=True,
            group_by_length=t.group_by_length,
            packed_tokens=packed_tokens,
            share_prefix=share,
        )
        self.eval_loader = batching.make_loader(
            self.data.eval_set, t.batch_size, pad_id, seed, train=False, packed_tokens=packed_tokens, share_prefix=share
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
        while self.step < self.total_steps:
            started = time.perf_counter()
            window = [batching.to_device(next(micro_batches), self.accelerator.device) for _ in range(accum)]
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
            if t.save_every and self.step % t.save_every == 0:
                self.save_checkpoint()
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
        folder = save_checkpoint(
            self.accelerator.unwrap_model(self.model),
            self.optimizer,
            self.scheduler,
            self.info.output_dir / "checkpoints" / f"step_{self.step}",
            self.step,
        )
        self.audit.record("checkpoint", outputs=folder_hashes(folder), step=self.step)
        return folder

    def save_adapter(self) -> Path:
        """The adapter, its evaluation where adapter_eval names one, the audit record and the artifacts."""
        cfg, tracker = self.cfg, self.tracker
        self.audit.record("train_end", step=self.step)
        adapter_dir = save_adapter(
            self.accelerator.unwrap_model(self.model), self.tokenizer, self.info.output_dir / "adapter"
        )
        log.info("adapter saved to %s", adapter_dir)
        if cfg.adapter_eval is not None:
            # before the adapter's hashes are recorded and it is logged: the evaluation may write beside it
            scores = hydra.utils.instantiate(cfg.adapter_eval)(adapter_dir=adapter_dir, cfg=cfg)
            tracker.log_metrics(scores, step=self.step)
            self.audit.record("eval", counts=scores, step=self.step, kind="adapter_eval")
            self.final.update(scores)
        self.audit.record("adapter_export", outputs=folder_hashes(adapter_dir))
        tracker.set_tags({"audit_head": self.audit.head})
        resolved = self.info.output_dir / "config_resolved.yaml"
        resolved.write_text(OmegaConf.to_yaml(cfg, resolve=True))
        tracker.log_artifact(resolved)
        if cfg.tracking.log_adapter:
            tracker.log_artifact(adapter_dir, "adapter")
        for handler in logging.getLogger().handlers:
            handler.flush()
        for log_file in [*self.info.output_dir.glob("*.log"), self.info.output_dir / "audit.jsonl"]:
            tracker.log_artifact(log_file)
        return adapter_dir

    def cleanup(self, error: BaseException | None = None) -> None:
        """Close the MLflow run: FINISHED, or FAILED with the error that stopped it."""
        if error is None:
            self.tracker.finish()
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
