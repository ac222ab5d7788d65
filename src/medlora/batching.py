"""Tokenized examples -> micro-batches: padded and grouped by length, or packed end to end.

Kept apart from reading and tokenizing (medlora.data, which needs no torch): these are the
choices that set a step's compute (how little goes to padding, what a shared prefix spares),
and the token counts here are what the loss weighting and the throughput are measured in.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import math
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from medlora.data import IGNORE, Example

if TYPE_CHECKING:
    import torch


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    import torch

    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@dataclass
class LengthGroupedBatches:
    """Shuffled batches whose members have similar lengths, so little compute goes to padding.

    Like transformers' group_by_length: shuffle, cut into mega-batches of 50 batches, sort each
    by length, split into batches, shuffle the batch order. A new order every epoch.
    """

    lengths: list[int]
    batch_size: int
    seed: int
    group_by_length: bool = True
    shuffle: bool = True
    epoch: int = field(default=0, init=False)

    def __iter__(self):
        rng = random.Random(self.seed + self.epoch)
        self.epoch += 1
        order = list(range(len(self.lengths)))
        if not self.shuffle:
            order.sort(key=lambda i: -self.lengths[i])
            yield from (order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size))
            return
        rng.shuffle(order)
        if self.group_by_length:
            mega = self.batch_size * 50
            order = [
                i
                for s in range(0, len(order), mega)
                for i in sorted(order[s : s + mega], key=lambda i: -self.lengths[i])
            ]
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        rng.shuffle(batches)
        yield from batches

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)


def collate_packed(examples: list[Example], share_prefix: bool = False) -> dict:
    """Conversations laid end to end in one row, with no padding and no attention mask.

    position_ids restart at 0 for each conversation, which is how transformers tells the
    conversations apart (a 2-D attention mask would switch that off and let them attend to each
    other). cu_seq_lens marks the boundaries for attention kernels that run per conversation:
    flash-attention's varlen path, and medlora's `sdpa_varlen` (medlora.fast.attention).

    `share_prefix` (sdpa_varlen only): the tokens every conversation of the row begins with, up to
    the first label (the safety system prompt), are laid once; the later conversations start
    after them, with their positions, and `shared_prefix` tells sdpa_varlen to let them attend
    to the prefix. No label is lost: the prefix has none.
    """
    import torch

    prefix = shared_prefix(examples) if share_prefix and len(examples) > 1 else 0
    pieces = [
        (e.input_ids[skip:], [IGNORE, *e.labels[1:]][skip:], range(skip, len(e.input_ids)))
        for e, skip in zip(examples, [0] + [prefix] * (len(examples) - 1))
    ]
    lengths = [len(ids) for ids, _, _ in pieces]
    bounds = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    batch = {
        "input_ids": torch.tensor([[t for ids, _, _ in pieces for t in ids]]),
        "position_ids": torch.tensor([[p for _, _, positions in pieces for p in positions]]),
        # the first label of each conversation is dropped: no target across a boundary
        "labels": torch.tensor([[label for _, labels, _ in pieces for label in labels]]),
        "cu_seq_lens_q": bounds,
        "cu_seq_lens_k": bounds,
        "max_length_q": max(lengths),
        "max_length_k": max(lengths),
    }
    if prefix:
        batch["shared_prefix"] = prefix
    return batch


def shared_prefix(examples: list[Example]) -> int:
    """How many leading tokens all `examples` have in common before any of them has a label."""
    first = examples[0].input_ids
    common = min(prefix_room(e.labels) for e in examples)
    for e in examples[1:]:
        common = next((i for i in range(common) if e.input_ids[i] != first[i]), common)
    return max(common, 0)


def prefix_room(labels) -> int:
    """How many leading tokens of a conversation a shared prefix may cover: all before its first
    label but one, so the conversation keeps its first token after the prefix (whose label
    collate_packed drops anyway) and no prediction crosses from the prefix."""
    return next((i for i, label in enumerate(labels) if label != IGNORE), len(labels)) - 1


def supervised_tokens(batch: dict) -> int:
    """Tokens that carry a label: the model predicts token t+1 at position t, so the first never does."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def real_tokens(batch: dict) -> int:
    """Tokens of the conversations in a micro-batch, padding excluded, a shared prefix counted for each."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return batch["input_ids"].numel() + shared_tokens(batch)


def shared_tokens(batch: dict) -> int:
    """Tokens of a packed micro-batch's conversations that it does not compute: a shared prefix's
    copies after the row's first, and a step prefix (medlora.fast.prefix) in every conversation."""
    if "cu_seq_lens_q" not in batch:
        return 0
    conversations = len(batch["cu_seq_lens_q"]) - 1
    step = batch["step_prefix"].length * conversations if "step_prefix" in batch else 0
    return batch.get("shared_prefix", 0) * (conversations - 1) + step


