"""What every Hydra entry point (train.py, infer.py, evaluate.py) does around its job.

Import this before anything heavy: it sets the project root that conf/paths reads and quiets
import-time noise that asks nothing of the user.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
os.environ.setdefault("MEDLORA_ROOT", str(ROOT))  # conf/paths derives every path from it
# bitsandbytes looks for an optional Hub kernel at import (its CPU path works without it), and
# peft calls a transformers method renamed in v5
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402

from medlora.config import MedloraError  # noqa: E402

log = logging.getLogger("medlora")


@dataclass
class RunInfo:
    """Where Hydra put this job, and whether it belongs to a sweep."""

    output_dir: Path
    sweep_dir: str | None = None
    overrides: tuple[str, ...] = ()


def run_info() -> RunInfo:
    """Where Hydra put this job, and the sweep it belongs to (None for a single run)."""
    hydra_cfg = HydraConfig.get()
    sweeping = hydra_cfg.mode == RunMode.MULTIRUN
    return RunInfo(
        output_dir=Path(hydra_cfg.runtime.output_dir),
        sweep_dir=str(Path(hydra_cfg.sweep.dir).resolve()) if sweeping else None,
        overrides=tuple(hydra_cfg.overrides.task),
    )


# a run folder holding one of these is never removed: the audit trail exists from the moment it
# opens, and the record of a run that began is kept even when the run then fails
KEPT = ("audit.jsonl",)


def exit_on_user_error(job: Callable, info, results: tuple[str, ...]):
    """Run `job`; a MedloraError becomes one message and exit 2, and a run folder holding none of
    `results` (nor an audit trail) is removed, so nothing that looks like a result is left. In a
    sweep the error is re-raised instead: Hydra records that job as failed and runs the rest."""
    try:
        return job()
    except MedloraError as err:
        if info.sweep_dir:
            log.error("%s", err)
            raise
        print(f"error: {err}", file=sys.stderr)
        if not any((info.output_dir / name).exists() for name in (*KEPT, *results)):
            logging.shutdown()
            shutil.rmtree(info.output_dir, ignore_errors=True)
        sys.exit(2)
