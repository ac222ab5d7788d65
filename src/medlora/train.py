"""The training recipe: setup -> evaluate -> train -> evaluate -> save, read top to bottom."""

from __future__ import annotations

import getpass
import json
import logging
import math
import os
import pickle
import socket
import time
from pathlib import Path

import hydra
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from omegaconf import DictConfig, OmegaConf
from peft import set_peft_model_state_dict
from safetensors.torch import load_file
from tqdm.auto import tqdm
from transformers import get_scheduler

from medlora import allocator
from medlora import data as medata
from medlora import loss as medlora_loss
from medlora.adapters import add_adapter
from medlora.audit import AuditTrail, sha256_file, sha256_text
from medlora.cli import RunInfo
from medlora.config import MedloraError, resolve_device, resolve_precision, validate
from medlora.model import load_model, load_tokenizer, resolve_checkpoint, save_atomically
from medlora.prefix import run_prefix
from medlora.safety.clean import CleanReport, clean_conversations
from medlora.tracking import Tracker, git_commit

log = logging.getLogger(__name__)

# bump when cleaning or tokenization changes what they produce, so old cache entries are not reused
DATA_CACHE_VERSION = 2


def run(cfg: DictConfig, info: RunInfo, conversations: tuple[list, list] | None = None) -> float:
    """Fine-tune one adapter; return the final eval loss (what sweepers minimise).

    `conversations`: (train, eval) as medlora.data.load_splits gives them, where the caller has
    read them already.
    """
    tracker = Tracker(cfg)
    if info.sweep_dir:
        # a sweep records every job under its parent, one that fails on a bad value too
        tracker.start(info.sweep_dir, list(info.overrides))
    try:
        eval_loss = _prepare_and_fit(cfg, info, tracker, conversations)
    except BaseException as err:
        tracker.finish("FAILED", error=f"{type(err).__name__}: {err}")
        raise
    tracker.finish()
    if tracker.url:
        log.info("MLflow run: %s", tracker.url)
    return eval_loss


def _prepare_and_fit(cfg: DictConfig, info: RunInfo, tracker: Tracker, conversations: tuple | None) -> float:
    # everything that can reject the input runs before the model loads
    validate(cfg)
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    set_seed(cfg.seed)
    train_convs, eval_convs = conversations or medata.load_splits(cfg.data, cfg.seed)
    model_path, tokenizer_path = resolve_checkpoint(cfg.model, cfg.paths.cache_dir, cfg.seed)
    tokenizer = load_tokenizer(tokenizer_path, cfg.model.trust_remote_code)
    train_set, eval_set, token_stats, train_safety, eval_safety = _prepare_data(cfg, tokenizer, train_convs, eval_convs)

    if tracker.run_id is None:
        tracker.start(info.sweep_dir, list(info.overrides))
    if tracker.url:
        log.info("MLflow run: %s  (open it with `make ui`)", tracker.url)
    tracker.set_tags({"device": device, "precision": precision})
    tracker.log_metrics({**token_stats, **train_safety.metrics("train"), **eval_safety.metrics("eval")}, step=0)
    audit = _open_audit(cfg, info, tracker)
    _audit_data(audit, cfg, train_safety, eval_safety)
    return _fit(cfg, info, tracker, audit, device, precision, model_path, tokenizer, train_set, eval_set)


def _prepare_data(cfg: DictConfig, tokenizer, train_convs: list, eval_convs: list) -> tuple:
    """Clean and tokenize, or reuse the result of an earlier run that had the same inputs.

    PHI redaction and tokenization take about a minute on the 14k MedQuAD conversations; every
    job of a sweep over LoRA or optimizer settings would otherwise repeat it.
    """
    cached = Path(cfg.paths.cache_dir) / "data" / f"{_data_key(cfg, tokenizer)}.pkl"
    if cfg.training.cache_data and cached.is_file():
        log.info("cleaned and tokenized data reused from %s (training.cache_data=false rebuilds it)", cached)
        return pickle.loads(cached.read_bytes())
    train_convs, train_safety = _clean(train_convs, cfg.safety, "train")
    eval_convs, eval_safety = _clean(eval_convs, cfg.safety, "eval")
    prepared = (*_tokenize(cfg, tokenizer, train_convs, eval_convs), train_safety, eval_safety)
    if cfg.training.cache_data:
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_suffix(f".{os.getpid()}.tmp")
        partial.write_bytes(pickle.dumps(prepared))
        os.replace(partial, cached)  # parallel jobs of a sweep may race: each write is whole
    return prepared


