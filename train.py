"""Fine-tune a chat model with LoRA: `python train.py lora.rank=16`, sweeps with `-m`."""

from pathlib import Path

if __name__ == "__main__":
    from medlora.allocator import relaunch_for

    # before anything heavy: an allocator takes over a process only from its start
    relaunch_for(Path(__file__).resolve().parent / "conf", "train")

from medlora.cli import exit_on_user_error, run_info  # noqa: E402 - sets the project root, quiets import noise

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from medlora.train import run  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    info = run_info()
    # a folder with an adapter or a checkpoint holds training worth keeping, even after an error
    return exit_on_user_error(lambda: run(cfg, info), info, results=("adapter", "checkpoints"))


if __name__ == "__main__":
    main()
