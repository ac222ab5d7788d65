"""Check the composed config once, before anything slow happens, and resolve `auto` values.

Light on purpose: train.py checks a single run's config before torch, transformers and peft load.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

from omegaconf import DictConfig, OmegaConf


class MedloraError(Exception):
    """A problem the user can fix: the message names the value and the fix."""


PRECISIONS = ("auto", "fp32", "bf16", "fp16")
QUANTIZATIONS = ("none", "4bit", "8bit")
# the block of model.quantization_config each quantization loads with (conf/quantization/bitsandbytes.yaml)
QUANTIZATION_BLOCKS = {"4bit": "bnb_4bit", "8bit": "bnb_8bit"}
PREFIX_SCOPES = ("step", "row")
RANDOM_DTYPES = ("float32", "bfloat16", "float16")
OVERLONG = ("truncate", "drop")
LORA_BIAS = ("none", "all", "lora_only")
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


def require(ok: bool, message: str) -> None:
    if not ok:
        raise MedloraError(message)


def require_positive(value, key: str, fix: str, allow_zero: bool = False) -> None:
    good = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    good = good and (value >= 0 if allow_zero else value > 0)
    bound = ">= 0" if allow_zero else "> 0"
    require(good, f"{key}={value!r} is invalid: it must be a number {bound}. {fix}")


def validate(cfg: DictConfig, libraries: bool = True) -> None:
    """Raise MedloraError naming the first bad value; touches no model and no data.

    `libraries=False` leaves out the checks that import libraries (the scheduler's name needs
    transformers, which pulls in torch and peft: seconds on a small CPU), for a check before they load.
    """
    require(cfg.precision in PRECISIONS, f"precision={cfg.precision!r} is invalid: use one of {', '.join(PRECISIONS)}.")
    validate_model(cfg.model, libraries)
    _validate_lora(cfg.lora)
    _validate_training(cfg.training)
    _validate_data(cfg.data)
    validate_safety(cfg.safety)
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


def validate_model(m: DictConfig, libraries: bool = True) -> None:
    require(
        m.quantization in QUANTIZATIONS,
        f"model.quantization={m.quantization!r} is invalid: use one of {', '.join(QUANTIZATIONS)}.",
    )
    if m.quantization != "none":
        require(
            importlib.util.find_spec("bitsandbytes") is not None,
            f"model.quantization={m.quantization} needs the bitsandbytes package, which is not "
            "installed. Install it (`.venv/bin/pip install bitsandbytes`) or set model.quantization=none.",
        )
        block = QUANTIZATION_BLOCKS[m.quantization]
        if m.get("quantization_config") is not None:  # absent where a model config is read on its own
            _check_target(m.quantization_config.get(block), f"model.quantization_config.{block}", libraries)
    require(bool(m.base_model), "model.base_model is empty: give a Hugging Face id, a folder or a .gguf file.")
    keep = m.get("keep_layers")
    require(
        keep is None or (isinstance(keep, int) and not isinstance(keep, bool) and keep > 0),
        f"model.keep_layers={keep!r} is invalid: give a positive number of decoder layers, or null for all.",
    )
    if m.get("random_init") is not None:
        dtype = m.random_init.get("dtype", "float32")
        require(
            dtype in RANDOM_DTYPES,
            f"model.random_init.dtype={dtype!r} is invalid: the random weights are saved "
            f"in one of {', '.join(RANDOM_DTYPES)}.",
        )


def _validate_lora(lora: DictConfig) -> None:
    require(
        isinstance(lora.rank, int) and not isinstance(lora.rank, bool) and lora.rank > 0,
        f"lora.rank={lora.rank!r} is invalid: the LoRA rank must be a positive integer, e.g. lora.rank=16.",
    )
    require_positive(lora.alpha, "lora.alpha", "A common choice is twice the rank, e.g. lora.alpha=32.")
    require(
        isinstance(lora.dropout, (int, float)) and 0 <= lora.dropout < 1,
        f"lora.dropout={lora.dropout!r} is invalid: it must be in [0, 1), e.g. lora.dropout=0.05.",
    )
    require(lora.bias in LORA_BIAS, f"lora.bias={lora.bias!r} is invalid: use one of {', '.join(LORA_BIAS)}.")
    require(
        bool(lora.target_modules), "lora.target_modules is empty: use all-linear or a list such as [q_proj,v_proj]."
    )


def _validate_training(t: DictConfig) -> None:
    require_positive(t.learning_rate, "training.learning_rate", "Typical LoRA values are 1e-4 to 3e-4.")
    for key in ("batch_size", "gradient_accumulation_steps", "max_seq_len"):
        value = t[key]
        require(
            isinstance(value, int) and not isinstance(value, bool) and value > 0,
            f"training.{key}={value!r} is invalid: it must be a positive integer.",
        )
    for key in ("max_steps", "num_epochs", "log_every", "eval_every", "save_every"):
        require_positive(t[key], f"training.{key}", "Use 0 to turn it off.", allow_zero=True)
    require(
        t.max_steps > 0 or t.num_epochs > 0,
        "training.max_steps and training.num_epochs are both 0: set one of them, e.g. training.max_steps=40.",
    )
    require(0 <= t.warmup_ratio < 1, f"training.warmup_ratio={t.warmup_ratio!r} is invalid: it must be in [0, 1).")
    require_positive(t.weight_decay, "training.weight_decay", "Use 0 for none.", allow_zero=True)
    require_positive(t.max_grad_norm, "training.max_grad_norm", "Use 0 to turn clipping off.", allow_zero=True)
    require(t.overlong in OVERLONG, f"training.overlong={t.overlong!r} is invalid: use truncate or drop.")
    for key in (
        "packing",
        "shared_prefix",
        "chunked_loss",
        "fast_dropout",
        "fused_lora",
        "gradient_checkpointing",
        "group_by_length",
        "cache_data",
    ):
        require(isinstance(t[key], bool), f"training.{key}={t[key]!r} is invalid: use true or false.")
    require(
        t.shared_prefix_scope in PREFIX_SCOPES,
        f"training.shared_prefix_scope={t.shared_prefix_scope!r} is invalid: use {' or '.join(PREFIX_SCOPES)}.",
    )
    from medlora.allocator import choose

    try:
        choose(t.allocator)
    except ValueError as err:
        raise MedloraError(str(err)) from err
    if t.resume_from:
        require(
            Path(t.resume_from).is_dir(),
            f"training.resume_from={t.resume_from} is not a folder: give a checkpoint folder such as "
            "outputs/runs/<time>/checkpoints/step_20.",
        )


def _validate_data(d: DictConfig) -> None:
    require(
        not OmegaConf.is_missing(d, "train_file"),
        "data.train_file is not set: pass your file, e.g. data.train_file=/path/train.jsonl.",
    )
    build = d.get("build")
    if build is not None and build.get("own_dir") is not None:
        require(
            Path(build.own_dir).is_dir(),
            f"data.build.own_dir={build.own_dir} does not exist: give the folder of "
            "labelled conversations (data/safety_triage in this repository).",
        )
    for key in ("train_file", "eval_file"):
        path = d[key]
        if (path is None and key == "eval_file") or build is not None:
            continue  # data.build writes the files at the start of the run
        require(
            Path(path).is_file(),
            f"data.{key}={path} does not exist: check the path, or use data=sample_medical for the bundled set.",
        )
    if d.eval_file is None:
        require(
            0 < d.eval_split < 1,
            f"data.eval_split={d.eval_split!r} is invalid: with no data.eval_file it must be in (0, 1), e.g. 0.1.",
        )
    for key in ("max_train_samples", "max_eval_samples"):
        value = d[key]
        require(
            value is None or (isinstance(value, int) and value > 0),
            f"data.{key}={value!r} is invalid: use a positive integer or null.",
        )


TRIAGE_ACTIONS = ("emergency", "crisis", "refuse", "allow")
PHI_MODES = ("placeholder", "surrogate")


def validate_safety(safety: DictConfig) -> None:
    triage = safety.triage
    model = triage.get("model")
    require(
        model is None or (isinstance(model, str) and bool(model.strip())),
        f"safety.triage.model={model!r} is invalid: give a triage adapter folder, a Hugging Face guard model id, "
        "or null for the rules alone.",
    )
    batch = triage.get("batch_size", 16)
    require(
        isinstance(batch, int) and not isinstance(batch, bool) and batch > 0,
        f"safety.triage.batch_size={batch!r} is invalid: it must be a positive integer, e.g. 16.",
    )
    guard = triage.get("guard") or {}
    for code, action in {**(guard.get("categories") or {}), "default": guard.get("default", "refuse")}.items():
        require(
            action in TRIAGE_ACTIONS,
            f"safety.triage.guard: {code}={action!r} is invalid: map each guard "
            f"category to one of {', '.join(TRIAGE_ACTIONS)}.",
        )
    phi = safety.phi_redaction
    mode = phi.get("mode", "placeholder")
    require(
        mode in PHI_MODES,
        f"safety.phi_redaction.mode={mode!r} is invalid: use placeholder "
        "([NAME]) or surrogate (realistic fakes, consistent within a conversation).",
    )
    workers = phi.get("workers")
    require(
        workers is None or (isinstance(workers, int) and not isinstance(workers, bool) and workers > 0),
        f"safety.phi_redaction.workers={workers!r} is invalid: give a positive number of processes, or null "
        "for one per core.",
    )
    require(
        safety.content_filter.action in ("drop", "flag"),
        f"safety.content_filter.action={safety.content_filter.action!r} is invalid: use drop or flag.",
    )
    require(
        safety.output_checks.on_violation in ("block", "rewrite", "refer"),
        f"safety.output_checks.on_violation={safety.output_checks.on_violation!r} is invalid: "
        "use block, rewrite or refer.",
    )


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
