"""LoRA layers that train in less time and memory than peft's, with the same maths.

- FusedLoraLinear: peft's LoRA Linear whose training forward is one autograd function that keeps
  its input once, its dropout mask as bits (pack_bits) and applies the scaling on the rank-r product.
- fuse_swiglu: a SwiGLU MLP of three fused layers runs as one function that recomputes its product.
- mark_norm_outputs: a norm's output read by fused layers is remade in the backward pass, not kept.
- FastDropout: dropout whose CPU mask takes 16 random bits per element instead of 32.
Each has an equivalence test against peft's path in tests/test_speed.py.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
import types

import torch
import torch.nn.functional as F
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from transformers.activations import SiLUActivation

from medlora.fast import compat


def fused_lora_blocker(model) -> str | None:
    """Why the fused layers cannot train this (peft-wrapped) model, or None where they can."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base, "is_quantized", False):
        return "quantized base weights: bitsandbytes layers keep their own LoRA layers"
    if any(getattr(config, "use_dora", False) for config in getattr(model, "peft_config", {}).values()):
        return "DoRA: it has its own maths"
    return None


def fuse_lora_layers(model) -> int:
    """Make every peft LoRA Linear over an nn.Linear a FusedLoraLinear; return how many.

    FusedLoraLinear adds a forward and no state, so each layer peft built becomes the one peft
    would have built with FusedLoraLinear registered as its custom module for nn.Linear.
    """
    layers = [m for m in model.modules() if type(m) is LoraLinear and isinstance(m.get_base_layer(), torch.nn.Linear)]
    for layer in layers:
        layer.__class__ = FusedLoraLinear
    return len(layers)


def use_fast_dropout(model) -> int:
    """Replace the LoRA layers' torch dropouts (p > 0) with FastDropout; return how many."""
    count = 0
    for layer in (m for m in model.modules() if isinstance(m, LoraLayer)):
        for name, dropout in layer.lora_dropout.items():
            if isinstance(dropout, torch.nn.Dropout) and dropout.p > 0:
                layer.lora_dropout[name] = FastDropout(dropout.p)
                count += 1
    return count


def skip_input_casts(model) -> int:
    """Under autocast: stop every LoRA layer casting its input to fp32; return how many layers.

    peft upcasts every input to the fp32 adapter weights, and autocast casts it straight back to
    bf16 for the matmul: a wasted copy of each activation, twice per layer.
    """
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    for layer in layers:
        compat.skip_input_cast(layer)
    return len(layers)


class FastDropout(torch.nn.Module):
    """nn.Dropout whose mask takes 16 random bits per element, four elements per 64-bit draw.

    On a CPU torch draws one 32-bit number per element, on one thread: with dropout on the input
    of every adapted layer that is a large share of a training step, and this draw costs a
    fraction of it. Same distribution; p is rounded to a multiple of 1/65536. GPUs keep torch's
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
        words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64)
        return words.view(torch.int16)[:n].view(x.shape) >= round(p * 65536) - 32768
    return torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(1 - p)


# int64 constants of the bit tricks below (bit i of a byte <-> byte i of a word, little-endian)
_GATHER = 0x0102040810204080  # moves the low bit of byte i to bit 56 + i
_SPREAD = 0x0101010101010101  # copies a byte into all eight
_SELECT = 0x8040201008040201 - 2**64  # keeps bit i of byte i
_ROUND = 0x7F7F7F7F7F7F7F7F  # a byte's top bit set iff it was not 0


def pack_bits(mask: torch.Tensor | None) -> torch.Tensor | None:
    """A 0/1 uint8 (or bool) mask packed eight elements to a byte, for the backward pass: 1/8 of its memory."""
    if mask is None:
        return None
    flat = mask.reshape(-1)
    if flat.numel() % 8:
        flat = torch.cat([flat, flat.new_zeros(8 - flat.numel() % 8)])
    # one multiply per eight elements; the products of different bytes never overlap, so no carries
    return ((flat.view(torch.int64) * _GATHER) >> 56).to(torch.uint8)


def unpack_bits(packed: torch.Tensor | None, shape: torch.Size) -> torch.Tensor | None:
    """pack_bits undone, as a 0/1 uint8 tensor shaped `shape` (it multiplies like the bool mask)."""
    if packed is None:
        return None
    words = packed.to(torch.int64)
    words.mul_(_SPREAD).bitwise_and_(_SELECT).add_(_ROUND).bitwise_right_shift_(7).bitwise_and_(_SPREAD)
    return words.view(torch.uint8)[: shape.numel()].view(shape)


class FusedLoraLinear(LoraLinear):
    """peft's LoRA Linear whose training forward is one autograd function (_LoraLinearFunction).

    peft's `base(x) + lora_B(lora_A(dropout(x))) * scaling` keeps, for the backward pass, a dropped
    fp32 copy of the input in every adapted layer and a mask beside it, and spends a full pass over
    the output on the scaling. Here the input is kept once (q, k and v, or gate and up, read the
    same tensor) with a 1-bit mask, and the scaling applies to the rank-r product. Evaluation,
    merged or disabled adapters, several active adapters and other variants keep peft's path.
    """

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        fused = None if args or kwargs else self.fused_inputs()
        if fused is None:
            return super().forward(x, *args, **kwargs)
        return _LoraLinearFunction.apply(x, *fused)

    def fused_inputs(self) -> tuple | None:
        """(weight, bias, lora_A, lora_B, scaling, dropout p, fast dropout) when the fused path applies, else None."""
        adapters = [a for a in self.active_adapters if a in self.lora_A]
        base = self.base_layer
        if (
            not (self.training and torch.is_grad_enabled())
            or self.disable_adapters
            or self.merged
            or len(adapters) != 1
            or adapters[0] in compat.lora_variants(self)
            or type(base) is not torch.nn.Linear
            or base.weight.requires_grad
            or self.fan_in_fan_out
        ):
            return None
        (name,) = adapters
        lora_a, lora_b, dropout = self.lora_A[name], self.lora_B[name], self.lora_dropout[name]
        if lora_a.bias is not None or lora_b.bias is not None:
            return None
        return (
            base.weight,
            base.bias,
            lora_a.weight,
            lora_b.weight,
            self.scaling[name],
            getattr(dropout, "p", 0.0),
            isinstance(dropout, FastDropout),
        )


def _masked(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    return x if keep is None else x * keep


def _lora_forward(x2, weight, bias, lora_a, lora_b, scaling: float, p: float, fast: bool):
    """(x W^T + b + (s / (1 - p)) ((x * keep) A^T) B^T, keep, the rank-r product) for 2-D x, in x's dtype."""
    # as 0/1 bytes: multiplying by them is faster than multiplying by bools on a CPU
    keep = keep_mask(x2, p, fast).view(torch.uint8) if p > 0 else None
    a, b = lora_a.to(x2.dtype), lora_b.to(x2.dtype)
    # the dropout's 1 / (1 - p) goes with the scaling onto the rank-r product
    h = (_masked(x2, keep) @ a.T).mul_(scaling / (1 - p))
    y = torch.addmm(bias.to(x2.dtype), x2, weight.T) if bias is not None else x2 @ weight.T
    return y.addmm_(h, b.T), keep, h


