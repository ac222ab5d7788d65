"""`python infer.py` on the tiny model: one prompt, a batch file and a chat, all through the safety layer."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch

from medlora.cli import RunInfo
from medlora.config import MedloraError, option

from helpers import compose, infer, write_jsonl

TOKENS = 12  # new tokens per reply: the random model never stops on its own
FAST = [f"inference.max_new_tokens={TOKENS}", "precision=fp32"]  # fp32: replies comparable to the last token
EMERGENCY = "my dad is having crushing chest pain right now and he is sweating"
EMERGENCY_NUMBER = option("safety", "medical").triage.emergency_number


def audit_entries(tmp: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp / "session" / "audit.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def assistant(adapter, tmp_path_factory):
    """The in-process pipeline: the same objects infer.py builds, with the audit trail in a temp folder."""
    from medlora.infer.assistant import Assistant
    from medlora.infer.session import open_audit
    from medlora.infer.sources import Source, load_adapter_model

    cfg = compose("infer", ["model=tiny_random", *FAST, "inference.batch_size=2"])
    source = Source(adapter["dir"])
    model, tokenizer, _ = load_adapter_model(cfg, source, "cpu", "fp32")
    audit = open_audit(cfg, tmp_path_factory.mktemp("session"), source, "0" * 64)
    return Assistant(model, tokenizer, cfg, audit, "0" * 64), cfg


def reference_reply(adapter: dict, prompt: str) -> str:
    """Greedy generation with plain transformers + peft: system prompt, chat template, generate, decode."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    safety = option("safety", "medical")
    tokenizer = AutoTokenizer.from_pretrained(adapter["dir"])
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(adapter["base_path"], dtype=torch.float32), adapter["dir"]
    ).merge_and_unload()
    messages = [{"role": "system", "content": safety.system_prompt}, {"role": "user", "content": prompt}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, do_sample=False, max_new_tokens=TOKENS, repetition_penalty=1.1)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


@pytest.mark.slow
def test_one_prompt_from_an_mlflow_run_answers_like_plain_transformers(adapter, tmp_path):
    """runs:/<id> brings back the run's model (tiny_random) and safety settings; the reply is exactly what
    plain transformers generates from the same context, plus the configured disclaimer."""
    prompt = "What is anemia?"
    result = infer(
        tmp_path, f"adapter=runs:/{adapter['run_id']}", f"tracking.uri={adapter['uri']}", f"prompt={prompt}", *FAST
    )
    assert result.returncode == 0, result.stderr[-3000:]
    disclaimer = option("safety", "medical").output_checks.disclaimer
    assert result.stdout == f"{reference_reply(adapter, prompt)}\n\n{disclaimer}\n"
    assert "time to first token" in result.stderr and "tokens/s" in result.stderr
    assert f"MLflow run {adapter['run_id']}" in result.stderr and "tiny_random_llama" in result.stderr

    triage, check = audit_entries(tmp_path)
    assert (triage["event_type"], triage["outcome"]) == ("inference_triage", "allow")
    assert triage["inputs"]["prompt"] == hashlib.sha256(prompt.encode()).hexdigest()
    assert (check["event_type"], check["outcome"]) == ("output_check", "pass")
    assert check["counts"]["new_tokens"] == TOKENS
    assert check["prev_hash"] == triage["entry_hash"]
    assert prompt not in (tmp_path / "session" / "audit.jsonl").read_text()  # hashes and counts only


def test_triage_answers_an_emergency_without_calling_the_model(assistant, monkeypatch):
    helper, cfg = assistant
    monkeypatch.setattr(helper.model, "generate", lambda *a, **k: pytest.fail("the model was called"))
    before = helper.audit.seq
    reply = helper.reply([{"role": "user", "content": EMERGENCY}])
    assert (reply.action, reply.model_called) == ("emergency", False)
    assert f"Call {cfg.safety.triage.emergency_number} now" in reply.text
    lines = helper.audit.path.read_text().splitlines()[before:]
    assert [json.loads(line)["event_type"] for line in lines] == [
        "inference_triage"
    ]  # no output check: nothing generated
    assert json.loads(lines[0])["rule_ids"] == sorted(reply.rule_ids)