def _data_key(cfg: DictConfig, tokenizer) -> str:
    """Everything that shapes the cleaned, tokenized data: file contents, data and safety settings,
    the tokenizer's vocabulary and chat template, and how long conversations are handled."""
    data = OmegaConf.to_container(cfg.data, resolve=True)
    files = {k: sha256_file(data[k]) for k in ("train_file", "eval_file") if data.get(k)}
    safety = {k: OmegaConf.to_container(cfg.safety, resolve=True).get(k)
              for k in ("phi_redaction", "content_filter", "system_prompt")}
    phi = safety["phi_redaction"] or {}
    phi.pop("workers", None)  # how many processes redact does not change what they write...
    if phi.get("mode") != "surrogate":
        phi.pop("seed", None)  # ...nor does the surrogate seed when there are no surrogates
    parts = {"version": DATA_CACHE_VERSION, "files": files, "data": data, "safety": safety,
             "split_seed": None if data.get("eval_file") else cfg.seed, "tokenizer": medata.fingerprint(tokenizer),
             "max_seq_len": cfg.training.max_seq_len, "overlong": cfg.training.overlong}
    return sha256_text(json.dumps(parts, sort_keys=True, default=str))[:24]


def _clean(conversations: list, safety: DictConfig, name: str) -> tuple[list, CleanReport]:
    conversations, report = clean_conversations(conversations, safety)
    log.info("%s data safety: %d PHI identifiers redacted in %d conversations %s; content filter: %d removed, "
             "%d flagged %s", name, sum(report.phi.values()), report.conversations_redacted, dict(report.phi),
             report.conversations_in - report.conversations_out, len(report.flagged), dict(report.content))
    if not conversations:
        raise MedloraError(f"the content filter removed every {name} conversation ({dict(report.content)}). "
                           "Check the data, or keep them for review with safety.content_filter.action=flag.")
    return conversations, report


def _open_audit(cfg: DictConfig, info: RunInfo, tracker: Tracker) -> AuditTrail:
    # the hash names the training setup: paths and tracking differ per run without changing it
    setup = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in ("paths", "tracking")}
    return AuditTrail(info.output_dir / "audit.jsonl", actor=f"{getpass.getuser()}@{socket.gethostname()}",
                      run_id=tracker.run_id or info.output_dir.name, config_hash=sha256_text(json.dumps(setup, sort_keys=True)),
                      git_commit=git_commit(cfg.paths.root_dir))


def _audit_data(audit: AuditTrail, cfg: DictConfig, train_safety: CleanReport, eval_safety: CleanReport) -> None:
    files = {key: sha256_file(cfg.data[key]) for key in ("train_file", "eval_file") if cfg.data[key]}
    audit.record("data_ingest", inputs=files, counts={"train_conversations": train_safety.conversations_in,
                                                      "eval_conversations": eval_safety.conversations_in})
    phi = train_safety.phi + eval_safety.phi
    audit.record("phi_redaction", outcome="redacted" if phi else "clean", counts=dict(phi),
                 rule_ids=[f"phi.{name}" for name in phi], enabled=bool(cfg.safety.phi_redaction.enabled),
                 mode=train_safety.phi_mode, seed_sha256=train_safety.surrogate_seed_sha256)
    content = train_safety.content + eval_safety.content
    audit.record("content_filter", outcome=cfg.safety.content_filter.action if content else "clean",
                 counts=dict(content), rule_ids=list(content), enabled=bool(cfg.safety.content_filter.enabled),
                 flagged_train_positions=train_safety.flagged, flagged_eval_positions=eval_safety.flagged)


