"""Talk to a trained adapter through the safety layer, or export it: see conf/infer.yaml for every mode."""

from medlora.cli import exit_on_user_error, run_info  # first: sets the project root, quiets import noise

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from medlora.infer.session import run  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="infer")
def main(cfg: DictConfig) -> None:
    info = run_info()
    # a session that answered or exported anything has an audit trail worth keeping
    exit_on_user_error(lambda: run(cfg, info), info, results=("audit.jsonl",))


if __name__ == "__main__":
    main()