def test_raw_text_reaches_the_audit_only_when_asked(assistant, monkeypatch):
    helper, _ = assistant
    monkeypatch.setattr(helper, "include_raw", True)  # safety.audit.include_raw=true
    helper.reply([{"role": "user", "content": EMERGENCY}])
    entry = json.loads(helper.audit.path.read_text().splitlines()[-1])
    assert entry["raw"] == {"prompt": EMERGENCY}


def test_streaming_never_shows_a_sentence_the_output_checks_remove():
    """The stream holds back to the last sentence that passed; the rest comes from the checked reply."""
    from medlora.infer.assistant import SafetyLayer, _ReleaseGate

    safety = SafetyLayer(option("safety", "medical"))
    shown = []
    gate = _ReleaseGate(lambda text: safety.check_output(text).action == "pass", shown.append)
    raw = "Rest and drink fluids. You definitely have pneumonia. See a clinician if it gets worse."
    for word in raw.split(" "):
        gate.add(word + " ")
    assert "".join(shown) == "Rest and drink fluids."
    final = safety.check_output(raw)
    assert final.action == "rewrite" and "definitely" not in final.text
    gate.finish(final.text)
    assert "".join(shown) == final.text


def test_batches_answer_exactly_as_one_by_one(assistant):
    """Left padding and batching (batch_size=2, prompts of different lengths) change no token."""
    helper, _ = assistant
    prompts = [
        "What is anemia?",
        "How is asthma treated in children who also have eczema and hay fever?",
        "Why get a flu shot?",
        "What does TSH test, and when should it be repeated?",
        "What is gout?",
    ]
    conversations = [[{"role": "user", "content": p}] for p in prompts]
    batched = helper.reply_batch(conversations)
    single = [helper.reply(c) for c in conversations]
    assert [r.raw for r in batched] == [r.raw for r in single]
    assert [r.new_tokens for r in batched] == [TOKENS] * len(prompts)
    assert all(r.ttft_s > 0 and r.tokens_per_second > 0 for r in batched)


def test_a_prompt_file_gives_a_response_file(adapter, tmp_path):
    rows = [
        {"id": "a", "prompt": "What is anemia?"},
        {"prompt": EMERGENCY},
        {
            "id": "c",
            "messages": [
                {"role": "user", "content": "What is gout?"},
                {"role": "assistant", "content": "A kind of arthritis."},
                {"role": "user", "content": "How is it treated?"},
            ],
        },
    ]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", rows)
    output = tmp_path / "out" / "responses.jsonl"
    result = infer(
        tmp_path, f"adapter={adapter['dir']}", f"input={prompts}", f"output={output}", "tracking=none", *FAST
    )
    assert result.returncode == 0, result.stderr[-3000:]
    answers = [json.loads(line) for line in output.read_text().splitlines()]
    assert [a["line"] for a in answers] == [1, 2, 3] and [a.get("id") for a in answers] == ["a", None, "c"]
    assert answers[2]["prompt"] == "How is it treated?"
    assert (answers[1]["action"], answers[1]["model_called"], answers[1]["new_tokens"]) == ("emergency", False, 0)
    for answer in (answers[0], answers[2]):
        assert answer["model_called"] and answer["new_tokens"] == TOKENS and answer["action"] == "pass"
        assert answer["ttft_s"] > 0 and answer["tokens_per_second"] > 0
    assert "batch: 3 prompts (1 answered by triage)" in result.stderr and "tokens/s" in result.stderr
    events = [e["event_type"] for e in audit_entries(tmp_path)]
    assert events.count("inference_triage") == 3 and events.count("output_check") == 2


