"""The chunked loss: the LM head run only where a label exists, a bounded number of rows at a time.

A plain forward materialises batch x length x vocabulary logits (49k columns for SmolLM2, 200k
for Phi-4), casts them to fp32 and keeps them, with their softmax, for the backward pass: on a
CPU that costs more time than the attention of all layers together, and most of the activation
memory. The chunked path applies the head only at positions that have a label, a chunk of rows
at a time, and computes the gradient with respect to the hidden states in the same pass, so no
more than one chunk of logits is ever alive. The maths is the same cross-entropy.
"""

from __future__ import annotations

import torch

from medlora.fast import compat

# fp32 logits per chunk are CHUNK_ELEMENTS * 4 bytes whatever the vocabulary size, alive beside all
# the activations: larger chunks raise the peak memory and gave no speed (bench/results/train_throughput.md)
CHUNK_ELEMENTS = 2**23
# config fields that change logits after the head; a model with any of them set uses its own loss
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier")


def blocker(model) -> str | None:
    """Why the chunked path cannot compute this model's loss (it needs a plain linear head and no
    logit transform after it), or None where it can."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    transformed = [name for name in _LOGIT_TRANSFORMS if getattr(config, name, None) not in (None, 1, 1.0)]
    if type(head) is not torch.nn.Linear or head.bias is not None or transformed:
        return (
            f"this model's head ({type(head).__name__}{''.join(', ' + t for t in transformed)}) needs the full logits"
        )
    if not hasattr(base, "get_decoder"):
        return "this model has no separate decoder to run without its head"
    return None


def chunked_loss_sum(model, inputs: dict, targets: torch.Tensor, supervised: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of `targets[supervised]`, the head run only at the `supervised` positions."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.get_decoder()(**inputs).last_hidden_state[:, :-1][supervised]
    return chunked_cross_entropy(hidden, base.get_output_embeddings().weight, targets[supervised])


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of rows of `hidden` through a linear head without materialising all logits."""
    rows = max(1, CHUNK_ELEMENTS // weight.shape[0])
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, rows)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T, target_i); the gradient is computed in the forward pass."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, rows: int):
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.weight_dtype = weight.dtype
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_weight else None
        # one buffer for every chunk, holding logits, then log-probabilities, then their gradient:
        # a fresh logits and log-softmax pair per chunk, of a new size at each last chunk, left
        # the allocator holding several, a higher peak over a run of train.py
        buffer = torch.empty((min(rows, hidden.shape[0]), weight.shape[0]), dtype=torch.float32, device=hidden.device)
        device = hidden.device.type
        straight = weight.dtype == hidden.dtype == torch.float32 and not torch.is_autocast_enabled(device)
        for start in range(0, hidden.shape[0], rows):
            h, t = hidden[start : start + rows], targets[start : start + rows]
            log_probs = buffer[: len(t)]
            if straight:
                torch.mm(h, weight.T, out=log_probs)
            else:  # autocast or 16-bit weights: the product in that dtype, then widened to fp32, as before
                log_probs.copy_(h @ weight.T)
            if device == "cpu":
                compat.log_softmax_rows_(log_probs)
            else:
                log_probs = torch.log_softmax(log_probs, dim=-1)
            total -= log_probs.gather(1, t[:, None]).sum()
            if not (want_hidden or want_weight):
                continue
            # d loss / d logits = softmax - one_hot(target), built in place in the same buffer
            probs = log_probs.exp_()
            probs[torch.arange(len(t), device=t.device), t] -= 1
            probs = probs.to(weight.dtype)
            if want_hidden:
                grad_hidden[start : start + rows] = probs @ weight
            if want_weight:
                grad_weight += (probs.T @ h.to(weight.dtype)).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (
            grad_hidden * grad_total.to(grad_hidden.dtype) if grad_hidden is not None else None,
            (grad_weight * grad_total).to(ctx.weight_dtype) if grad_weight is not None else None,
            None,
            None,
        )
