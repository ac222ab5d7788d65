"""What the tests share: the project's folders, the tiny-model overrides, and helpers that run the
real entry points (`runs`), write test data (`data`) and make synthetic clinical notes (`phi_synthetic`)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MEDQUAD = ROOT.parent / "shared" / "data" / "medquad"

# what training.allocator=auto runs on after `make install`: cmeel-mimalloc is a dependency on Linux
AUTO_ALLOCATOR = "mimalloc" if sys.platform.startswith("linux") else "system"
TINY = ["model=tiny_random", "training.max_seq_len=256"]
# each job of a sweep test: two steps on four examples
# fp32, no dropout, one micro-batch per optimizer step and a constant rate: runs whose figures can be
# compared to the last digit (a reload, a resume, an evaluation of the same adapter)
EXACT = [
    "precision=fp32",
    "lora.dropout=0",
    "training.gradient_accumulation_steps=1",
    "training.lr_scheduler=constant",
    "training.warmup_ratio=0",
]
SWEEP_JOB = [
    *TINY,
    "training.max_steps=2",
    "training.batch_size=2",
    "training.gradient_accumulation_steps=1",
    "data.max_train_samples=4",
    "data.max_eval_samples=4",
]

from helpers.data import conversation, write_jsonl  # noqa: E402
from helpers.runs import (  # noqa: E402
    compose,
    forget_download,
    infer,
    isolated,
    mlflow_client,
    optuna_search,
    start_train,
    tiny_adapter,
    train,
)

__all__ = [
    "AUTO_ALLOCATOR",
    "MEDQUAD",
    "ROOT",
    "SWEEP_JOB",
    "TINY",
    "compose",
    "conversation",
    "forget_download",
    "infer",
    "isolated",
    "mlflow_client",
    "optuna_search",
    "start_train",
    "tiny_adapter",
    "train",
    "write_jsonl",
]