def _lora_backward(g, x2, keep, h, weight, lora_a, lora_b, scale: float, want_x: bool, want_bias: bool):
    """Gradients of _lora_forward (x, lora_A, lora_B, bias) from the output gradient `g`, 2-D."""
    a, b = lora_a.to(x2.dtype), lora_b.to(x2.dtype)
    gh = (g @ b).mul_(scale)
    grad_b = (g.T @ h).to(lora_b.dtype)
    grad_a = (gh.T @ _masked(x2, keep)).to(lora_a.dtype)
    grad_x = None
    if want_x:
        lora_x = gh @ a
        grad_x = (g @ weight).add_(lora_x.mul_(keep) if keep is not None else lora_x)
    return grad_x, grad_a, grad_b, g.sum(0) if want_bias else None


class _LoraLinearFunction(torch.autograd.Function):
    """y = x W^T + b + (s / (1 - p)) ((x * keep) A^T) B^T, computed in the base weight's dtype.

    An input marked by `recomputable` (a norm's output) is not kept: the tensors it is made from
    are, and autograd keeps those for the backward pass anyway.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float, p: float, fast: bool):
        shape = x.shape
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, shape[-1]).to(weight.dtype)
            y, keep, h = _lora_forward(x2, weight, bias, lora_a, lora_b, scaling, p, fast)
        ctx.remake, kept = getattr(x, _REMAKE, (None, (x2,)))
        if ctx.remake is not None:
            ctx.remake.readers += 1
        ctx.save_for_backward(*kept, pack_bits(keep), h, weight, lora_a, lora_b)
        ctx.scale, ctx.shape, ctx.has_bias = scaling / (1 - p), shape, bias is not None
        return y.view(*shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad):
        *kept, keep, h, weight, lora_a, lora_b = ctx.saved_tensors
        x2 = kept[0] if ctx.remake is None else ctx.remake.get(kept).reshape(-1, ctx.shape[-1]).to(weight.dtype)
        keep = unpack_bits(keep, x2.shape)
        g = grad.reshape(-1, grad.shape[-1]).to(weight.dtype)
        grad_x, grad_a, grad_b, grad_bias = _lora_backward(
            g,
            x2,
            keep,
            h,
            weight,
            lora_a,
            lora_b,
            ctx.scale,
            ctx.needs_input_grad[0],
            ctx.has_bias and ctx.needs_input_grad[2],
        )
        return grad_x.view(ctx.shape) if grad_x is not None else None, None, grad_bias, grad_a, grad_b, None, None, None


class Remake:
    """fn(*tensors) made again in the backward pass, under the forward's autocast state, once for
    all the layers that read it (q, k and v read one norm's output)."""

    def __init__(self, fn, autocast: tuple):
        self.fn, self.autocast = fn, autocast
        self.readers, self.made = 0, None

    def get(self, tensors) -> torch.Tensor:
        if self.made is None:
            device, enabled, dtype = self.autocast
            with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
                self.made = self.fn(*tensors)
        made = self.made
        self.readers -= 1
        if self.readers == 0:  # the last reader: free it
            self.made = None
        return made


_REMAKE = "_medlora_remake"


def recomputable(output: torch.Tensor, fn, *tensors: torch.Tensor) -> torch.Tensor:
    """Mark `output` as fn(*tensors), tensors that autograd keeps anyway, so that a fused LoRA
    layer reading `output` keeps those instead of a second copy of it. fn must be deterministic."""
    if torch.is_grad_enabled():
        device = output.device.type
        autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        # the tensors stay apart from the Remake: the readers hand them to save_for_backward, which
        # frees them after the backward pass, while the Remake lives as long as the graph
        setattr(output, _REMAKE, (Remake(fn, autocast), tensors))
    return output


def mark_norm_outputs(model) -> int:
    """Mark the output of every RMSNorm/LayerNorm as recomputable from its input; return how many.

    The norm keeps its input for its own backward pass, and the q, k, v (or gate, up) layers that
    read its output would keep that too: one tensor of the model's width per norm, twice per layer.
    Recomputing the norm in the backward pass is one elementwise pass over it.
    """
    norms = [
        m
        for m in model.modules()
        if type(m).__name__.endswith("RMSNorm") or isinstance(m, (torch.nn.LayerNorm, torch.nn.RMSNorm))
    ]
    for norm in norms:
        norm.register_forward_hook(_mark_norm_output, with_kwargs=True)
    return len(norms)


def _mark_norm_output(module, args, kwargs, output):
    if module.training and len(args) == 1 and not kwargs and isinstance(output, torch.Tensor):
        recomputable(output, module, args[0])


# the MLP of Llama, Mistral, Qwen2/3, SmolLM2 and most models transformers derives from them,
# written either way; a body that does anything more (a dropout after down_proj) keeps its own path
_SWIGLU_BODIES = {
    "down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))\nreturn down_proj",
    "return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))",
}


def fuse_swiglu(model) -> int:
    """Route SwiGLU MLPs whose three projections are FusedLoraLinear through _SwigluLoraFunction; return how many."""
    count = 0
    for module in model.modules():
        projections = [getattr(module, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        if (
            all(isinstance(p, FusedLoraLinear) for p in projections)
            and isinstance(getattr(module, "act_fn", None), (SiLUActivation, torch.nn.SiLU))
            and _body(type(module).forward) in _SWIGLU_BODIES
        ):
            module.forward = types.MethodType(_swiglu_forward, module)
            count += 1
    return count


def _body(function) -> str:
    """A function's statements, docstring left out, as ast prints them ("" without source code)."""
    try:
        (definition,) = ast.parse(textwrap.dedent(inspect.getsource(function))).body
    except (OSError, TypeError, SyntaxError, ValueError):  # e.g. remote code compiled on the fly
        return ""
    statements = [s for s in definition.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
    return "\n".join(ast.unparse(s) for s in statements)


def _swiglu_forward(mlp, x: torch.Tensor) -> torch.Tensor:
    fused = mlp.down_proj.fused_inputs()
    if fused is None:
        return mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
    return _SwigluLoraFunction.apply(mlp.gate_proj(x), mlp.up_proj(x), *fused)


class _SwigluLoraFunction(torch.autograd.Function):
    """down(silu(gate) * up), down a LoRA linear layer as in _LoraLinearFunction.

    Autograd would keep gate, silu(gate), up and their product for the backward pass: four
    tensors of the MLP's width (the widest activations of the model). Here only gate and up are
    kept and the product is recomputed, one elementwise pass: a lower peak for a little compute.
    """

    @staticmethod
    def forward(ctx, gate, up, weight, bias, lora_a, lora_b, scaling: float, p: float, fast: bool):
        shape = gate.shape
        with torch.autocast(gate.device.type, enabled=False):
            g2, u2 = gate.reshape(-1, shape[-1]).to(weight.dtype), up.reshape(-1, shape[-1]).to(weight.dtype)
            y, keep, h = _lora_forward(F.silu(g2).mul_(u2), weight, bias, lora_a, lora_b, scaling, p, fast)
        ctx.save_for_backward(g2, u2, pack_bits(keep), h, weight, lora_a, lora_b)
        ctx.scale, ctx.shape, ctx.has_bias = scaling / (1 - p), shape, bias is not None
        return y.view(*shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad):
        g2, u2, keep, h, weight, lora_a, lora_b = ctx.saved_tensors
        keep = unpack_bits(keep, g2.shape)
        silu = F.silu(g2)
        grad_x, grad_a, grad_b, grad_bias = _lora_backward(
            grad.reshape(-1, grad.shape[-1]).to(weight.dtype),
            silu * u2,
            keep,
            h,
            weight,
            lora_a,
            lora_b,
            ctx.scale,
            True,
            ctx.has_bias and ctx.needs_input_grad[3],
        )
        grad_up = (grad_x * silu).view(ctx.shape)
        grad_gate = compat.silu_backward(grad_x.mul_(u2), g2).view(ctx.shape)
        return grad_gate, grad_up, None, grad_bias, grad_a, grad_b, None, None, None
