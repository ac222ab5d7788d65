"""LoRA adapters through peft: only the adapter weights train, the base model stays frozen."""

from __future__ import annotations

import logging

from omegaconf import DictConfig, OmegaConf
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

from medlora.config import MedloraError

log = logging.getLogger(__name__)


def lora_config(lora: DictConfig) -> LoraConfig:
    targets = lora.target_modules
    if not isinstance(targets, str):
        targets = list(OmegaConf.to_container(targets, resolve=True))
    return LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        use_dora=lora.use_dora,
        use_rslora=lora.use_rslora,
        bias=lora.bias,
        task_type="CAUSAL_LM",
    )


def add_adapter(model, lora: DictConfig, gradient_checkpointing: bool):
    """Wrap `model` with a fresh LoRA adapter; return (peft model, trainable params, total params).

    The speed path (medlora.fast.apply) changes the adapter's layers afterwards, same maths.
    """
    # non-reentrant checkpointing works with frozen inputs, so no input-grad hooks are needed
    checkpointing_kwargs = {"use_reentrant": False}
    if getattr(model, "is_quantized", False):
        # casts norms and the head to fp32 for stable k-bit training
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing, gradient_checkpointing_kwargs=checkpointing_kwargs
        )
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing_kwargs)
    try:
        model = get_peft_model(model, lora_config(lora))
    except ValueError as err:
        raise _bad_targets(lora, err) from err
    trainable, total = model.get_nb_trainable_parameters()
    log.info(
        "LoRA rank %d alpha %g: %s trainable of %s parameters (%.3f%%)",
        lora.rank,
        lora.alpha,
        f"{trainable:,}",
        f"{total:,}",
        100 * trainable / total,
    )
    return model, trainable, total


def _bad_targets(lora: DictConfig, err: ValueError) -> MedloraError:
    return MedloraError(
        f"lora.target_modules={lora.target_modules} does not fit this model ({err}). "
        "Use all-linear, or names of its linear layers such as [q_proj,k_proj,v_proj,o_proj]."
    )
