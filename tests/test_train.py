"""`python train.py` on the tiny model: it overfits, tracks to MLflow, saves a reloadable adapter, resumes."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from helpers import EXACT, TINY, conversation, mlflow_client, train, write_jsonl

STEPS = 16
QA = [
    ("What is hypertension?", "Blood pressure that stays at or above 130/80 mm Hg."),
    ("What does LDL measure?", "The cholesterol carried by low-density lipoprotein."),
    ("How is asthma treated?", "With inhaled controllers and a reliever inhaler for symptoms."),
    ("What is a normal resting heart rate?", "For adults it is usually 60 to 100 beats per minute."),
    ("What is anemia?", "Too few red blood cells or too little hemoglobin to carry oxygen."),
    ("Why get a flu shot?", "It lowers the chance of flu and of severe illness every season."),
    ("What does TSH test?", "How well the thyroid gland is working."),
    ("What is eczema?", "A condition that makes skin dry, itchy and inflamed."),
]

# fp32 and no dropout make the maths exact, so reload and resume can be compared to the last digit
OVERFIT = [
    *TINY,
    *EXACT,
    "data=jsonl",
    f"training.max_steps={STEPS}",
    "training.batch_size=4",
    "training.learning_rate=1e-2",
    "training.save_every=8",
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tiny")
    path = write_jsonl(tmp / "qa.jsonl", [conversation(q, a) for q, a in QA])
    overrides = [*OVERFIT, f"data.train_file={path}", f"data.eval_file={path}"]
    result = train(tmp, *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    client = mlflow_client(tmp)
    (run,) = client.search_runs([client.get_experiment_by_name("medlora").experiment_id])
    return tmp, overrides, result, client, run


def test_overfits_a_tiny_set(tiny_run):
    _, _, _, client, run = tiny_run
    assert run.info.status == "FINISHED"
    before, after = run.data.metrics["eval_loss_before"], run.data.metrics["eval_loss"]
    assert before > 10.5  # a random model starts near ln(49152) = 10.8
    assert after < before - 2.0
    assert run.data.metrics["eval_perplexity"] == pytest.approx(math.exp(after))
    losses = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in losses] == list(range(1, STEPS + 1))
    assert losses[-1].value < losses[0].value - 2.0


def test_console_shows_progress_and_where_the_run_is(tiny_run):
    _, _, result, _, run = tiny_run
    out = result.stdout + result.stderr
    for expected in (
        "loss=",
        "lr=",
        "tok_s=",
        "before training: eval loss",
        "after training:",
        f"/runs/{run.info.run_id}",
        "trainable of",
    ):
        assert expected in out


def test_mlflow_has_params_tags_metrics_and_artifacts(tiny_run):
    tmp, _, _, client, run = tiny_run
    params, tags = run.data.params, run.data.tags
    assert params["lora.rank"] == "32" and params["lora.alpha"] == "64"
    assert params["training.learning_rate"] == "0.01"
    assert params["model.base_model"] == "tiny_random_llama"
    assert params["resolved_precision"] == "fp32"
    assert int(params["trainable_params"]) > 0
    assert tags["model"] == "tiny_random_llama" and tags["host"] and tags["git_commit"]
    assert "training.learning_rate=1e-2" in tags["hydra_overrides"]
    for name in ("tokens_per_second", "learning_rate", "grad_norm", "eval_perplexity_before", "train_conversations"):
        assert name in run.data.metrics
    assert run.data.metrics["train_conversations"] == len(QA)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"adapter", "config_resolved.yaml", "train.log"} <= artifacts
    adapter = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json"} <= adapter


def _eval_loss(adapter_dir, eval_file) -> float:
    """Load base + adapter the plain peft way and score the eval set with the training code's metric."""
    from accelerate import Accelerator
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medlora import batching, data
    from medlora.config import option
    from medlora.fast import compat
    from medlora.loss import mean_loss

    base = AutoModelForCausalLM.from_pretrained(
        PeftConfig.from_pretrained(adapter_dir).base_model_name_or_path, dtype=torch.float32
    )
    model = PeftModel.from_pretrained(base, adapter_dir)
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    prompt = option("safety", "medical").system_prompt
    examples, _ = data.tokenize_dataset(data.load_conversations(eval_file), tokenizer, prompt, 256, "truncate")
    loader = batching.make_loader(examples, 4, tokenizer.pad_token_id, seed=0, train=False)
    compat.reset_accelerator_state()  # other tests may have set bf16 in this process
    return mean_loss(model, loader, Accelerator(cpu=True, mixed_precision="no"))["eval_loss"]


def test_saved_adapter_reloads_with_the_same_outputs(tiny_run):
    tmp, _, _, _, run = tiny_run
    reloaded = _eval_loss(tmp / "run" / "adapter", tmp / "qa.jsonl")
    assert reloaded == pytest.approx(run.data.metrics["eval_loss"], rel=1e-6)


@pytest.mark.slow
def test_resume_from_checkpoint_matches_an_uninterrupted_run(tiny_run, tmp_path):
    tmp, overrides, _, _, run = tiny_run
    checkpoint = tmp / "run" / "checkpoints" / "step_8"
    assert (checkpoint / "adapter_model.safetensors").is_file()
    resumed = train(tmp_path, *overrides, f"training.resume_from={checkpoint}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    client = mlflow_client(tmp_path)
    (again,) = client.search_runs([client.get_experiment_by_name("medlora").experiment_id])
    assert again.data.metrics["eval_loss"] == pytest.approx(run.data.metrics["eval_loss"], rel=1e-5)


@pytest.mark.slow
def test_mlflow_ui_serves_the_same_store(tiny_run):
    """What `make ui` starts: the MLflow server over the run's SQLite store, on loopback only."""
    tmp, _, _, _, run = tiny_run
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mlflow = Path(sys.executable).parent / "mlflow"
    server = subprocess.Popen(
        [
            str(mlflow),
            "ui",
            "--backend-store-uri",
            f"sqlite:///{tmp}/mlflow.db",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180  # the server starts in 10-40 s on 2 busy cores
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        request = urllib.request.Request(f"{base}/api/2.0/mlflow/runs/get?run_id={run.info.run_id}")
        served = json.load(urllib.request.urlopen(request, timeout=10))["run"]
        assert served["info"]["status"] == "FINISHED"
        assert {"key": "lora.rank", "value": "32"} in served["data"]["params"]
        listing = json.load(
            urllib.request.urlopen(
                f"{base}/ajax-api/2.0/mlflow/artifacts/list?run_uuid={run.info.run_id}&path=adapter", timeout=10
            )
        )
        assert "adapter/adapter_model.safetensors" in {f["path"] for f in listing["files"]}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
