"""Talk to a trained adapter through the safety layer, or export it: see conf/infer.yaml for every mode."""

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
from omegaconf import DictConfig  # noqa: E402

from medlora.config import MedloraError  # noqa: E402
from medlora.infer import run  # noqa: E402
from medlora.train import RunInfo  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="infer")
def main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    info = RunInfo(output_dir=Path(hydra_cfg.runtime.output_dir), overrides=tuple(hydra_cfg.overrides.task))
    try:
        run(cfg, info)
    except MedloraError as err:
        print(f"error: {err}", file=sys.stderr)
        if not (info.output_dir / "audit.jsonl").exists():
            # nothing was answered or exported: leave no session folder behind
            logging.shutdown()
            shutil.rmtree(info.output_dir, ignore_errors=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
