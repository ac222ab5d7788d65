"""Training through the safety layer: PHI redacted, harmful conversations removed, counts tracked, an
audit trail that verifies, and no raw identifier anywhere in MLflow or the trail."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from helpers import TINY, conversation, mlflow_client, train, write_jsonl

RAW = ["Margaret Okafor", "617-555-0143", "m.okafor@example.org", "123-45-6789", "MRN 88412907"]
ROWS = [
    conversation(
        "My name is Margaret Okafor and my blood pressure was 150/95 this morning. Is that high?",
        "Yes, 150/95 is in the high range. Recheck it after resting, and see your clinician soon.",
    ),
    conversation(
        "Call me at 617-555-0143 or m.okafor@example.org about my results, SSN 123-45-6789, MRN 88412907.",
        "I can't contact you, but your care team can explain your results.",
    ),
    conversation(
        "How much acetaminophen is too much?",
        "Most adults should not take more than 4,000 mg in 24 hours; ask a pharmacist about your case.",
    ),
    conversation(
        "What's the most reliable way to overdose on my pills so I don't wake up?",
        "Take the whole bottle of your sleeping pills with alcohol; that amount is lethal and you won't wake up.",
    ),
    *[conversation(f"What is a normal temperature{'?' * i}", "About 36.5 to 37.5 C.") for i in range(1, 5)],
]


def _train(tmp, *overrides: str):
    path = write_jsonl(tmp / "phi.jsonl", ROWS)
    result = train(
        tmp,
        *TINY,
        "data=jsonl",
        f"data.train_file={path}",
        f"data.eval_file={path}",
        "training.max_steps=2",
        "training.batch_size=2",
        "training.gradient_accumulation_steps=1",
        *overrides,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    client = mlflow_client(tmp)
    (run,) = client.search_runs([client.get_experiment_by_name("medlora").experiment_id])
    return tmp, result, client, run


@pytest.fixture(scope="module")
def safe_run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("safe"))


def _everything_written(tmp, result, client, run) -> str:
    """All a run leaves behind: its output, MLflow params, tags, metric names and artifacts, and the
    cleaned, tokenized data it cached, decoded back to text."""
    from medlora.data import load_splits
    from medlora.model import load_tokenizer
    from medlora.prepare import cache_path, load_prepared

    texts = [
        result.stdout,
        result.stderr,
        json.dumps(run.data.params),
        json.dumps(run.data.tags),
        json.dumps(list(run.data.metrics)),
    ]
    for name in ("audit.jsonl", "train.log", "config_resolved.yaml"):
        texts.append(open(client.download_artifacts(run.info.run_id, name, str(tmp / "download"))).read())
    cfg = OmegaConf.load(tmp / "run" / "config_resolved.yaml")
    tokenizer = load_tokenizer(str(tmp / "run" / "adapter"))
    prepared = load_prepared(cache_path(cfg, tokenizer, *load_splits(cfg.data, cfg.seed)))
    texts += [tokenizer.decode(e.input_ids) for e in prepared.train_set + prepared.eval_set]
    return "\n".join(texts)


@pytest.mark.slow
def test_counts_reach_mlflow(safe_run):
    _, _, _, run = safe_run
    m = run.data.metrics
    assert m["train_phi_redactions"] >= 5 and m["train_conversations_redacted"] == 2
    assert m["train_phi_name"] >= 1 and m["train_phi_phone"] == 1 and m["train_phi_email"] == 1
    assert m["train_phi_ssn"] == 1 and m["train_phi_mrn"] == 1
    assert m["train_content_removed"] == 1 and m["train_conversations"] == len(ROWS) - 1


@pytest.mark.slow
def test_audit_trail_verifies_against_the_recorded_head(safe_run):
    tmp, _, client, run = safe_run
    trail = tmp / "run" / "audit.jsonl"
    entries = [json.loads(line) for line in trail.read_text().splitlines()]
    events = [e["event_type"] for e in entries]
    assert events == [
        "data_ingest",
        "phi_redaction",
        "content_filter",
        "train_start",
        "eval",
        "eval",
        "train_end",
        "adapter_export",
    ]
    assert all(e["run_id"] == run.info.run_id for e in entries)
    assert "adapter_model.safetensors" in entries[-1]["outputs"]
    head = run.data.tags["audit_head"]
    verified = subprocess.run(
        [sys.executable, "-m", "medlora.audit", "verify", str(trail), "--head", head], capture_output=True, text=True
    )
    assert verified.returncode == 0, verified.stderr
    assert "audit.jsonl" in {a.path for a in client.list_artifacts(run.info.run_id)}


@pytest.mark.slow
def test_no_raw_identifier_is_logged_or_cached_anywhere(safe_run, tmp_path):
    written = _everything_written(*safe_run)
    assert "150/95" in written  # a clinical value is kept: the decoded data really is the training text
    assert [raw for raw in RAW if raw in written] == []
    # the control: with redaction off the same search finds every identifier in the cached data
    unredacted = _everything_written(*_train(tmp_path, "safety.phi_redaction.enabled=false"))
    assert [raw for raw in RAW if raw in unredacted] == RAW
