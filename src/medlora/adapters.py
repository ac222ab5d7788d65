"""LoRA adapters through peft: only the adapter weights train, the base model stays frozen."""

from __future__ import annotations

import logging

import torch
from omegaconf import DictConfig, OmegaConf
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from peft.tuners.lora import Linear as LoraLinear
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
                autocast: bool = False, fused: bool = False):
    """Wrap `model` with a fresh LoRA adapter; return (peft model, trainable params, total params).

    `autocast`: the forward runs under mixed-precision autocast, which casts the adapter's inputs itself.
    `fused`: plain linear layers train through FusedLoraLinear (same maths, less memory).
    """
    # non-reentrant checkpointing works with frozen inputs, so no input-grad hooks are needed
    checkpointing_kwargs = {"use_reentrant": False}
    if getattr(model, "is_quantized", False):
        # casts norms and the head to fp32 for stable k-bit training
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs=checkpointing_kwargs)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing_kwargs)
    config = lora_config(lora)
    # bitsandbytes layers subclass nn.Linear but keep their own LoRA layers; DoRA has its own maths
    if fused and not getattr(model, "is_quantized", False) and not lora.use_dora:
        config._register_custom_module({torch.nn.Linear: FusedLoraLinear})
    try:
        model = get_peft_model(model, config)
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        if x.device.type != "cpu":
            return torch.nn.functional.dropout(x, self.p, True)
        return x * keep_mask(x, self.p, fast=True) * (1 / (1 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


def keep_mask(x: torch.Tensor, p: float, fast: bool) -> torch.Tensor:
    """A bool mask, True with probability 1 - p, shaped like `x`; `fast`: FastDropout's draw on a CPU."""
    if fast and x.device.type == "cpu":
        n = x.numel()
        # four int16 draws per int64 word, uniform on [-32768, 32767]
        words = torch.randint(-2**63, 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64)
        return words.view(torch.int16)[:n].view(x.shape) >= round(p * 65536) - 32768
    return torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(1 - p)


class FusedLoraLinear(LoraLinear):
    """peft's LoRA Linear whose training forward is one autograd function (_LoraLinearFunction).

    peft's `base(x) + lora_B(lora_A(dropout(x))) * scaling` keeps, for the backward pass, a dropped
    fp32 copy of the input in every adapted layer and a mask beside it, and spends a full pass over
    the output on the scaling. Here the input is kept once (q, k and v, or gate and up, read the
    same tensor) with a 1-byte mask, and the scaling applies to the rank-r product. Evaluation,
    merged or disabled adapters, several active adapters and other variants keep peft's path.
    """

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapters = [a for a in self.active_adapters if a in self.lora_A]
        base = self.base_layer
        if (not (self.training and torch.is_grad_enabled()) or args or kwargs or self.disable_adapters or self.merged
                or len(adapters) != 1 or adapters[0] in self.lora_variant or type(base) is not torch.nn.Linear
                or base.weight.requires_grad or self.fan_in_fan_out):
            return super().forward(x, *args, **kwargs)
        (name,) = adapters
        lora_a, lora_b, dropout = self.lora_A[name], self.lora_B[name], self.lora_dropout[name]
        if lora_a.bias is not None or lora_b.bias is not None:
            return super().forward(x, *args, **kwargs)
        p = getattr(dropout, "p", 0.0)
        return _LoraLinearFunction.apply(x, base.weight, base.bias, lora_a.weight, lora_b.weight,
                                         self.scaling[name], p, isinstance(dropout, FastDropout))


class _LoraLinearFunction(torch.autograd.Function):
    """y = x W^T + b + (s / (1 - p)) ((x * keep) A^T) B^T, computed in the base weight's dtype."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float, p: float, fast: bool):
        dtype, shape = weight.dtype, x.shape
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, shape[-1]).to(dtype)
            keep = keep_mask(x2, p, fast) if p > 0 else None
            a, b = lora_a.to(dtype), lora_b.to(dtype)
            # the dropout's 1 / (1 - p) goes with the scaling onto the rank-r product
            h = ((x2 * keep) @ a.T if keep is not None else x2 @ a.T).mul_(scaling / (1 - p))
            y = torch.addmm(bias.to(dtype), x2, weight.T) if bias is not None else x2 @ weight.T
            y.addmm_(h, b.T)
        ctx.save_for_backward(x2, keep, h, weight, lora_a, lora_b)
        ctx.scale, ctx.shape, ctx.has_bias = scaling / (1 - p), shape, bias is not None
        return y.view(*shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad):
        x2, keep, h, weight, lora_a, lora_b = ctx.saved_tensors
        dtype = weight.dtype
        g = grad.reshape(-1, grad.shape[-1]).to(dtype)
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        gh = (g @ b).mul_(ctx.scale)
        grad_b = (g.T @ h).to(lora_b.dtype)
        grad_a = (gh.T @ (x2 * keep if keep is not None else x2)).to(lora_a.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            lora_part = gh @ a
            grad_x = (g @ weight).add_(lora_part.mul_(keep) if keep is not None else lora_part).view(ctx.shape)
        grad_bias = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias, grad_a, grad_b, None, None, None


def _bad_targets(lora: DictConfig, err: ValueError) -> MedloraError:
    return MedloraError(f"lora.target_modules={lora.target_modules} does not fit this model ({err}). "
                        "Use all-linear, or names of its linear layers such as [q_proj,k_proj,v_proj,o_proj].")
