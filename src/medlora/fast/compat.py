"""Every private or internal name of torch, transformers, peft, accelerate and bitsandbytes that medlora uses.

None of these is a public API: a library upgrade may rename, move or change any of them without
notice. They go through this one module, and tests/test_fast_compat.py checks each against the
versions in CHECKED_AGAINST, so an upgrade fails one clear test instead of a training run (or,
worse, trains on silently different maths). After an upgrade: run that test, check each shim it
names against the new library's source, then bump CHECKED_AGAINST.

Light to import: the libraries load when a shim is first called.
"""

from __future__ import annotations

import importlib.metadata
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# the library versions every shim below was read against (tests/test_fast_compat.py pins them)
CHECKED_AGAINST = {
    "torch": "2.13.0",
    "transformers": "5.23.0",
    "peft": "0.21.2",
    "accelerate": "1.15.0",
    "bitsandbytes": "0.50.2",
}


def installed_versions() -> dict[str, str]:
    """The installed version of each library in CHECKED_AGAINST, local build tags (+cpu) left out."""
    return {name: importlib.metadata.version(name).split("+")[0] for name in CHECKED_AGAINST}


# --- torch: aten kernels behind scaled_dot_product_attention, log_softmax and silu ----------------


def flash_attention_cpu(query, key, value, causal: bool, scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, log-sum-exp) of torch's CPU flash-attention kernel, the one sdpa itself runs on a CPU.

    sdpa returns no log-sum-exp, which merging attention over two sets of keys needs.
    """
    import torch

    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, causal, scale=scale)


def flash_attention_cpu_backward(
    grad_out, query, key, value, out, lse, causal: bool, scale: float | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad query, grad key, grad value) of flash_attention_cpu; `lse` must be contiguous."""
    import torch

    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad_out, query, key, value, out, lse, 0.0, causal, scale=scale
    )


def log_softmax_rows_(x: torch.Tensor) -> torch.Tensor:
    """log_softmax over the last dimension of a 2-D CPU tensor, written over it (no second buffer).

    Relies on torch's CPU kernel reading a row before writing it: tests/test_fast_compat.py checks it.
    """
    import torch

    return torch.ops.aten._log_softmax.out(x, -1, False, out=x)


def silu_backward(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """grad * silu'(x) in one kernel, as autograd computes it for F.silu."""
    import torch

    return torch.ops.aten.silu_backward(grad, x)


def mkldnn_bf16_supported() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere oneDNN emulates it."""
    import torch

    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


# --- transformers: the attention registry and the model's resolved attention -----------------


def sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs):
    """transformers' own sdpa attention function, which a registered attention function falls back to."""
    from transformers.integrations import sdpa_attention

    return sdpa_attention.sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register_attention(name: str, function) -> None:
    """Make `name` an attn_implementation that from_pretrained accepts, with sdpa's mask.

    The mask is still built for padded batches; a function that reads cu_seq_lens ignores it.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, sdpa_mask)


def attn_implementation(model) -> str:
    """The attention implementation a (peft-wrapped) model runs, as transformers resolved it."""
    return model.config._attn_implementation


def forget_quantization(model) -> None:
    """Drop a dequantized GGUF model's quantization markers, so it saves and reloads as plain weights.

    With them transformers refuses to save it ("gguf is not serializable").
    """
    del model.config.quantization_config
    model.hf_quantizer = None


# --- peft: LoRA layer internals ------------------------------------------------------------------

# what medlora.fast.lora.FusedLoraLinear reads of the peft LoRA Linear it subclasses, besides the
# two internals below: the state its fused path must agree on with peft's forward
LORA_LAYER_FIELDS = (
    "base_layer",
    "lora_A",
    "lora_B",
    "lora_dropout",
    "scaling",
    "active_adapters",
    "merged",
    "disable_adapters",
    "fan_in_fan_out",
)


def lora_variants(layer) -> dict:
    """The adapters of a LoRA layer that run other maths (DoRA and the like), by adapter name."""
    return layer.lora_variant


def skip_input_cast(layer) -> None:
    """Stop a LoRA layer casting its input to the adapter weights' dtype before the adapter.

    Under autocast that copy is wasted: autocast casts it straight back for the matmul.
    """
    layer.cast_input_dtype_enabled = False


# --- accelerate ------------------------------------------------------------------------------------


def reset_accelerator_state() -> None:
    """Forget accelerate's per-process state, so the next Accelerator takes its own mixed precision.

    accelerate keeps one state per process: without this the jobs of a sweep run in one process
    would all train in the first job's precision.
    """
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


# --- bitsandbytes -----------------------------------------------------------------------------------


def keep_4bit_layout_trainable(model) -> int:
    """Stop bitsandbytes repacking 4-bit weights for its CPU inference kernel; return how many layers.

    It repacks a layer the first time it runs in eval mode without grad (the eval before
    training), and the repacked kernel has no backward: from then on gradients would silently
    stop flowing through every frozen 4-bit layer. Training keeps the trainable layout.
    """
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)
