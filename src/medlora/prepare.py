"""Training data as the model sees it: cleaned (PHI redaction, content filter), tokenized, cached.

PHI redaction and tokenization are slow on a large data set (NER over every conversation); every job
of a sweep over LoRA or optimizer settings would otherwise repeat it, so the result is cached
under paths.cache_dir/data, keyed by everything that shapes it.
"""

from __future__ import annotations

import json
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from medlora import data as medata
from medlora.audit import AuditTrail
from medlora.config import MedloraError
from medlora.files import sha256_file, sha256_text, write_file
from medlora.safety.clean import CleanReport, clean_conversations

log = logging.getLogger(__name__)

# bump when cleaning or tokenization changes what they produce, so old cache entries are not reused
DATA_CACHE_VERSION = 3


@dataclass
class Prepared:
    """Tokenized train and eval sets, their token counts as metrics, and what cleaning did to each."""

    train_set: list
    eval_set: list
    token_stats: dict[str, float]
    train_safety: CleanReport
    eval_safety: CleanReport

    def metrics(self) -> dict[str, float]:
        return {**self.token_stats, **self.train_safety.metrics("train"), **self.eval_safety.metrics("eval")}


def prepare_data(cfg: DictConfig, tokenizer, train_convs: list, eval_convs: list) -> Prepared:
    """Clean and tokenize, or reuse the result of an earlier run that had the same inputs."""
    cached = Path(cfg.paths.cache_dir) / "data" / f"{data_key(cfg, tokenizer)}.pkl"
    if cfg.training.cache_data and cached.is_file():
        log.info("cleaned and tokenized data reused from %s (training.cache_data=false rebuilds it)", cached)
        return pickle.loads(cached.read_bytes())
    train_convs, train_safety = _clean(train_convs, cfg.safety, "train")
    eval_convs, eval_safety = _clean(eval_convs, cfg.safety, "eval")
    prepared = Prepared(*_tokenize(cfg, tokenizer, train_convs, eval_convs), train_safety, eval_safety)
    if cfg.training.cache_data:
        cached.parent.mkdir(parents=True, exist_ok=True)
        write_file(cached, pickle.dumps(prepared))  # parallel jobs of a sweep may race: each write is whole
    return prepared


def data_key(cfg: DictConfig, tokenizer) -> str:
    """Everything that shapes the cleaned, tokenized data: file contents, data and safety settings,
    the tokenizer's vocabulary and chat template, and how long conversations are handled."""
    data = OmegaConf.to_container(cfg.data, resolve=True)
    files = {k: sha256_file(data[k]) for k in ("train_file", "eval_file") if data.get(k)}
    safety = {
        k: OmegaConf.to_container(cfg.safety, resolve=True).get(k)
        for k in ("phi_redaction", "content_filter", "system_prompt")
    }
    phi = safety["phi_redaction"] or {}
    phi.pop("workers", None)  # how many processes redact does not change what they write...
    if phi.get("mode") != "surrogate":
        phi.pop("seed", None)  # ...nor does the surrogate seed when there are no surrogates
    parts = {
        "version": DATA_CACHE_VERSION,
        "files": files,
        "data": data,
        "safety": safety,
        "split_seed": None if data.get("eval_file") else cfg.seed,
        "tokenizer": medata.fingerprint(tokenizer),
        "max_seq_len": cfg.training.max_seq_len,
        "overlong": cfg.training.overlong,
    }
    return sha256_text(json.dumps(parts, sort_keys=True, default=str))[:24]


def audit_data(audit: AuditTrail, cfg: DictConfig, prepared: Prepared) -> None:
    """The data's hashes and what redaction and the content filter did, in the audit trail."""
    train_safety, eval_safety = prepared.train_safety, prepared.eval_safety
    files = {key: sha256_file(cfg.data[key]) for key in ("train_file", "eval_file") if cfg.data[key]}
    audit.record(
        "data_ingest",
        inputs=files,
        counts={
            "train_conversations": train_safety.conversations_in,
            "eval_conversations": eval_safety.conversations_in,
        },
    )
    phi = train_safety.phi + eval_safety.phi
    audit.record(
        "phi_redaction",
        outcome="redacted" if phi else "clean",
        counts=dict(phi),
        rule_ids=[f"phi.{name}" for name in phi],
        enabled=bool(cfg.safety.phi_redaction.enabled),
        mode=train_safety.phi_mode,
        seed_sha256=train_safety.surrogate_seed_sha256,
    )
    content = train_safety.content + eval_safety.content
    audit.record(
        "content_filter",
        outcome=cfg.safety.content_filter.action if content else "clean",
        counts=dict(content),
        rule_ids=list(content),
        enabled=bool(cfg.safety.content_filter.enabled),
        flagged_train_positions=train_safety.flagged,
        flagged_eval_positions=eval_safety.flagged,
    )


def _clean(conversations: list, safety: DictConfig, name: str) -> tuple[list, CleanReport]:
    conversations, report = clean_conversations(conversations, safety)
    log.info(
        "%s data safety: %d PHI identifiers redacted in %d conversations %s; content filter: %d removed, %d flagged %s",
        name,
        sum(report.phi.values()),
        report.conversations_redacted,
        dict(report.phi),
        report.conversations_in - report.conversations_out,
        len(report.flagged),
        dict(report.content),
    )
    if not conversations:
        raise MedloraError(
            f"the content filter removed every {name} conversation ({dict(report.content)}). "
            "Check the data, or keep them for review with safety.content_filter.action=flag."
        )
    return conversations, report


def _tokenize(cfg: DictConfig, tokenizer, train_convs: list, eval_convs: list) -> tuple[list, list, dict]:
    t = cfg.training
    train_set, train_stats = medata.tokenize_dataset(
        train_convs, tokenizer, cfg.safety.system_prompt, t.max_seq_len, t.overlong
    )
    eval_set, eval_stats = medata.tokenize_dataset(
        eval_convs, tokenizer, cfg.safety.system_prompt, t.max_seq_len, t.overlong
    )
    for name, stats in (("train", train_stats), ("eval", eval_stats)):
        log.info(
            "%s data: %d conversations, %d tokens (%d supervised), %d truncated and %d dropped at "
            "training.max_seq_len=%d",
            name,
            stats.conversations,
            stats.tokens,
            stats.supervised_tokens,
            stats.truncated,
            stats.dropped,
            t.max_seq_len,
        )
    if not train_set or not eval_set:
        empty = "data.train_file" if not train_set else "the eval data"
        raise MedloraError(
            f"every conversation of {empty} was dropped at training.max_seq_len={t.max_seq_len}: "
            "raise training.max_seq_len or set training.overlong=truncate."
        )
    return train_set, eval_set, {**train_stats.as_metrics("train"), **eval_stats.as_metrics("eval")}
