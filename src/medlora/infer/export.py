"""Export an adapter: merged into its base weights as a standalone checkpoint, and/or to MLflow as a model.

The merged checkpoint is what plain `transformers.AutoModelForCausalLM.from_pretrained` loads with
no medlora or peft code. It carries no safety layer: serve it through `infer.py` for triage and
output checks.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from medlora.audit import AuditTrail
from medlora.config import require
from medlora.files import folder_hashes, save_folder
from medlora.infer.sources import Source, load_adapter_model
from medlora.tracking import Tracker

log = logging.getLogger(__name__)

CARD = """# Merged medlora checkpoint

Base model `{base}` with the LoRA adapter from `{adapter}` merged into its weights ({precision}).
It loads with plain transformers, no peft or medlora code:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("{folder}")
tokenizer = AutoTokenizer.from_pretrained("{folder}")
```

The adapter was trained with this system prompt; give it as the system message for the same behaviour:

> {system_prompt}

This checkpoint has no safety layer. Serve it through medlora's `infer.py` (triage before the model,
output checks after it) where people may describe emergencies or crises. Not medical advice.
"""


def check_target(cfg: DictConfig) -> None:
    """Refuse an existing folder before anything loads: an export never overwrites one."""
    target = cfg.export.merged_dir
    if target:
        require(
            not Path(target).exists(),
            f"export.merged_dir={target} already exists: choose a new folder (an export never overwrites one).",
        )
    require(
        not cfg.export.registered_model_name or cfg.export.log_model,
        "export.registered_model_name is set but export.log_model=false: set export.log_model=true to register.",
    )
    require(
        not cfg.export.log_model or bool(cfg.tracking.enabled),
        "export.log_model=true needs MLflow: use tracking=mlflow (the default) or set tracking.uri.",
    )


def export(cfg: DictConfig, source: Source, audit: AuditTrail | None) -> None:
    # merge into unquantized weights: a 4-bit base would round the merged update back to 4 bits
    model_cfg = OmegaConf.merge(cfg.model, {"quantization": "none", "device_map": None})
    # the merge is a few matmuls per layer; CPU spares the GPU a full-precision copy of the model
    model, tokenizer, base_path = load_adapter_model(cfg, source, "cpu", cfg.export.precision, model_cfg)
    if cfg.export.log_model:
        log_model(cfg, model, tokenizer, base_path, source)
    if cfg.export.merged_dir:
        folder = save_merged(model, tokenizer, Path(cfg.export.merged_dir), cfg, source)
        if audit is not None:
            hashes = folder_hashes(folder)
            audit.record(
                "adapter_export", outputs=hashes, merged_dir=str(folder.resolve()), precision=cfg.export.precision
            )


def save_merged(model, tokenizer, target: Path, cfg: DictConfig, source: Source) -> Path:
    merged = model.merge_and_unload()
    merged.config.use_cache = True  # load_model turns the KV cache off for training; users generate
    card = CARD.format(
        base=cfg.model.base_model,
        adapter=source.run_id or source.adapter_dir,
        precision=cfg.export.precision,
        folder=target,
        system_prompt=cfg.safety.system_prompt or "(none: it was trained without one)",
    )

    def save(folder: Path) -> None:
        merged.save_pretrained(folder)  # safetensors
        tokenizer.save_pretrained(folder)  # with the chat template the adapter was trained with
        (folder / "README.md").write_text(card)

    save_folder(target, save)
    log.info("merged checkpoint saved to %s", target)
    return target


def log_model(cfg: DictConfig, model, tokenizer, base_path: str, source: Source) -> str:
    """Log the adapter with MLflow's transformers flavor; returns the model URI.

    MLflow saves only the peft adapter and records the base model: as a local folder
    (`local_base_model_path`, no Hub access needed) or, for a Hub id, as the repository and commit.
    """
    tracker = Tracker(cfg)
    # the adapter's own training run when it came from one, so the model sits beside its metrics
    if source.run_id:
        tracker.attach(source.run_id)
    else:
        tracker.start_beside(
            f"export-{source.adapter_dir.parent.name}",
            {"medlora.role": "export", "medlora.adapter_dir": str(source.adapter_dir)},
        )
    local_base = str(base_path) if Path(base_path).is_dir() else None
    uri = tracker.log_model(
        model,
        tokenizer,
        name="model",
        task="text-generation",
        base_model_path=local_base,
        registered_model_name=cfg.export.registered_model_name or None,
        metadata={"base_model": str(cfg.model.base_model), "base_model_path": str(base_path)},
        pip_requirements=_requirements(),
    )
    registered = cfg.export.registered_model_name
    log.info(
        "adapter logged to MLflow as %s%s (base model %s)",
        uri,
        f", registered as {registered}" if registered else "",
        base_path,
    )
    return uri


def _requirements() -> list[str]:
    # MLflow does not infer requirements for peft models; pin what loads one
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("torch", "transformers", "peft", "accelerate", "safetensors")]