def _tokenize(cfg: DictConfig, tokenizer, train_convs, eval_convs):
    t = cfg.training
    train_set, train_stats = medata.tokenize_dataset(train_convs, tokenizer, cfg.safety.system_prompt,
                                                     t.max_seq_len, t.overlong)
    eval_set, eval_stats = medata.tokenize_dataset(eval_convs, tokenizer, cfg.safety.system_prompt,
                                                   t.max_seq_len, t.overlong)
    for name, stats in (("train", train_stats), ("eval", eval_stats)):
        log.info("%s data: %d conversations, %d tokens (%d supervised), %d truncated and %d dropped at "
                 "training.max_seq_len=%d", name, stats.conversations, stats.tokens, stats.supervised_tokens,
                 stats.truncated, stats.dropped, t.max_seq_len)
    if not train_set or not eval_set:
        empty = "data.train_file" if not train_set else "the eval data"
        raise MedloraError(f"every conversation of {empty} was dropped at training.max_seq_len={t.max_seq_len}: "
                           "raise training.max_seq_len or set training.overlong=truncate.")
    return train_set, eval_set, {**train_stats.as_metrics("train"), **eval_stats.as_metrics("eval")}


def _fit(cfg, info, tracker, audit, device, precision, model_path, tokenizer, train_set, eval_set) -> float:
    t = cfg.training
    # accelerate keeps its state per process: without a reset, the jobs of a sweep run in one
    # process would all train in the first job's precision
    AcceleratorState._reset_state(reset_partial_state=True)
    # gradient accumulation is written out in train_loop, so each token weighs the same across micro-batches
    accelerator = Accelerator(cpu=device == "cpu", mixed_precision="no" if precision == "fp32" else precision)
    model = load_model(model_path, cfg.model, precision, str(accelerator.device), packed=t.packing)
    prefix_scope = _prefix_scope(t, model.config._attn_implementation)
    share_prefix = prefix_scope is not None
    model, trainable, total = add_adapter(model, cfg.lora, t.gradient_checkpointing, fast_dropout=t.fast_dropout,
                                          autocast=precision != "fp32", fused=t.fused_lora)
    chunked = t.chunked_loss and medlora_loss.supports_chunked_loss(model)
    tracker.log_params({"trainable_params": trainable, "total_params": total,
                        "trainable_percent": f"{100 * trainable / total:.4f}", "resolved_precision": precision,
                        "resolved_device": device, "resolved_allocator": allocator.in_use()})

    pad_id, packed_tokens = tokenizer.pad_token_id, t.batch_size * t.max_seq_len if t.packing else 0
    train_loader = medata.make_loader(train_set, t.batch_size, pad_id, cfg.seed, train=True, group_by_length=t.group_by_length,
                                      packed_tokens=packed_tokens, share_prefix=share_prefix)
    eval_loader = medata.make_loader(eval_set, t.batch_size, pad_id, cfg.seed, train=False, packed_tokens=packed_tokens,
                                     share_prefix=share_prefix)
    steps_per_epoch = math.ceil(len(train_loader) / t.gradient_accumulation_steps)
    total_steps = t.max_steps if t.max_steps > 0 else steps_per_epoch * t.num_epochs
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=t.learning_rate, weight_decay=t.weight_decay)
    scheduler = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=math.ceil(t.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    start_step = _resume(t.resume_from, model, optimizer, scheduler) if t.resume_from else 0
    audit.record("train_start", counts={"trainable_params": trainable, "total_params": total,
                                        "train_examples": len(train_set), "total_steps": total_steps},
                 start_step=start_step, **({"resumed_from": str(t.resume_from)} if t.resume_from else {}))

    before = evaluate(model, eval_loader, accelerator, chunked)
    log.info("before training: eval loss %.4f, perplexity %.2f", before["eval_loss"], before["eval_perplexity"])
    tracker.log_metrics({f"{k}_before": v for k, v in before.items()}, step=start_step)
    audit.record("eval", counts=before, step=start_step)

    speed = train_loop(cfg, model, optimizer, scheduler, train_loader, eval_loader, accelerator, tracker, audit,
                       info.output_dir, start_step, total_steps, chunked, step_prefix=prefix_scope == "step")
    log.info("throughput: %.1f tokens/s (%.1f supervised) over %d steps; a shared prefix spared computing %.1f%% "
             "of the tokens", speed["train_tokens_per_second"], speed["train_supervised_tokens_per_second"],
             total_steps - start_step, 100 * speed["train_shared_prefix_fraction"])
    if torch.cuda.is_available() and device.startswith("cuda"):
        speed["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9

    after = evaluate(model, eval_loader, accelerator, chunked)
    log.info("after training:  eval loss %.4f, perplexity %.2f (before: %.4f, %.2f)", after["eval_loss"],
             after["eval_perplexity"], before["eval_loss"], before["eval_perplexity"])
    tracker.log_metrics({**after, **speed}, step=total_steps)
    audit.record("eval", counts=after, step=total_steps)
    audit.record("train_end", step=total_steps)

    adapter_dir = _save_adapter(accelerator.unwrap_model(model), tokenizer, info.output_dir / "adapter")
    log.info("adapter saved to %s", adapter_dir)
    if cfg.adapter_eval is not None:
        # before the adapter's hashes are recorded and it is logged: the evaluation may write beside it
        scores = hydra.utils.instantiate(cfg.adapter_eval)(adapter_dir=adapter_dir, cfg=cfg)
        tracker.log_metrics(scores, step=total_steps)
        audit.record("eval", counts=scores, step=total_steps, kind="adapter_eval")
    audit.record("adapter_export", outputs=_hashes(adapter_dir))
    tracker.set_tags({"audit_head": audit.head})
    _log_artifacts(cfg, tracker, info.output_dir, adapter_dir)
    return after["eval_loss"]


def _prefix_scope(t: DictConfig, attention: str) -> str | None:
    """training.shared_prefix_scope (row or step) where a shared prefix can apply: packed rows and
    medlora's per-conversation sdpa; None where it cannot."""
    if not (t.shared_prefix and t.packing):
        return None
    if attention != "sdpa_varlen":
        log.info("training.shared_prefix: attention %s runs over whole rows, so every conversation keeps its own "
                 "copy of the system prompt (model.attn_implementation=sdpa shares it)", attention)
        return None
    return t.shared_prefix_scope


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file()}


def train_loop(cfg, model, optimizer, scheduler, train_loader, eval_loader, accelerator, tracker, audit,
               output_dir, start_step: int, total_steps: int, chunked: bool, step_prefix: bool = False) -> dict[str, float]:
    """Train to `total_steps`; return the throughput over the whole loop, evals and checkpoints excluded.

    `step_prefix`: the prefix every conversation of an optimizer step begins with runs once per step (medlora.prefix).
    """
    t = cfg.training
    params = [p for p in model.parameters() if p.requires_grad]
    accum = t.gradient_accumulation_steps
    # place the sampler where the checkpoint left off, so a resumed run sees the same batches
    consumed = start_step * accum
    train_loader.batch_sampler.epoch = consumed // len(train_loader)
    micro_batches = _endless(train_loader, skip=consumed % len(train_loader))

    step, totals = start_step, _Throughput()
    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", dynamic_ncols=True, mininterval=1.0)
    model.train()
    while step < total_steps:
        started = time.perf_counter()
        window = [_to_device(next(micro_batches), accelerator.device) for _ in range(accum)]
        # every supervised token of the optimizer step weighs the same, whichever micro-batch holds it
        supervised = sum(medata.supervised_tokens(batch) for batch in window)
        tokens = sum(medata.real_tokens(batch) for batch in window)
        prefix = None
        if step_prefix:
            with accelerator.autocast():
                prefix, window = run_prefix(model, window)
        loss_total = 0.0
        for batch in window:
            # autocast is explicit: the chunked loss calls the decoder, not the wrapped model forward
            with accelerator.autocast():
                loss_sum, _ = medlora_loss.loss_sum(model, batch, chunked)
            accelerator.backward(loss_sum / supervised)
            loss_total += loss_sum.item()
        if prefix is not None:
            prefix.backward()  # what every row sent to the system prompt, back through it once
        # with max_grad_norm=0 the norm is still measured and logged, just not clipped
        grad_norm = accelerator.clip_grad_norm_(params, t.max_grad_norm or float("inf"))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        step += 1

        seconds = time.perf_counter() - started
        spared = sum(medata.shared_tokens(batch) for batch in window) - (prefix.length if prefix else 0)
        totals.add(tokens, supervised, seconds, spared=spared)
        metrics = {"train_loss": loss_total / supervised, "learning_rate": scheduler.get_last_lr()[0],
                   "grad_norm": float(grad_norm), "tokens_per_second": tokens / seconds,
                   "supervised_tokens_per_second": supervised / seconds}
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['train_loss']:.4f}", lr=f"{metrics['learning_rate']:.2e}",
                        tok_s=f"{metrics['tokens_per_second']:.0f}")
        if t.log_every and step % t.log_every == 0:
            tracker.log_metrics(metrics, step)
        if t.eval_every and step % t.eval_every == 0 and step < total_steps:
            scores = evaluate(model, eval_loader, accelerator, chunked)
            log.info("step %d: eval loss %.4f, perplexity %.2f", step, scores["eval_loss"], scores["eval_perplexity"])
            tracker.log_metrics(scores, step)
            audit.record("eval", counts=scores, step=step)
        if t.save_every and step % t.save_every == 0:
            folder = output_dir / "checkpoints" / f"step_{step}"
            _save_checkpoint(model, optimizer, scheduler, accelerator, folder, step)
            audit.record("checkpoint", outputs=_hashes(folder), step=step)
    bar.close()
    return totals.summary()


