"""Run the real entry points (`python train.py`, `python infer.py`) in their own folders, compose
their configs in process, and make a tiny adapter as train.py would save and log it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

from helpers import ROOT, SWEEP_JOB


def isolated(tmp: Path) -> list[str]:
    """Overrides that keep a run's folders and MLflow store inside `tmp`."""
    return [
        f"hydra.run.dir={tmp}/run",
        f"hydra.sweep.dir={tmp}/sweep",
        f"tracking.uri=sqlite:///{tmp}/mlflow.db",
        f"tracking.artifact_location={tmp}/artifacts",
    ]


def train(tmp: Path, *overrides: str, multirun: bool = False, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        _train_command(tmp, overrides, multirun),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def start_train(tmp: Path, *overrides: str) -> subprocess.Popen:
    """`python train.py` as train() runs it, without waiting: for a test that acts while it trains."""
    return subprocess.Popen(
        _train_command(tmp, overrides, multirun=False),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _train_command(tmp: Path, overrides, multirun: bool) -> list[str]:
    given = {o.split("=")[0] for o in overrides}
    defaults = [o for o in isolated(tmp) if o.split("=")[0] not in given]
    return [sys.executable, str(ROOT / "train.py"), *(["-m"] if multirun else []), *defaults, *overrides]


def optuna_search(tmp: Path, *overrides: str, n_trials: int = 3, sweep: str = "sweep") -> subprocess.CompletedProcess:
    """`python train.py hparams_search=lora_optuna` on the tiny model, its study in tmp/optuna.db."""
    given = {o.split("=")[0] for o in overrides}
    defaults = [
        "hparams_search=lora_optuna",
        f"hydra.sweeper.n_trials={n_trials}",
        f"hydra.sweeper.storage=sqlite:///{tmp}/optuna.db",
        f"hydra.sweep.dir={tmp}/{sweep}",
    ]
    return train(tmp, *[o for o in defaults if o.split("=")[0] not in given], *SWEEP_JOB, *overrides)


def infer(tmp: Path, *overrides: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "infer.py"), f"hydra.run.dir={tmp}/session", *overrides]
    return subprocess.run(
        cmd,
        cwd=ROOT,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def compose(name: str, overrides: list[str]):
    """The config `python <name>.py <overrides>` runs with, composed in-process."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name=name, overrides=overrides)


def mlflow_client(tmp: Path):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")


def forget_download(run_id: str) -> None:
    """infer.py caches a run's artifacts under paths.cache_dir; a test's runs are not worth keeping."""
    shutil.rmtree(ROOT / ".cache" / "runs" / run_id, ignore_errors=True)


def tiny_adapter(tmp: Path) -> dict:
    """A LoRA adapter with random non-zero weights on tiny_random, saved and logged the way train.py does:
    `<run>/adapter` (weights + tokenizer) beside `<run>/config_resolved.yaml`, and an MLflow run holding both."""
    import torch
    from mlflow import MlflowClient
    from peft import LoraConfig, get_peft_model

    from medlora.model import load_model, load_tokenizer, resolve_checkpoint

    cfg = compose("infer", ["model=tiny_random"])
    base_path, tokenizer_path = resolve_checkpoint(cfg.model, cfg.paths.cache_dir, cfg.seed)
    torch.manual_seed(0)
    # init_lora_weights=False: B is random too, so the adapter changes every output
    model = get_peft_model(
        load_model(base_path, cfg.model, "fp32", "cpu"),
        LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM"),
    )
    run_dir = tmp / "run"
    model.save_pretrained(run_dir / "adapter")
    load_tokenizer(tokenizer_path).save_pretrained(run_dir / "adapter")
    trained = {
        **OmegaConf.to_container(OmegaConf.masked_copy(cfg, ["model", "safety"]), resolve=True),
        "seed": cfg.seed,
    }
    (run_dir / "config_resolved.yaml").write_text(OmegaConf.to_yaml(trained))
    uri = f"sqlite:///{tmp}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("medlora", artifact_location=(tmp / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    client.log_artifacts(run_id, str(run_dir / "adapter"), "adapter")
    client.log_artifact(run_id, str(run_dir / "config_resolved.yaml"))
    client.set_terminated(run_id)
    return {"dir": run_dir / "adapter", "run_id": run_id, "uri": uri, "base_path": base_path, "tmp": tmp}
