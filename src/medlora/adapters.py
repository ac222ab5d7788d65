"""LoRA adapters through peft: only the adapter weights train, the base model stays frozen."""

from __future__ import annotations

import logging

import torch
from omegaconf import DictConfig, OmegaConf
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from peft.tuners.lora import LoraLayer

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


def add_adapter(model, lora: DictConfig, gradient_checkpointing: bool, fast_dropout: bool = False,
                autocast: bool = False):
    """Wrap `model` with a fresh LoRA adapter; return (peft model, trainable params, total params).

    `autocast`: the forward runs under mixed-precision autocast, which casts the adapter's inputs itself.
    """
    # non-reentrant checkpointing works with frozen inputs, so no input-grad hooks are needed
    checkpointing_kwargs = {"use_reentrant": False}
    if getattr(model, "is_quantized", False):
        # casts norms and the head to fp32 for stable k-bit training
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs=checkpointing_kwargs)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing_kwargs)
    try:
        model = get_peft_model(model, lora_config(lora))
    except ValueError as err:
        raise _bad_targets(lora, err) from err
    for layer in (m for m in model.modules() if isinstance(m, LoraLayer)):
        if autocast:
            # peft upcasts every input to the fp32 adapter weights, and autocast casts it straight
            # back to bf16 for the matmul: a wasted copy of each activation, twice per layer
            layer.cast_input_dtype_enabled = False
        if fast_dropout:
            for name, dropout in layer.lora_dropout.items():
                if isinstance(dropout, torch.nn.Dropout) and dropout.p > 0:
                    layer.lora_dropout[name] = FastDropout(dropout.p)
    trainable, total = model.get_nb_trainable_parameters()
    log.info("LoRA rank %d alpha %g: %s trainable of %s parameters (%.3f%%)",
             lora.rank, lora.alpha, f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    return model, trainable, total


class FastDropout(torch.nn.Module):
    """nn.Dropout whose mask takes 16 random bits per element, four elements per 64-bit draw.

    On a CPU torch draws one 32-bit number per element, on one thread: with dropout on the
    input of every adapted layer that took a fifth of a SmolLM2 training step, about 3x what
    this costs. Same distribution; p is rounded to a multiple of 1/65536. GPUs keep torch's
    fused kernel.
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.threshold = round(p * 65536) - 32768  # int16 draws are uniform on [-32768, 32767]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        if x.device.type != "cpu":
            return torch.nn.functional.dropout(x, self.p, True)
        n = x.numel()
        words = torch.randint(-2**63, 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64)
        keep = words.view(torch.int16)[:n].view(x.shape) >= self.threshold
        return x * keep * (1 / (1 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


def _bad_targets(lora: DictConfig, err: ValueError) -> MedloraError:
    return MedloraError(f"lora.target_modules={lora.target_modules} does not fit this model ({err}). "
                        "Use all-linear, or names of its linear layers such as [q_proj,k_proj,v_proj,o_proj].")
