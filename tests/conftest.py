"""Tests run the real entry point (`python train.py ...`) on the tiny model, each in its own folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("MEDLORA_ROOT", str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # CI has no Hub access: fail fast instead of retrying
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    # the workers share the cores: more torch threads than cores only make them wait on each other
    threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
MEDQUAD = ROOT.parent / "shared" / "data" / "medquad"

# what training.allocator=auto runs on after `make install`: cmeel-mimalloc is a dependency on Linux
AUTO_ALLOCATOR = "mimalloc" if sys.platform.startswith("linux") else "system"
TINY = ["model=tiny_random", "training.max_seq_len=256"]
# each job of a sweep test: two steps on four examples
SWEEP_JOB = [*TINY, "training.max_steps=2", "training.batch_size=2", "training.gradient_accumulation_steps=1",
             "data.max_train_samples=4", "data.max_eval_samples=4"]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def conversation(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def isolated(tmp: Path) -> list[str]:
    """Overrides that keep a run's folders and MLflow store inside `tmp`."""
    return [f"hydra.run.dir={tmp}/run", f"hydra.sweep.dir={tmp}/sweep",
            f"tracking.uri=sqlite:///{tmp}/mlflow.db", f"tracking.artifact_location={tmp}/artifacts"]


def train(tmp: Path, *overrides: str, multirun: bool = False, timeout: int = 600) -> subprocess.CompletedProcess:
    given = {o.split("=")[0] for o in overrides}
    defaults = [o for o in isolated(tmp) if o.split("=")[0] not in given]
    cmd = [sys.executable, str(ROOT / "train.py"), *(["-m"] if multirun else []), *defaults, *overrides]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def optuna_search(tmp: Path, *overrides: str, n_trials: int = 3, sweep: str = "sweep") -> subprocess.CompletedProcess:
    """`python train.py hparams_search=lora_optuna` on the tiny model, its study in tmp/optuna.db."""
    given = {o.split("=")[0] for o in overrides}
    defaults = ["hparams_search=lora_optuna", f"hydra.sweeper.n_trials={n_trials}",
                f"hydra.sweeper.storage=sqlite:///{tmp}/optuna.db", f"hydra.sweep.dir={tmp}/{sweep}"]
    return train(tmp, *[o for o in defaults if o.split("=")[0] not in given], *SWEEP_JOB, *overrides)


@pytest.fixture(scope="session")
def optuna_sweep(tmp_path_factory) -> Path:
    """One 3-trial Optuna search, shared by the tests that only read it."""
    tmp = tmp_path_factory.mktemp("optuna")
    result = optuna_search(tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp


def compose(name: str, overrides: list[str]):
    """The config `python <name>.py <overrides>` runs with, composed in-process."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name=name, overrides=overrides)


@pytest.fixture
def cfg_train(tmp_path):
    """The config `python train.py <overrides>` runs with, its run folder and MLflow store in tmp_path:
    `cfg_train("lora.rank=4")`, for tests that drive the recipe in process."""

    def make(*overrides: str):
        given = {o.split("=")[0] for o in overrides}
        own = [f"paths.output_dir={tmp_path}", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
               f"tracking.artifact_location={tmp_path}/artifacts"]
        return compose("train", [*[o for o in own if o.split("=")[0] not in given], *overrides])

    return make


def mlflow_client(tmp: Path):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")


@pytest.fixture(scope="session")
def tokenizer():
    """The SmolLM2 tokenizer, from the dequantized embedded model (made once, cached)."""
    from omegaconf import OmegaConf

    from medlora.model import load_tokenizer, resolve_checkpoint

    model_cfg = OmegaConf.load(ROOT / "conf" / "model" / "tiny_random.yaml")
    _, tokenizer_path = resolve_checkpoint(model_cfg, str(ROOT / ".cache"), seed=42)
    return load_tokenizer(tokenizer_path)
