"""What the speed path's tests share: the tiny model loaded as a run loads it, random conversations,
and an adapter with the speed tricks a training config asks for (medlora.fast.apply)."""

from __future__ import annotations

import random

from omegaconf import OmegaConf

from medlora.config import option

from helpers import ROOT

LORA = {"rank": 4, "alpha": 8, "target_modules": "all-linear", "use_dora": False, "use_rslora": False, "bias": "none"}


def tiny(packed: bool, attn: str = "sdpa"):
    """tiny_random in fp32, eval mode, with the attention a run picks for packed (or padded) batches."""
    from medlora.config import option
    from medlora.fast import attention
    from medlora.model import load_model, resolve_checkpoint

    model_cfg = option("model", "tiny_random")
    model_cfg.attn_implementation = attn
    path, _ = resolve_checkpoint(model_cfg, str(ROOT / ".cache"), seed=42)
    return load_model(path, model_cfg, "fp32", "cpu", attn_implementation=attention.implementation(attn, packed)).eval()


def training(**changes):
    """conf/training/default.yaml with `changes`: what fast.apply reads."""
    return OmegaConf.merge(option("training", "default"), changes)


def adapted(
    model, dropout: float = 0.0, checkpointing: bool = False, precision: str = "fp32", bias: str = "none", **changes
) -> tuple:
    """`model` with a LoRA adapter (rank 4, every linear layer) and the speed path training(**changes)
    asks for: (peft model, Applied)."""
    from medlora import fast
    from medlora.adapters import add_adapter

    model, _, _ = add_adapter(model, OmegaConf.create({**LORA, "dropout": dropout, "bias": bias}), checkpointing)
    return model, fast.apply(model, training(**changes), precision=precision)


def random_examples(n: int = 5, seed: int = 0) -> list:
    """`n` conversations of 12 to 60 random tokens, each with an unlabelled start and a labelled reply."""
    from medlora import data as medata

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(12, 60)
        ids = [rng.randrange(100, 40000) for _ in range(length)]
        cut = rng.randint(4, length - 4)
        out.append(medata.Example(ids, [medata.IGNORE] * cut + ids[cut:]))
    return out
