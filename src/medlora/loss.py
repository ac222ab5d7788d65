"""The causal-LM loss, summed over supervised tokens, and the token-weighted eval loss.

`chunked` runs the LM head only where a label exists (medlora.fast.loss): the same cross-entropy
in less time and memory, for models whose head fast.apply found plain (Applied.chunked_loss).
"""

from __future__ import annotations

import math

import torch

from medlora.batching import to_device
from medlora.data import IGNORE
from medlora.fast.loss import chunked_loss_sum


def loss_sum(model, batch: dict, chunked: bool) -> tuple[torch.Tensor, int]:
    """(sum of the per-token losses, number of supervised tokens) for one micro-batch.

    Every token counts once, so callers can weight micro-batches of different sizes exactly.
    """
    labels = batch["labels"]
    targets = labels[:, 1:]
    supervised = targets != IGNORE
    count = int(supervised.sum())  # note: a device-to-host sync on a GPU
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if not chunked:
        # the model averages over the supervised tokens; scale back to a sum
        return model(**inputs, labels=labels).loss * count, count
    return chunked_loss_sum(model, inputs, targets, supervised), count


@torch.no_grad()
def mean_loss(model, loader, accelerator, chunked: bool = False) -> dict[str, float]:
    """Token-weighted mean loss over every supervised token of `loader`, and its perplexity.

    Hands the model back in train mode: the training loop calls it between steps.
    """
    model.eval()
    total, count = 0.0, 0
    for batch in loader:
        with accelerator.autocast():
            summed, n = loss_sum(model, to_device(batch, accelerator.device), chunked)
        total += summed.float().item()
        count += n
    model.train()
    mean = total / count
    return {"eval_loss": mean, "eval_perplexity": math.exp(mean)}
