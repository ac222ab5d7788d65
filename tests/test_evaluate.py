"""`python evaluate.py` on a tiny trained adapter: perplexity base vs adapter, safety metrics, MLflow eval run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from medlora.cli import RunInfo
from medlora.config import MedloraError, option
from medlora.infer.assistant import Reply

from helpers import EXACT, ROOT, TINY, compose, conversation, forget_download, mlflow_client, train, write_jsonl

QA = [
    ("What is hypertension?", "Blood pressure that stays at or above 130/80 mm Hg."),
    ("What does LDL measure?", "The cholesterol carried by low-density lipoprotein."),
    ("How is asthma treated?", "With inhaled controllers and a reliever inhaler for symptoms."),
    ("What is anemia?", "Too few red blood cells or too little hemoglobin to carry oxygen."),
    ("What does TSH test?", "How well the thyroid gland is working."),
    ("What is eczema?", "A condition that makes skin dry, itchy and inflamed."),
]
TRAIN, HELD_OUT = QA[:4], QA[4:]
SAMPLES, GENERATIONS, TRIAGED = 2, 2, 40
# fp32 and no dropout: the evaluation's adapter loss must equal the training run's final eval loss
OVERFIT = [*TINY, *EXACT, "data=jsonl", "training.max_steps=6", "training.batch_size=3", "training.learning_rate=1e-2"]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evaluate")
    qa = write_jsonl(tmp / "qa.jsonl", [conversation(q, a) for q, a in TRAIN])
    held_out = write_jsonl(tmp / "held_out.jsonl", [conversation(q, a) for q, a in HELD_OUT])
    trained = train(tmp, *OVERFIT, f"data.train_file={qa}", f"data.eval_file={held_out}")
    assert trained.returncode == 0, trained.stderr[-3000:]
    client = mlflow_client(tmp)
    (run,) = client.search_runs([client.get_experiment_by_name("medlora").experiment_id])
    cmd = [
        sys.executable,
        str(ROOT / "evaluate.py"),
        f"hydra.run.dir={tmp}/eval",
        f"run_id={run.info.run_id}",
        f"tracking.uri=sqlite:///{tmp}/mlflow.db",
        "precision=fp32",
        f"evaluation.medical_file={held_out}",
        f"evaluation.safety_samples={SAMPLES}",
        f"evaluation.generations={GENERATIONS}",
        "inference.max_new_tokens=6",
        f"evaluation.triage_rows={TRIAGED}",
    ]
    result = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp / "eval" / "evaluation.json").read_text())
    yield tmp, client, run, result, metrics
    forget_download(run.info.run_id)


def _reference_losses(tmp) -> tuple[float, float]:
    """The held-out loss of adapter and base from plain transformers + peft: each conversation's own
    loss weighted by its supervised tokens, so no medlora loss, batching or packing code is involved."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from medlora import data as medata
    from medlora.model import load_tokenizer, resolve_checkpoint

    cfg = compose("train", TINY)
    base_path, _ = resolve_checkpoint(cfg.model, cfg.paths.cache_dir, cfg.seed)
    tokenizer = load_tokenizer(str(tmp / "run" / "adapter"))
    examples, _ = medata.tokenize_dataset(
        medata.load_conversations(tmp / "held_out.jsonl"),
        tokenizer,
        cfg.safety.system_prompt,
        cfg.training.max_seq_len,
        "truncate",
    )
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(tmp / "run" / "adapter")).eval()

    @torch.no_grad()
    def loss() -> float:
        total = count = 0
        for e in examples:
            labels = torch.tensor([e.labels])
            n = int((labels[:, 1:] != -100).sum())  # the model shifts labels by one
            total += model(input_ids=torch.tensor([e.input_ids]), labels=labels).loss.item() * n
            count += n
        return total / count

    adapted = loss()
    with model.disable_adapter():
        return adapted, loss()


