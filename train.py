"""Fine-tune a chat model with LoRA: `python train.py lora.rank=16`, sweeps with `-m`."""

from pathlib import Path

if __name__ == "__main__":
    from medlora.allocator import relaunch_for

    # before anything heavy: an allocator takes over a process only from its start
    relaunch_for(Path(__file__).resolve().parent / "conf", "train")

from medlora.cli import RunInfo, exit_on_user_error, run_info  # noqa: E402 - sets the project root, quiets import noise

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from medlora.config import validate  # noqa: E402
from medlora.data import build_data, load_splits  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    info = run_info()
    # a folder with an adapter or a checkpoint holds training worth keeping, even after an error
    return exit_on_user_error(lambda: train(cfg, info), info, results=("adapter", "checkpoints"))


def train(cfg: DictConfig, info: RunInfo) -> float:
    conversations = None
    build_data(cfg.data)  # a dataset made from its sources (data=safety_triage), before anything reads it
    if not info.sweep_dir:
        # a bad value or data file is reported before torch, transformers and peft load (about
        # ten seconds on 2 cores); a sweep job reports it after joining its MLflow parent run
        validate(cfg, libraries=False)
        conversations = load_splits(cfg.data, cfg.seed)
    from medlora.train import run

    return run(cfg, info, conversations)


if __name__ == "__main__":
    main()
