"""Evaluate an adapter against its base model: perplexity, safety metrics, sample generations (conf/evaluate.yaml)."""

from medlora.cli import exit_on_user_error, run_info  # first: sets the project root, quiets import noise

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from medlora.evaluate import run  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> float:
    info = run_info()
    # sweepers read the returned value; a folder without a report is removed after an error
    return exit_on_user_error(lambda: run(cfg, info)["medical_perplexity"], info, results=("evaluation.json",))


if __name__ == "__main__":
    main()