@dataclass
class PackedBatches:
    """Micro-batches of up to `tokens` tokens, filled best-fit-decreasing; a new order each epoch.

    Best-fit decreasing leaves a few percent of each budget empty at most, so nearly every
    micro-batch carries the same number of tokens, whatever the spread of conversation lengths.
    """

    lengths: list[int]
    tokens: int
    seed: int
    shuffle: bool = True
    epoch: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.batches = pack(self.lengths, self.tokens)

    def __iter__(self):
        order = list(range(len(self.batches)))
        if self.shuffle:
            random.Random(self.seed + self.epoch).shuffle(order)
        self.epoch += 1
        yield from (self.batches[i] for i in order)

    def __len__(self) -> int:
        return len(self.batches)


def pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: indices grouped so each group's lengths sum to at most `capacity`."""
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, bin number), kept sorted
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        spot = bisect.bisect_left(free, (lengths[i], -1))
        if spot == len(free):
            bins.append([i])
            left, number = capacity - lengths[i], len(bins) - 1
        else:
            left, number = free.pop(spot)
            bins[number].append(i)
            left -= lengths[i]
        bisect.insort(free, (left, number))
    return bins


def loaders(data, training, pad_id: int, seed: int, share_prefix: bool):
    """(train, eval) loaders of prepared data as the training config asks: packed rows of
    batch_size * max_seq_len tokens, or padded batches of batch_size conversations."""
    packed_tokens = training.batch_size * training.max_seq_len if training.packing else 0
    common = dict(packed_tokens=packed_tokens, share_prefix=share_prefix)
    return (
        make_loader(data.train_set, training.batch_size, pad_id, seed, True, training.group_by_length, **common),
        make_loader(data.eval_set, training.batch_size, pad_id, seed, False, **common),
    )


def make_loader(
    examples: list[Example],
    batch_size: int,
    pad_id: int,
    seed: int,
    train: bool,
    group_by_length: bool = True,
    packed_tokens: int = 0,
    share_prefix: bool = False,
) -> torch.utils.data.DataLoader:
    """Padded batches of `batch_size` conversations, or packed micro-batches of `packed_tokens` tokens
    (`share_prefix`: see collate_packed)."""
    import torch.utils.data

    lengths = [len(e.input_ids) for e in examples]
    if packed_tokens:
        sampler = PackedBatches(lengths, packed_tokens, seed, shuffle=train)
        return torch.utils.data.DataLoader(
            examples, batch_sampler=sampler, collate_fn=functools.partial(collate_packed, share_prefix=share_prefix)
        )
    sampler = LengthGroupedBatches(lengths, batch_size, seed, group_by_length=group_by_length, shuffle=train)
    return torch.utils.data.DataLoader(
        examples, batch_sampler=sampler, collate_fn=functools.partial(collate, pad_id=pad_id)
    )


def to_device(batch: dict, device) -> dict:
    import torch

    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def endless(loader, skip: int):
    """Micro-batches epoch after epoch (the sampler reshuffles each epoch), after skipping `skip`."""
    while True:
        for batch in loader:
            if skip:
                skip -= 1
                continue
            yield batch


class Throughput:
    """Tokens per second over the optimizer steps, evals and checkpoints excluded.

    tokens/s counts the tokens of the conversations (padding excluded; a shared prefix counted
    once per conversation, as if it were not shared); supervised tokens/s counts the tokens that
    have a label, i.e. the assistant replies the loss is computed on. The shared fraction is the
    part of those tokens that a shared prefix (training.shared_prefix) spared computing.
    """

    def __init__(self) -> None:
        self.tokens, self.supervised, self.spared, self.seconds = 0, 0, 0, 0.0

    def add(self, tokens: int, supervised: int, seconds: float, spared: int = 0) -> None:
        self.tokens, self.supervised, self.seconds = (
            self.tokens + tokens,
            self.supervised + supervised,
            self.seconds + seconds,
        )
        self.spared += spared

    def summary(self) -> dict[str, float]:
        return {
            "train_tokens_per_second": self.tokens / max(self.seconds, 1e-9),
            "train_supervised_tokens_per_second": self.supervised / max(self.seconds, 1e-9),
            "train_shared_prefix_fraction": self.spared / max(self.tokens, 1),
        }
