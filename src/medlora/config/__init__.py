"""Check the composed config once, before anything slow happens, and resolve `auto` values.

Each group's settings, defaults and checks live in medlora.config.schema; this module adds what
joins groups or needs a library (a `_target_` that must import, a scheduler name transformers
knows). Light on purpose: train.py checks a single run's config before torch, transformers and
peft load.
"""

from __future__ import annotations

import importlib.util

import yaml
from omegaconf import DictConfig, OmegaConf

from medlora.config.checks import MedloraError, require, require_positive
from medlora.config.groups import (
    PRECISIONS,
    QUANTIZATIONS,
    Data,
    Evaluation,
    Inference,
    Lora,
    Model,
    Paths,
    Tracking,
    Training,
)
from medlora.config.safety import Safety
from medlora.config.schema import ROOT, Group, build, store_node

GROUPS: dict[str, type[Group]] = {
    g.key: g for g in (Model, Lora, Training, Data, Safety, Tracking, Inference, Evaluation, Paths)
}


def register() -> None:
    """Store each group's schema as `<group>/schema`, for conf/<group>/*.yaml to start from."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for name, cls in GROUPS.items():
        store.store(group=name, name="schema", node=store_node(cls))


register()  # on import, so before any entry point or test composes


def option(group: str, name: str) -> DictConfig:
    """conf/<group>/<name>.yaml over its schema, without Hydra: for code that reads one group alone
    (tests, benchmarks, the safety commands). The option's defaults list may name the schema and
    other options of its group; blocks it composes from elsewhere are left out."""
    text = yaml.safe_load((ROOT / "conf" / group / f"{name}.yaml").read_text()) or {}
    layers = [
        option(group, e) for e in text.pop("defaults", []) if isinstance(e, str) and e not in ("schema", "_self_")
    ]
    return OmegaConf.merge(OmegaConf.structured(store_node(GROUPS[group])), *layers, text)


PHI_MODES = ("placeholder", "surrogate")
# the block of model.quantization_config each quantization loads with (conf/quantization/bitsandbytes.yaml)
QUANTIZATION_BLOCKS = {"4bit": "bnb_4bit", "8bit": "bnb_8bit"}
# what every training run measures at its end, so what optimized_metric can name without adapter_eval
# (and which way is better: a grid sweep has no direction of its own; Optuna's hydra.sweeper.direction rules there)
RUN_METRICS = {
    "eval_loss": "minimize",
    "eval_perplexity": "minimize",
    "train_tokens_per_second": "maximize",
    "train_supervised_tokens_per_second": "maximize",
    "train_shared_prefix_fraction": "maximize",
}
_EXAMPLES = {
    "training.optimizer": "torch.optim.AdamW",
    "training.scheduler": "transformers.get_scheduler",
    **{f"model.quantization_config.{b}": "transformers.BitsAndBytesConfig" for b in QUANTIZATION_BLOCKS.values()},
}
__all__ = ["MedloraError", "QUANTIZATIONS", "build", "require", "require_positive"]


def validate(cfg: DictConfig, libraries: bool = True) -> None:
    """Raise MedloraError naming the first bad value; touches no model and no data.

    `libraries=False` leaves out the checks that import libraries (the scheduler's name needs
    transformers, which pulls in torch and peft: seconds on a small CPU), for a check before they load.
    """
    require(cfg.precision in PRECISIONS, f"precision={cfg.precision!r} is invalid: use one of {', '.join(PRECISIONS)}.")
    validate_model(cfg.model, libraries)
    build(Lora, cfg.lora)
    build(Training, cfg.training)
    build(Data, cfg.data)
    validate_safety(cfg.safety)
    build(Tracking, cfg.tracking)
    metric = cfg.get("optimized_metric", "eval_loss")
    require(
        metric in RUN_METRICS or cfg.get("adapter_eval") is not None,
        f"optimized_metric={metric!r} is not a metric of this run: use one of {', '.join(RUN_METRICS)} (or a "
        "metric that adapter_eval returns).",
    )
    for key in ("optimizer", "scheduler"):
        _check_target(cfg.training[key], f"training.{key}", libraries)
    if libraries:
        from transformers import SchedulerType

        names = [s.value for s in SchedulerType]
        require(
            cfg.training.lr_scheduler in names,
            f"training.lr_scheduler={cfg.training.lr_scheduler!r} is not a "
            f"transformers scheduler: use one of {', '.join(names)}.",
        )


def validate_model(m: DictConfig, libraries: bool = True) -> None:
    model = build(Model, m)
    if model.quantization != "none":
        require(
            importlib.util.find_spec("bitsandbytes") is not None,
            f"model.quantization={model.quantization} needs the bitsandbytes package, which is not "
            "installed. Install it (`.venv/bin/pip install bitsandbytes`) or set model.quantization=none.",
        )
        block = QUANTIZATION_BLOCKS[model.quantization]
        if m.get("quantization_config") is not None:  # absent where a model config is read on its own
            _check_target(m.quantization_config.get(block), f"model.quantization_config.{block}", libraries)


def validate_safety(safety: DictConfig) -> None:
    build(Safety, safety)


def _check_target(block, key: str, libraries: bool) -> None:
    """A `_partial_` Hydra target that imports: the recipe calls it with what only it knows (the parameters)."""
    target = block.get("_target_") if isinstance(block, DictConfig) else None
    require(
        isinstance(target, str) and bool(target),
        f"{key} has no _target_: give one such as {key}._target_={_EXAMPLES[key]}.",
    )
    require(
        block.get("_partial_") is True,
        f"{key}._partial_ must be true: the recipe adds the arguments only it knows. Set {key}._partial_=true.",
    )
    if libraries:
        from hydra.utils import get_object

        try:
            get_object(target)
        except Exception as err:  # noqa: BLE001 - any import failure is the same fix for the user
            raise MedloraError(
                f"{key}._target_={target} cannot be imported ({type(err).__name__}): give a "
                f"callable's full dotted path, e.g. {_EXAMPLES[key]}."
            ) from err


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    require(
        not name.startswith("cuda") or torch.cuda.is_available(),
        f"device={name} but PyTorch sees no CUDA GPU here: use device=auto or device=cpu.",
    )
    return name


def resolve_precision(name: str, device: str) -> str:
    """`auto` picks the fastest dtype the hardware computes natively; LoRA weights stay fp32."""
    if name != "auto":
        return name
    import torch

    from medlora.fast import compat

    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device == "cpu" and compat.mkldnn_bf16_supported():
        # AVX512-BF16 / AMX: native bf16 matmuls outrun fp32 (bench/results/avx512-bf16/)
        return "bf16"
    return "fp32"
