"""`sdpa_varlen`: sdpa once per packed conversation instead of once over the whole packed row.

Without it a packed row gets a block-diagonal mask: correct, but every query still meets every
key of the row (sdpa on CPU skips no masked blocks), so the attention work grows with the square
of the row instead of the sum of squares of its conversations. This is what flash-attention's
varlen kernel does on a GPU.
"""

from __future__ import annotations

import itertools

import torch

from medlora.fast import compat

VARLEN = "sdpa_varlen"
# what sdpa_attention_forward does besides plain causal attention; a call with any of these set
# goes to it (Gemma-2's softcap, for one, is refused there with a clear message)
_ATTENTION_MODIFIERS = ("softcap", "position_bias", "cache", "s_aux")


def implementation(requested: str, packed: bool) -> str:
    """The attn_implementation to load a model with: sdpa_varlen (registered here) for packed rows
    where sdpa was asked for, else `requested`. Call it before from_pretrained."""
    if packed and requested == "sdpa":
        compat.register_attention(VARLEN, sdpa_varlen)
        return VARLEN
    return requested


def _plain_causal(kwargs: dict) -> bool:
    """No dropout and none of _ATTENTION_MODIFIERS (tensors among them: no truth test on them)."""
    return not kwargs.get("dropout") and all(kwargs.get(k) is None for k in _ATTENTION_MODIFIERS)


def sdpa_varlen(
    module,
    query,
    key,
    value,
    attention_mask,
    cu_seq_lens_q=None,
    shared_prefix: int = 0,
    step_prefix=None,
    record_prefix=None,
    **kwargs,
):
    """sdpa per conversation of a packed row (cu_seq_lens_q); other batches (padded, generation) go to plain sdpa.

    `shared_prefix` (medlora.batching.collate_packed): the row's conversations begin with the same
    `shared_prefix` tokens, laid once at the start of the row; the first conversation holds them
    and every later one attends to them as if they stood before it.

    `step_prefix` (medlora.fast.prefix): the keys and values of a prefix that the optimizer step's
    rows leave out; every conversation of the row attends to them first. `record_prefix`: this
    is that prefix's own forward pass, which hands them over.
    """
    if cu_seq_lens_q is None or query.shape[0] != 1:
        return compat.sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    bounds = cu_seq_lens_q.tolist()  # note: a device-to-host sync once per layer on a GPU
    dtype = query.dtype
    if query.device.type == "cpu":
        # torch's CPU flash-attention kernel is faster in fp32 than in bf16 on conversation-length
        # inputs, and more precise (measured with bench/train_throughput.py; bench/results/)
        query, key, value = query.float(), key.float(), value.float()
    if record_prefix is not None:
        record_prefix.record(module.layer_idx, key, value)
    outer = step_prefix.get(module.layer_idx) if step_prefix is not None else (None, None)
    if query.device.type == "cpu" and _plain_causal(kwargs):
        with torch.autocast("cpu", enabled=False):
            out = _PackedCausalAttention.apply(query, key, value, *outer, bounds, shared_prefix, kwargs.get("scaling"))
        return out.to(dtype), None
    with torch.autocast(query.device.type, enabled=False):
        outputs = []
        for i, (a, b) in enumerate(itertools.pairwise(bounds)):
            q, k, v = query[:, :, a:b], key[:, :, a:b], value[:, :, a:b]
            context = _context(key, value, *outer, shared_prefix if i else 0)
            if context is not None:
                # sdpa's causal mask is aligned to the top left, so the context's positions need query
                # rows too; their outputs are dropped, so zeros do
                q = torch.cat([q.new_zeros(*q.shape[:2], context[0].shape[2], q.shape[3]), q], dim=2)
                k, v = torch.cat([context[0], k], dim=2), torch.cat([context[1], v], dim=2)
            out = compat.sdpa_attention_forward(module, q, k, v, None, is_causal=True, **kwargs)[0]
            outputs.append(out[:, out.shape[1] - (b - a) :])
    return torch.cat(outputs, dim=1).to(dtype), None


