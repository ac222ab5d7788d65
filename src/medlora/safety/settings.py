"""The medical safety settings (conf/safety/medical.yaml over the schema in medlora/config/safety.py)
for code that runs outside Hydra (the `screen` command, library use): the reply texts, numbers and
messages live in the schema and nowhere else."""

from __future__ import annotations

import functools
import os
from pathlib import Path

from omegaconf import OmegaConf

from medlora.config import option

ROOT = Path(os.environ.get("MEDLORA_ROOT") or Path(__file__).resolve().parents[3])


@functools.lru_cache(maxsize=1)
def medical_defaults() -> dict:
    return OmegaConf.to_container(option("safety", "medical"), resolve=True)