def _endless(loader, skip: int):
    """Micro-batches epoch after epoch (the sampler reshuffles each epoch), after skipping `skip`."""
    while True:
        for batch in loader:
            if skip:
                skip -= 1
                continue
            yield batch


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


class _Throughput:
    """Tokens per second over the optimizer steps, evals and checkpoints excluded.

    tokens/s counts the tokens of the conversations (padding excluded; a shared prefix counted
    once per conversation, as if it were not shared); supervised tokens/s counts the tokens that
    have a label, i.e. the assistant replies the loss is computed on. The shared fraction is the
    part of those tokens that a shared prefix (training.shared_prefix) spared computing.
    """

    def __init__(self) -> None:
        self.tokens, self.supervised, self.spared, self.seconds = 0, 0, 0, 0.0

    def add(self, tokens: int, supervised: int, seconds: float, spared: int = 0) -> None:
        self.tokens, self.supervised, self.seconds = self.tokens + tokens, self.supervised + supervised, self.seconds + seconds
        self.spared += spared

    def summary(self) -> dict[str, float]:
        return {"train_tokens_per_second": self.tokens / max(self.seconds, 1e-9),
                "train_supervised_tokens_per_second": self.supervised / max(self.seconds, 1e-9),
                "train_shared_prefix_fraction": self.spared / max(self.tokens, 1)}


