"""The speed path: every trick that trains faster or leaner on the same maths, applied once, reporting what ran.

- attention.py: sdpa_varlen, attention per packed conversation instead of over the whole row
- lora.py: fused LoRA layers and SwiGLU MLPs, norm outputs remade, bit-packed masks, fast dropout
- loss.py: the chunked loss (the LM head only where a label exists)
- prefix.py: the system prompt computed once per optimizer step (training.shared_prefix_scope=step)
- compat.py: every private library name the above rely on, checked by tests/test_fast_compat.py

The recipe (medlora.train.LoraRecipe) asks `attention.implementation` for the attention to load
the model with, adds the adapter (medlora.adapters), then calls `apply` once; the Applied it
gets back decides the loaders and the step strategy and is logged as resolved_* MLflow params.
The C allocator (medlora.allocator) is chosen before the process starts, so it stays beside the
entry point; Applied reports the one in use. What each trick costs and saves:
bench/results/train_throughput.md.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Applied:
    """What `apply` actually ran. A `*_reason` says why a trick did not run as the config asked
    (None where it did, or where it was not asked for)."""

    attention: str  # the attn_implementation the model runs: sdpa_varlen where packed rows asked for sdpa
    attention_reason: str | None
    fused_lora: bool  # FusedLoraLinear in place of peft's LoRA Linear
    fused_lora_reason: str | None
    fused_swiglu: int  # SwiGLU MLPs that train as one function
    norm_outputs_marked: int  # norms whose output is remade in the backward pass, not kept
    fast_dropout: int  # LoRA dropouts that draw their mask with FastDropout
    input_casts_skipped: int  # LoRA layers that leave the input cast to autocast
    chunked_loss: bool
    chunked_loss_reason: str | None
    shared_prefix: str  # step, row or off
    shared_prefix_reason: str | None
    allocator: str  # the C allocator this process runs on

    def params(self) -> dict[str, str | int | bool]:
        """The fields as MLflow params: resolved_<field>, "none" for a missing reason."""
        return {f"resolved_{name}": "none" if value is None else value for name, value in asdict(self).items()}


def apply(model, training, *, precision: str) -> Applied:
    """Apply every speed trick `training` (cfg.training) asks for to `model`, a peft model with its
    fresh LoRA adapter and its attention loaded as attention.implementation chose; say what ran.

    `precision`: the run's (fp32 runs without autocast, so LoRA inputs keep peft's cast).
    """
    from medlora import allocator
    from medlora.fast import attention, compat, lora
    from medlora.fast import loss as fast_loss

    attn = compat.attn_implementation(model)
    fused_reason = lora.fused_lora_blocker(model) if training.fused_lora else None
    fused = training.fused_lora and fused_reason is None
    swiglu = norms = 0
    if fused:
        lora.fuse_lora_layers(model)
        swiglu = lora.fuse_swiglu(model)
        log.info("training.fused_lora: %d SwiGLU MLPs train as one function each", swiglu)
        norms = lora.mark_norm_outputs(model)
        log.info(
            "training.fused_lora: the outputs of %d norms are remade in the backward pass where a "
            "LoRA layer reads them",
            norms,
        )
    elif fused_reason:
        log.info("training.fused_lora: off, %s", fused_reason)
    casts = lora.skip_input_casts(model) if precision != "fp32" else 0
    dropouts = lora.use_fast_dropout(model) if training.fast_dropout else 0
    chunked_reason = fast_loss.blocker(model) if training.chunked_loss else None
    if chunked_reason:
        log.info("training.chunked_loss: %s; using the model's own loss", chunked_reason)
    scope, prefix_reason = _prefix_scope(training, attn, attention.VARLEN)
    varlen = attn == attention.VARLEN
    return Applied(
        attention=attn,
        attention_reason="packed rows: sdpa runs once per conversation" if varlen else None,
        fused_lora=fused,
        fused_lora_reason=fused_reason,
        fused_swiglu=swiglu,
        norm_outputs_marked=norms,
        fast_dropout=dropouts,
        input_casts_skipped=casts,
        chunked_loss=training.chunked_loss and chunked_reason is None,
        chunked_loss_reason=chunked_reason,
        shared_prefix=scope,
        shared_prefix_reason=prefix_reason,
        allocator=allocator.in_use(),
    )


def _prefix_scope(training, attn: str, varlen: str) -> tuple[str, str | None]:
    """(training.shared_prefix_scope, None) where a shared prefix can apply: packed rows and sdpa_varlen;
    ("off", why) where it cannot."""
    if not training.shared_prefix:
        return "off", None
    if not training.packing:
        return "off", "training.packing is off: only packed rows share a prefix"
    if attn != varlen:
        log.info(
            "training.shared_prefix: attention %s runs over whole rows, so every conversation keeps its own "
            "copy of the system prompt (model.attn_implementation=sdpa shares it)",
            attn,
        )
        return "off", f"attention {attn} runs over whole rows (model.attn_implementation=sdpa shares the prefix)"
    return training.shared_prefix_scope, None