@pytest.mark.slow
def test_held_out_perplexity_matches_training_and_a_plain_reference(evaluated):
    tmp, _, run, _, metrics = evaluated
    # the same held-out file, weights, dtype and loss: the numbers training logged, to float precision
    assert metrics["medical_loss"] == pytest.approx(run.data.metrics["eval_loss"], rel=1e-6)
    assert metrics["medical_loss_base"] == pytest.approx(run.data.metrics["eval_loss_before"], rel=1e-6)
    adapted, base = _reference_losses(tmp)
    assert metrics["medical_loss"] == pytest.approx(adapted, rel=1e-5)
    assert metrics["medical_loss_base"] == pytest.approx(base, rel=1e-5)
    # conversations it never saw: the adapter learnt the answers' style, not only the training rows
    assert metrics["medical_perplexity"] < metrics["medical_perplexity_base"]
    for name in ("medical", "general"):
        for suffix in ("", "_base"):
            assert metrics[f"{name}_perplexity{suffix}"] == pytest.approx(math.exp(metrics[f"{name}_loss{suffix}"]))


@pytest.mark.slow
def test_report_shows_base_and_adapter_side_by_side(evaluated):
    _, _, _, result, metrics = evaluated
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["base", "adapter"]
    medical = next(r for r in rows if r.startswith("medical_perplexity")).split()
    assert [float(v) for v in medical[1:]] == [
        round(metrics["medical_perplexity_base"], 4),
        round(metrics["medical_perplexity"], 4),
    ]
    assert f"(n={SAMPLES};" in next(r for r in rows if r.startswith("over_refusal"))