@torch.no_grad()
def evaluate(model, loader, accelerator, chunked: bool = False) -> dict[str, float]:
    """Token-weighted mean loss over every supervised token of the eval set, and its perplexity."""
    model.eval()
    total, count = 0.0, 0
    for batch in loader:
        with accelerator.autocast():
            loss_sum, n = medlora_loss.loss_sum(model, _to_device(batch, accelerator.device), chunked)
        total += loss_sum.float().item()
        count += n
    model.train()
    mean = total / count
    return {"eval_loss": mean, "eval_perplexity": math.exp(mean)}


def _save_adapter(model, tokenizer, target: Path) -> Path:
    def save(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)  # carries the chat template the adapter was trained with

    return save_atomically(target, save)


def _save_checkpoint(model, optimizer, scheduler, accelerator, target: Path, step: int) -> None:
    def save(folder: Path) -> None:
        accelerator.unwrap_model(model).save_pretrained(folder)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": torch.get_rng_state()}, folder / "training_state.pt")
        (folder / "trainer_state.json").write_text(json.dumps({"step": step}))

    save_atomically(target, save)
    log.info("checkpoint saved to %s", target)


def _resume(folder: str, model, optimizer, scheduler) -> int:
    folder = Path(folder)
    if not (folder / "trainer_state.json").is_file():
        raise MedloraError(f"training.resume_from={folder} is not a checkpoint (no trainer_state.json): give a "
                           "folder such as outputs/runs/<time>/checkpoints/step_20.")
    weights = load_file(folder / "adapter_model.safetensors")
    set_peft_model_state_dict(model, weights)
    state = torch.load(folder / "training_state.pt", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    step = json.loads((folder / "trainer_state.json").read_text())["step"]
    log.info("resumed from %s at step %d", folder, step)
    return step


def _log_artifacts(cfg: DictConfig, tracker: Tracker, output_dir: Path, adapter_dir: Path) -> None:
    resolved = output_dir / "config_resolved.yaml"
    resolved.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    tracker.log_artifact(resolved)
    if cfg.tracking.log_adapter:
        tracker.log_artifact(adapter_dir, "adapter")
    for handler in logging.getLogger().handlers:
        handler.flush()
    for log_file in [*output_dir.glob("*.log"), output_dir / "audit.jsonl"]:
        tracker.log_artifact(log_file)
