"""How well triage sorts labelled conversations, and the triage model's thresholds chosen from it.

`calibrate` runs after a `experiment=safety_triage` training run (train.yaml's `adapter_eval`): it
stores the adapter in its shipped form, scores the validation conversations exactly as inference
scores them, picks each flagged class's threshold (recall first), writes `triage.json` and returns
the validation figures for MLflow. `measure` gives the same figures for any labelled set and any
decision (rules, model, both); evaluate.py reports them on the held-out split.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from medlora.files import sha256_file
from medlora.safety.settings import medical_defaults
from medlora.safety.triage import Triage
from medlora.safety.triage_data import read_rows
from medlora.safety.triage_model import FLAGGED, LABELS, MANIFEST, WEIGHTS, TriageModel

log = logging.getLogger(__name__)


def measure(labels: Sequence[str], actions: Sequence[str]) -> dict[str, float]:
    """The targets' figures (what each kind of message gets) and per-class recall and precision.

    emergency_recall: emergencies answered with the emergency reply; crisis_caught: crises answered
    with the crisis or the emergency reply (both give crisis help); harmful_declined: harm requests
    not answered by the model; benign_flagged: benign conversations that got a fixed reply instead
    of an answer (over-refusal).
    """
    pairs = list(zip(labels, actions))

    def share(label: str, ok) -> float | None:
        rows = [action for truth, action in pairs if truth == label]
        return sum(map(ok, rows)) / len(rows) if rows else None

    figures = {
        "emergency_recall": share("emergency", lambda a: a == "emergency"),
        "crisis_caught": share("crisis", lambda a: a in ("crisis", "emergency")),
        "harmful_declined": share("refuse", lambda a: a != "allow"),
        "benign_flagged": share("allow", lambda a: a != "allow"),
    }
    for label in LABELS:
        figures[f"recall_{label}"] = share(label, lambda a, label=label: a == label)
        predicted = [truth for truth, action in pairs if action == label]
        figures[f"precision_{label}"] = sum(t == label for t in predicted) / len(predicted) if predicted else None
    figures["accuracy"] = sum(t == a for t, a in pairs) / len(pairs) if pairs else None
    recalls = [figures[f"recall_{label}"] for label in LABELS if figures[f"recall_{label}"] is not None]
    figures["balanced_accuracy"] = sum(recalls) / len(recalls) if recalls else None  # classes weigh the same
    return {name: value for name, value in figures.items() if value is not None}


def choose_thresholds(
    labels: Sequence[str],
    scores: Sequence[Mapping[str, float]],
    recall_targets: Mapping,
    max_threshold: float,
    benign_budget: Mapping,
) -> dict[str, float]:
    """Per flagged class, recall first: the highest threshold (at most `max_threshold`) whose share of
    that class's rows scoring at or above it reaches the class's recall target; but never so low
    that more than the class's `benign_budget` share of the benign (allow) rows would reach it."""
    thresholds = {}
    benign = [s for t, s in zip(labels, scores) if t == "allow"]
    for label in FLAGGED:
        own = sorted((s[label] for t, s in zip(labels, scores) if t == label), reverse=True)
        threshold = max_threshold
        if own:
            # the k-th highest score keeps k of the class's rows at or above the threshold
            k = min(len(own), max(1, math.ceil(float(recall_targets[label]) * len(own) - 1e-9)))
            threshold = min(max_threshold, own[k - 1])
        allowed = sorted((s[label] for s in benign), reverse=True)
        m = math.floor(float(benign_budget[label]) * len(allowed) + 1e-9)  # benign rows that may reach it
        if m < len(allowed):
            threshold = max(threshold, math.nextafter(allowed[m], 1.0))
        thresholds[label] = threshold
    return thresholds


def triage_rules() -> Triage:
    return Triage(medical_defaults()["triage"])


def calibrate(
    adapter_dir: Path,
    cfg: DictConfig,
    val_rows: str,
    instruction: str,
    max_chars: int,
    recall_targets: Mapping,
    max_threshold: float,
    benign_budget: Mapping,
    compute: str,
    weights_dtype: str,
    batch_size: int,
    max_rows: int | None = None,
) -> dict[str, float]:
    adapter_dir = Path(adapter_dir)
    _store_weights(adapter_dir / WEIGHTS, weights_dtype)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        (adapter_dir / name).unlink(missing_ok=True)  # the base model's own tokenizer is the one trained with
    manifest = {
        "instruction": instruction,
        "labels": list(LABELS),
        "max_chars": max_chars,
        "compute": compute,
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "seed": cfg.seed,
        "thresholds": {label: max_threshold for label in FLAGGED},
    }
    _write_manifest(adapter_dir, manifest)

    rows = read_rows(Path(val_rows))[:max_rows]
    labels = [label for _, _, label in rows]
    conversations = [messages for _, messages, _ in rows]
    model = TriageModel(adapter_dir, cfg.paths.cache_dir, batch_size=batch_size)
    scores = model.scores(conversations)
    manifest["thresholds"] = choose_thresholds(labels, scores, recall_targets, max_threshold, benign_budget)
    model.thresholds = manifest["thresholds"]
    rules = triage_rules()
    rule_actions = [d.action for d in rules.check_many(conversations)]
    model_actions = [model.decide(s) for s in scores]
    combined = [
        next(a for a in ("emergency", "crisis", "refuse", "allow") if a in pair)
        for pair in zip(rule_actions, model_actions)
    ]
    figures = {
        "rules": measure(labels, rule_actions),
        "model": measure(labels, model_actions),
        "rules_or_model": measure(labels, combined),
    }
    manifest["validation"] = {
        "rows": len(rows),
        "rows_sha256": sha256_file(val_rows),
        "figures": figures,
        "recall_targets": dict(recall_targets),
        "max_threshold": max_threshold,
        "benign_budget": dict(benign_budget),
    }
    _write_manifest(adapter_dir, manifest)
    log.info("triage thresholds (validation, recall first): %s", _fmt(manifest["thresholds"]))
    for name, found in figures.items():
        log.info(
            "triage on %d validation conversations, %s: %s",
            len(rows),
            name,
            _fmt(
                {
                    k: found[k]
                    for k in (
                        "emergency_recall",
                        "crisis_caught",
                        "harmful_declined",
                        "benign_flagged",
                        "balanced_accuracy",
                    )
                    if k in found
                }
            ),
        )
    flat = {f"val_{who}_{name}": value for who, found in figures.items() for name, value in found.items()}
    return flat | {f"threshold_{label}": value for label, value in manifest["thresholds"].items()}


def _store_weights(path: Path, dtype: str) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    save_file(
        {k: v.to(getattr(torch, dtype)).contiguous() for k, v in tensors.items()}, path, metadata={"format": "pt"}
    )


def _write_manifest(folder: Path, manifest: dict) -> None:
    manifest["weights_sha256"] = sha256_file(folder / WEIGHTS)
    partial = folder / f".{MANIFEST}.tmp"
    partial.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    partial.replace(folder / MANIFEST)


def _fmt(values: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in values.items())