class _PackedCausalAttention(torch.autograd.Function):
    """Causal attention of each packed conversation through torch's CPU flash kernel, into one output.

    Calling sdpa per conversation and concatenating keeps every attention output twice until the
    backward pass: the pieces (saved by sdpa) and their concatenation (saved by o_proj); the
    slicing also gave every conversation's gradient a zero-filled tensor of the whole row. Here
    the kernel's output is copied into one tensor, which is both what is saved and what o_proj
    reads, and the gradients are written into one tensor each. The kernels are sdpa's own, so the
    results are bit for bit the same (tests/test_speed.py).

    A conversation that attends to a prefix it does not hold (a row's shared prefix, laid once
    at the start of the row; a step prefix's keys and values, `outer_key` and `outer_value`) gets
    a second kernel call, over the prefix's keys with no causal mask, and the two results are
    merged by their log-sum-exps. Given the merged output and log-sum-exp, the backward kernel
    gives each call its exact share of the gradients (as split-key attention does); the prefix's
    key and value gradients from every conversation are summed.
    """

    @staticmethod
    def forward(ctx, query, key, value, outer_key, outer_value, bounds: list[int], prefix: int, scale: float | None):
        batch, heads, length, dim = query.shape
        # (batch, length, heads, dim) is the layout the kernel writes and the one o_proj reads
        out = query.new_empty(batch, length, heads, dim)
        lse = query.new_empty(batch, heads, length)
        for i, (a, b) in enumerate(itertools.pairwise(bounds)):
            q = query[:, :, a:b]
            piece, piece_lse = compat.flash_attention_cpu(q, key[:, :, a:b], value[:, :, a:b], True, scale)
            context = _context(key, value, outer_key, outer_value, prefix if i else 0)
            if context is not None:
                piece, piece_lse = _merge(piece, piece_lse, *compat.flash_attention_cpu(q, *context, False, scale))
            out[:, a:b] = piece.transpose(1, 2)
            lse[:, :, a:b] = piece_lse
        ctx.save_for_backward(query, key, value, outer_key, outer_value, out, lse)
        ctx.bounds, ctx.prefix, ctx.scale = bounds, prefix, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, outer_key, outer_value, out, lse = ctx.saved_tensors
        grads = [
            torch.empty_like(t.transpose(1, 2), memory_format=torch.contiguous_format).transpose(1, 2)
            for t in (query, key, value)
        ]
        outer_grads = [
            torch.zeros_like(t) if t is not None and ctx.needs_input_grad[3 + i] else None
            for i, t in enumerate((outer_key, outer_value))
        ]
        outer = 0 if outer_key is None else outer_key.shape[2]
        grad_out, out = grad_out.transpose(1, 2), out.transpose(1, 2)
        for i, (a, b) in enumerate(itertools.pairwise(ctx.bounds)):
            skip = ctx.prefix if i else 0
            upstream, q, o, piece_lse = (
                grad_out[:, :, a:b],
                query[:, :, a:b],
                out[:, :, a:b],
                lse[:, :, a:b].contiguous(),
            )
            pieces = compat.flash_attention_cpu_backward(
                upstream, q, key[:, :, a:b], value[:, :, a:b], o, piece_lse, True, ctx.scale
            )
            for grad, piece in zip(grads, pieces):
                grad[:, :, a:b] = piece
            context = _context(key, value, outer_key, outer_value, skip)
            if context is None:
                continue
            grad_q, grad_k, grad_v = compat.flash_attention_cpu_backward(
                upstream, q, *context, o, piece_lse, False, ctx.scale
            )
            grads[0][:, :, a:b] += grad_q
            for grad, piece in zip(outer_grads, (grad_k, grad_v)):
                if grad is not None:
                    grad += piece[:, :, :outer]
            if skip:  # keys and values of the row's prefix: added to what the first conversation wrote
                grads[1][:, :, :skip] += grad_k[:, :, outer:]
                grads[2][:, :, :skip] += grad_v[:, :, outer:]
        return *grads, *outer_grads, None, None, None


def _context(key, value, outer_key, outer_value, skip: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The keys and values a conversation attends to before its own: a step prefix's, then the row's first `skip`."""
    pairs = ([(outer_key, outer_value)] if outer_key is not None else []) + (
        [(key[:, :, :skip], value[:, :, :skip])] if skip else []
    )
    if not pairs:
        return None
    if len(pairs) == 1:
        return pairs[0]
    return torch.cat([k for k, _ in pairs], dim=2), torch.cat([v for _, v in pairs], dim=2)


def _merge(out, lse, other, other_lse) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over two sets of keys from attention over each: outputs weighed by their softmax mass."""
    total = torch.logaddexp(lse, other_lse)
    return out * (lse - total).exp_().unsqueeze(-1) + other * (other_lse - total).exp_().unsqueeze(-1), total
