"""Fine-tune a chat model with LoRA: `python train.py lora.rank=16`, sweeps with `-m`."""

import logging
import os
import shutil
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent
os.environ.setdefault("MEDLORA_ROOT", str(ROOT))  # conf/paths derives every path from it
# noise that asks nothing of the user: bitsandbytes looks for an optional Hub kernel at import
# (its CPU path works without it), and peft calls a transformers method renamed in v5
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from medlora.config import MedloraError  # noqa: E402
from medlora.train import RunInfo, run  # noqa: E402

log = logging.getLogger("medlora")


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    hydra_cfg = HydraConfig.get()
    sweeping = hydra_cfg.mode == RunMode.MULTIRUN
    info = RunInfo(output_dir=Path(hydra_cfg.runtime.output_dir),
                   sweep_dir=str(Path(hydra_cfg.sweep.dir).resolve()) if sweeping else None,
                   overrides=tuple(hydra_cfg.overrides.task))
    try:
        return run(cfg, info)
    except MedloraError as err:
        if sweeping:
            log.error("%s", err)
            raise  # Hydra records this job as failed and runs the rest of the sweep
        print(f"error: {err}", file=sys.stderr)
        if not any((info.output_dir / name).exists() for name in ("adapter", "checkpoints")):
            # nothing was trained: leave no run folder that looks like a result
            logging.shutdown()
            shutil.rmtree(info.output_dir, ignore_errors=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