def test_chat_streams_replies_and_keeps_the_history(adapter, tmp_path):
    stdin = "What is anemia?\nHow is it treated?\n/reset\nWhat is gout?\n/exit\n"
    result = infer(tmp_path, f"adapter={adapter['dir']}", "chat=true", "tracking=none", *FAST, stdin=stdin)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("assistant> ") == 3 and result.stdout.count("you> ") == 5
    turns = [e["counts"]["turns"] for e in audit_entries(tmp_path) if e["event_type"] == "inference_triage"]
    assert turns == [1, 3, 1]  # the second message sees the first exchange; /reset clears it


def test_chat_stays_on_the_emergency_path_until_reset(adapter, tmp_path):
    follow_up = "thanks. what is a normal resting heart rate?"
    stdin = f"{EMERGENCY}\n{follow_up}\n/reset\n{follow_up}\n/exit\n"
    result = infer(tmp_path, f"adapter={adapter['dir']}", "chat=true", "tracking=none", *FAST, stdin=stdin)
    assert result.returncode == 0, result.stderr[-3000:]
    triaged = [e for e in audit_entries(tmp_path) if e["event_type"] == "inference_triage"]
    assert [e["outcome"] for e in triaged] == ["emergency", "emergency", "allow"]
    # the follow-up alone would be allowed: inside the emergency it stays on that path; after /reset it is fresh
    assert "sticky" in triaged[1]["source"].split("+") and triaged[2]["counts"]["turns"] == 1
    assert result.stdout.count(f"Call {EMERGENCY_NUMBER} now") == 2


def test_a_missing_adapter_folder_is_one_clear_message(tmp_path):
    result = infer(tmp_path, f"adapter={tmp_path}/nope", "prompt=hi", "tracking=none")
    assert result.returncode == 2
    assert f"error: adapter={tmp_path}/nope does not exist" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "session").exists()


def _input(tmp: Path, *lines: str) -> str:
    path = tmp / "prompts.jsonl"
    path.write_text("".join(f"{line}\n" for line in lines))
    return f"input={path}"


GOOD_LINE, CUT_LINE, WRONG_KEY = '{"prompt": "hi"}', '{"prompt": ', '{"question": "hi"}'
BAD = {
    "unknown run id": (
        lambda a, t: ["adapter=runs:/0123456789abcdef0123456789abcdef", f"tracking.uri={a['uri']}", "prompt=hi"],
        "no MLflow run 0123456789abcdef0123456789abcdef",
    ),
    "adapter from another base model": (
        lambda a, t: [f"adapter={a['dir']}", "model=tiny_random", "model.random_init.hidden_size=32", "prompt=hi"],
        "was trained on base model",
    ),
    "empty prompt file": (lambda a, t: [f"adapter={a['dir']}", _input(t)], "holds no prompts"),
    "malformed line": (
        lambda a, t: [f"adapter={a['dir']}", _input(t, GOOD_LINE, CUT_LINE)],
        "prompts.jsonl:2: not valid JSON",
    ),
    "line without a prompt": (
        lambda a, t: [f"adapter={a['dir']}", _input(t, WRONG_KEY)],
        'prompts.jsonl:1: expected {"prompt": "..."}',
    ),
    "empty prompt": (lambda a, t: [f"adapter={a['dir']}", "prompt=''"], "prompt is empty"),
    "two modes": (lambda a, t: [f"adapter={a['dir']}", "prompt=hi", "chat=true"], "not prompt and chat"),
    "no adapter": (lambda a, t: ["prompt=hi"], "no adapter given"),
    "missing triage model": (
        lambda a, t: [f"adapter={a['dir']}", "prompt=hi", f"safety.triage.model={t}/nope"],
        "nope does not exist: rebuild it with `make safety-model`",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_refused_before_anything_is_written(adapter, tmp_path, case):
    from medlora.infer.session import run

    overrides, message = BAD[case]
    overrides = [*overrides(adapter, tmp_path), f"output={tmp_path}/responses.jsonl"]
    cfg = compose("infer", overrides)
    with pytest.raises(MedloraError, match=re.escape(message)):
        run(cfg, RunInfo(output_dir=tmp_path / "session", overrides=tuple(overrides)))
    assert not (tmp_path / "responses.jsonl").exists()
    assert not (tmp_path / "session").exists()
