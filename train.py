"""Fine-tune a chat model with LoRA: `python train.py lora.rank=16`, sweeps with `-m`.

Only light modules load at the top (Hydra, the config checks, the data readers): torch,
transformers and peft load inside train(), after the allocator relaunch at the bottom.
"""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from medlora.allocator import relaunch_for
from medlora.cli import RunInfo, exit_on_user_error, run_info
from medlora.config import validate
from medlora.data import build_data, load_splits


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    info = run_info()
    # a folder with an adapter or a checkpoint holds training worth keeping, even after an error
    return exit_on_user_error(lambda: train(cfg, info), info, results=("adapter", "checkpoints"))


def train(cfg: DictConfig, info: RunInfo) -> float:
    conversations = None
    build_data(cfg.data)  # a dataset made from its sources (data=safety_triage), before anything reads it
    if not info.sweep_dir:
        # a bad value or data file is reported before torch, transformers and peft load (seconds
        # of imports); a sweep job reports it after joining its MLflow parent run
        validate(cfg, libraries=False)
        conversations = load_splits(cfg.data, cfg.seed)
    from medlora.train import run

    return run(cfg, info, conversations)


if __name__ == "__main__":
    # first: an allocator takes over a process only from its start, so this restarts under
    # training.allocator before anything heavy loads
    relaunch_for(Path(__file__).resolve().parent / "conf", "train")
    main()
