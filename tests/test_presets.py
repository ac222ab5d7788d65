"""Presets compose (no training): every experiment/ and debug/ preset, and the Optuna search."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from medlora.config import validate

from helpers import ROOT, conversation, write_jsonl

PRESETS = [
    (group, path.stem) for group in ("experiment", "debug") for path in sorted((ROOT / "conf" / group).glob("*.yaml"))
]


def _compose(*overrides: str, hydra: bool = False):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides), return_hydra_config=hydra)


def _set_keys(node: dict, prefix=""):
    """Dotted keys a preset file sets, without its defaults list."""
    for key, value in node.items():
        if key == "defaults":
            continue
        if isinstance(value, dict):
            yield from _set_keys(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


@pytest.mark.parametrize("group, name", PRESETS)
def test_preset_composes_validates_and_sets_only_what_changes(tmp_path, group, name):
    data = write_jsonl(tmp_path / "d.jsonl", [conversation("q", "a")])
    # a preset reading data from a path the user gives gets a real file here
    extra = [f"data.train_file={data}", f"data.eval_file={data}"] if name == "medquad_smollm2" else []
    cfg = _compose(f"{group}={name}", *extra)
    validate(cfg)
    preset = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / group / f"{name}.yaml"), resolve=False)
    # the base: the same group choices (`override /model: phi4_mini`), none of the preset's values
    base = _compose(
        *[
            f"{k.removeprefix('override /')}={v}"
            for entry in preset.get("defaults", [])
            if isinstance(entry, dict)
            for k, v in entry.items()
        ]
    )
    for key in _set_keys(preset):
        if key in ("data.train_file", "data.eval_file") and extra:
            continue
        # a key the base does not have (a block the preset adds) is not restated, whatever its value
        absent = object()
        assert OmegaConf.select(base, key, default=absent) != OmegaConf.select(cfg, key), (
            f"{group}/{name} restates {key}"
        )


def test_optuna_search_composes():
    cfg = _compose("hparams_search=lora_optuna", "model=tiny_random", hydra=True)
    sweeper = cfg.hydra.sweeper
    assert cfg.hydra.mode.name == "MULTIRUN" and "optuna" in sweeper._target_
    assert sweeper.direction == "minimize" and sweeper.max_failure_rate == 1.0 and sweeper.n_jobs == 1
    assert sweeper.study_name == "lora_tiny_random"
    assert sweeper.storage == f"sqlite:///{cfg.paths.sweep_dir}/optuna.db"
    assert set(sweeper.params) == {"lora.rank", "lora.alpha", "lora.dropout", "training.learning_rate"}
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler" and sweeper.sampler.seed is None
