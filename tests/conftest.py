"""Tests run the real entry point (`python train.py ...`) on the tiny model, each in its own folders;
what they share lives in tests/helpers/, the fixtures here."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import ROOT, compose, forget_download, optuna_search, tiny_adapter

os.environ.setdefault("MEDLORA_ROOT", str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # CI has no Hub access: fail fast instead of retrying
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    # the workers share the cores: more torch threads than cores only make them wait on each other
    threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))


@pytest.fixture(scope="session")
def optuna_sweep(tmp_path_factory) -> Path:
    """One 3-trial Optuna search, shared by the tests that only read it."""
    tmp = tmp_path_factory.mktemp("optuna")
    result = optuna_search(tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A tiny adapter saved and logged as train.py does (helpers.tiny_adapter), one per test module."""
    made = tiny_adapter(tmp_path_factory.mktemp("adapter"))
    yield made
    forget_download(made["run_id"])


@pytest.fixture
def cfg_train(tmp_path):
    """The config `python train.py <overrides>` runs with, its run folder and MLflow store in tmp_path:
    `cfg_train("lora.rank=4")`, for tests that drive the recipe in process."""

    def make(*overrides: str):
        given = {o.split("=")[0] for o in overrides}
        own = [
            f"paths.output_dir={tmp_path}",
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
            f"tracking.artifact_location={tmp_path}/artifacts",
        ]
        return compose("train", [*[o for o in own if o.split("=")[0] not in given], *overrides])

    return make


@pytest.fixture(scope="session")
def tokenizer():
    """The SmolLM2 tokenizer, from the dequantized embedded model (made once, cached)."""

    from medlora.config import option
    from medlora.model import load_tokenizer, resolve_checkpoint

    model_cfg = option("model", "tiny_random")
    _, tokenizer_path = resolve_checkpoint(model_cfg, str(ROOT / ".cache"), seed=42)
    return load_tokenizer(tokenizer_path)
