"""Bad input through the real entry point: one clear message, non-zero exit, nothing left behind."""

from __future__ import annotations

import os

import pytest
import torch

from medlora.audit import verify
from medlora.cli import RunInfo, exit_on_user_error
from medlora.config import MedloraError

from helpers import TINY, conversation, train, write_jsonl

RESULTS = ("adapter", "checkpoints")  # what train.py keeps a failed run's folder for
GOOD = conversation("What is a fever?", "A body temperature above about 38 C (100.4 F).")


def _data(tmp, rows):
    return ["data=jsonl", f"data.train_file={write_jsonl(tmp / 'data.jsonl', rows)}"]


CASES = {
    "missing data file": (
        lambda tmp: ["data=jsonl", f"data.train_file={tmp}/nope.jsonl"],
        "data.train_file=",
        "does not exist",
    ),
    "malformed JSON line": (lambda tmp: _data(tmp, [GOOD, '{"messages": [']), "data.jsonl:2: not valid JSON", ""),
    "unknown role": (
        lambda tmp: _data(
            tmp, [GOOD, {"messages": [{"role": "nurse", "content": "hi"}, {"role": "assistant", "content": "a"}]}]
        ),
        "data.jsonl:2: message 0 has unknown role 'nurse'",
        "use one of system, user, assistant",
    ),
    "no assistant turn": (
        lambda tmp: _data(tmp, [GOOD, {"messages": [{"role": "user", "content": "hi"}]}]),
        "data.jsonl:2: the conversation has no assistant turn",
        "",
    ),
    "empty dataset": (lambda tmp: _data(tmp, []), "has no conversations", ""),
    "rank 0": (lambda tmp: ["lora.rank=0"], "lora.rank=0 is invalid", "positive integer"),
    "negative learning rate": (
        lambda tmp: ["training.learning_rate=-1e-4"],
        "training.learning_rate=-0.0001 is invalid",
        "1e-4 to 3e-4",
    ),
    "bad quantization": (
        lambda tmp: ["model.quantization=3bit"],
        "model.quantization='3bit' is invalid",
        "none, 4bit, 8bit",
    ),
    "jsonl without a file": (lambda tmp: ["data=jsonl"], "data.train_file is not set", ""),
    "cuda on a machine without one": (
        lambda tmp: ["device=cuda"],
        "device=cuda but PyTorch sees no CUDA GPU",
        "device=auto",
    ),
    # port 9 (discard) on loopback: nothing listens, the connection is refused at once
    "unreachable MLflow server": (
        lambda tmp: ["tracking.uri=http://127.0.0.1:9"],
        "cannot use the MLflow store tracking.uri=http://127.0.0.1:9",
        "tracking=none",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_one_clear_message(tmp_path, case):
    if case.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    overrides, message, fix = CASES[case]
    result = train(tmp_path, *TINY, *overrides(tmp_path))
    assert result.returncode == 2
    assert message in result.stderr and fix in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()  # no half-written run folder
    assert not (tmp_path / "mlflow.db").exists()  # and no MLflow run for a job that never started


def test_unknown_config_key_is_refused_by_hydra(tmp_path):
    result = train(tmp_path, *TINY, "lora.rnk=16")
    assert result.returncode != 0
    assert "Could not override 'lora.rnk'" in result.stderr and "Key 'rnk' not in 'Lora'" in result.stderr
    assert not (tmp_path / "run").exists()


def test_4bit_without_bitsandbytes_says_how_to_fix(tmp_path):
    hide = tmp_path / "hide"
    hide.mkdir()
    # sitecustomize runs at interpreter start: a None entry makes the package look uninstalled
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['bitsandbytes'] = None\n")
    os.environ["PYTHONPATH"] = str(hide)
    try:
        result = train(tmp_path, *TINY, "model.quantization=4bit")
    finally:
        del os.environ["PYTHONPATH"]
    assert result.returncode == 2
    assert "model.quantization=4bit needs the bitsandbytes package" in result.stderr
    assert "model.quantization=none" in result.stderr
    assert not (tmp_path / "run").exists()


def _fails(output_dir, trail: str):
    """A job that writes a log, opens the run's audit trail (and records in it) or not, then meets a bad value."""

    def job():
        from medlora.audit import AuditTrail

        output_dir.mkdir(parents=True)
        (output_dir / "train.log").write_text("starting\n")
        if trail != "none":
            opened = AuditTrail(output_dir / "audit.jsonl", actor="test")
            if trail == "recorded":
                opened.record("train_start")
        raise MedloraError("training.resume_from=/nope is not a checkpoint")

    return job


@pytest.mark.parametrize("trail", ["none", "opened", "recorded"])
def test_a_run_folder_is_removed_only_while_it_holds_no_audit_trail(tmp_path, capsys, trail):
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exited:
        exit_on_user_error(_fails(run, trail), RunInfo(output_dir=run), results=RESULTS)
    assert exited.value.code == 2
    assert capsys.readouterr().err == "error: training.resume_from=/nope is not a checkpoint\n"
    if trail == "none":
        assert not run.exists()  # a bad value before the trail opens leaves nothing
    else:
        assert sorted(p.name for p in run.iterdir()) == ["audit.jsonl", "train.log"]
        assert verify(run / "audit.jsonl")[0] == (trail == "recorded")  # an empty trail holds no entries