@pytest.mark.slow
def test_safety_metrics_come_from_real_replies(evaluated):
    tmp, _, _, _, metrics = evaluated
    for name in ("emergency_detection", "crisis_detection", "harmful_compliance", "over_refusal"):
        assert 0 <= metrics[name] <= 1 and 0 <= metrics[f"{name}_base"] <= 1
    rows = [json.loads(line) for line in (tmp / "eval" / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == GENERATIONS + 4  # the medical prompts, then the first sampled prompt of each safety set
    triaged = [r for r in rows if r["safety_action"] in ("emergency", "crisis", "refuse")]
    # triage answers before any model: base and adapter get the same fixed reply
    assert all(
        r["base_answer"] == r["adapter_answer"] and r["base_safety_action"] == r["safety_action"] for r in triaged
    )
    events = [json.loads(line)["event_type"] for line in (tmp / "eval" / "audit.jsonl").read_text().splitlines()]
    assert events.count("inference_triage") == 2 * (GENERATIONS + 4 * SAMPLES)
    for name in ("emergency_detection", "crisis_detection", "harmful_compliance", "over_refusal"):
        assert metrics[name] == pytest.approx(metrics[f"{name}_by_triage"] + metrics[f"{name}_by_adapter"])


@pytest.mark.slow
def test_triage_is_measured_on_the_held_out_split(evaluated):
    """The rules' figures are those of the rules run directly on the same held-out rows."""
    _, _, _, result, metrics = evaluated
    from medlora.evaluate import _held_out, _sample
    from medlora.safety.triage import Triage
    from medlora.safety.triage_eval import measure

    rows = [row for _, row in _sample(_held_out(ROOT / "data" / "safety_triage" / "test"), TRIAGED, 42)]
    rules = Triage(option("safety", "medical").triage)
    expected = measure([r["label"] for r in rows], [d.action for d in rules.check_many([r["messages"] for r in rows])])
    rules_only = {
        k[len("triage_rules_") :]: v
        for k, v in metrics.items()
        if k.startswith("triage_rules_") and not k.startswith("triage_rules_or_model_")
    }
    assert rules_only == expected
    # the model's figures and both together's are those of the shipped triage model on the same rows
    safety = compose("evaluate", [])
    triage = Triage.from_config(OmegaConf.to_container(safety.safety.triage, resolve=True), safety.paths.cache_dir)
    decisions = triage.check_many([r["messages"] for r in rows])
    labels = [r["label"] for r in rows]
    for who, actions in (
        ("model", [triage.model.decide(d.scores) for d in decisions]),
        ("rules_or_model", [d.action for d in decisions]),
    ):
        found = {k[len(f"triage_{who}_") :]: v for k, v in metrics.items() if k.startswith(f"triage_{who}_")}
        assert found == measure(labels, actions)
    # either one flags: rules or model catches at least what each catches alone
    assert metrics["triage_rules_or_model_emergency_recall"] >= max(
        metrics["triage_rules_emergency_recall"], metrics["triage_model_emergency_recall"]
    )
    assert f"triage on the held-out split (n={TRIAGED})" in result.stdout


@pytest.mark.slow
def test_eval_run_is_nested_under_the_training_run(evaluated):
    _, client, run, _, metrics = evaluated
    (child,) = client.search_runs([run.info.experiment_id], filter_string="tags.`medlora.role` = 'evaluation'")
    assert child.data.tags["mlflow.parentRunId"] == run.info.run_id
    assert child.data.tags["medlora.evaluated_run"] == run.info.run_id
    assert child.data.metrics == pytest.approx(metrics)
    assert child.data.params["evaluation.safety_samples"] == str(SAMPLES)
    artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
    assert {"generations.json", "evaluation.json", "audit.jsonl"} <= artifacts
    table = json.load(open(client.download_artifacts(child.info.run_id, "generations.json")))
    assert table["columns"] == ["id", "prompt", "base_answer", "adapter_answer", "safety_action", "base_safety_action"]
    assert len(table["data"]) == GENERATIONS + 4


def _reply(action: str, text: str = "", model_called: bool = True) -> Reply:
    return Reply(text, action, model_called=model_called)


def test_safety_metric_definitions():
    safety = option("safety", "medical")
    from medlora.evaluate import safety_metrics

    replies = {
        "emergency": [
            _reply("emergency", model_called=False),
            _reply("pass", "Call 911 right away."),
            _reply("pass", "Rest and drink water."),
            _reply("pass", "Go to the emergency room now."),
        ],
        "crisis": [
            _reply("crisis", model_called=False),
            _reply("pass", "You can call or text 988."),
            _reply("pass", "Try to sleep more."),
        ],
        "harmful": [_reply("refuse", model_called=False), _reply("block"), _reply("rewrite"), _reply("pass")],
        "benign": [
            _reply("pass"),
            _reply("refuse", model_called=False),
            _reply("block"),
            _reply("refer"),
            _reply("rewrite"),
        ],
    }
    assert safety_metrics(replies, safety) == {
        "emergency_detection": 3 / 4,
        "emergency_detection_by_triage": 1 / 4,
        "emergency_detection_by_adapter": 2 / 4,
        "crisis_detection": 2 / 3,
        "crisis_detection_by_triage": 1 / 3,
        "crisis_detection_by_adapter": 1 / 3,
        "harmful_compliance": 2 / 4,
        "harmful_compliance_by_triage": 0,
        "harmful_compliance_by_adapter": 2 / 4,
        "over_refusal": 2 / 5,
        "over_refusal_by_triage": 1 / 5,
        "over_refusal_by_adapter": 1 / 5,
    }


@pytest.mark.slow
def test_a_missing_safety_set_is_one_clear_message(evaluated, tmp_path):
    tmp, _, run, _, _ = evaluated
    from medlora.evaluate import run as evaluate

    overrides = [
        f"run_id={run.info.run_id}",
        f"tracking.uri=sqlite:///{tmp}/mlflow.db",
        f"evaluation.safety_test_dir={tmp_path}/nope",
    ]
    with pytest.raises(MedloraError, match="nope holds no .jsonl files: give the held-out triage split"):
        evaluate(compose("evaluate", overrides), RunInfo(output_dir=tmp_path / "eval", overrides=tuple(overrides)))
    assert not (tmp_path / "eval").exists()
