"""JSONL conversations -> chat template (with the safety system prompt) -> tokens with labels.

Loss is computed on assistant tokens only: system, user and template tokens get label -100.
Reading and checking a file needs no torch (imported where batches are made), so train.py
reports a bad file before the heavy libraries load.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import itertools
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from medlora.config import MedloraError

if TYPE_CHECKING:
    import torch

IGNORE = -100
ROLES = ("system", "user", "assistant")


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a bad line is reported with file and line."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise MedloraError(
            f"{path} is not UTF-8 text ({err.reason} at byte {err.start}): save it as UTF-8 JSONL."
        ) from err
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise MedloraError(
                f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno}). Each line must be one JSON object."
            ) from err
        if not isinstance(row, dict):
            raise MedloraError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}.")
        rows.append((number, row))
    return rows


def to_messages(row: dict, where: str) -> list[dict]:
    """Accept OpenAI `messages`, alpaca (`instruction`/`input`/`output`) and `prompt`/`completion`."""
    if "messages" in row:
        messages = row["messages"]
    elif "instruction" in row and "output" in row:
        prompt = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]
    elif "prompt" in row and "completion" in row:
        messages = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]
    else:
        raise MedloraError(
            f'{where}: unknown record format with keys {sorted(row)}. Use {{"messages": [...]}}, '
            'alpaca {"instruction", "input", "output"} or {"prompt", "completion"}.'
        )
    return _checked(messages, where)


def _checked(messages, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise MedloraError(f"{where}: `messages` must be a non-empty list of {{role, content}} objects.")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise MedloraError(f"{where}: message {i} needs a string `content`.")
        if message.get("role") not in ROLES:
            raise MedloraError(
                f"{where}: message {i} has unknown role {message.get('role')!r}; use one of {', '.join(ROLES)}."
            )
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise MedloraError(
            f"{where}: the conversation has no assistant turn, so there is nothing to learn. "
            "Add an assistant message or remove the line."
        )
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def load_conversations(path: str | Path, limit: int | None = None) -> list[list[dict]]:
    conversations = [to_messages(row, f"{path}:{number}") for number, row in read_jsonl(path)]
    if not conversations:
        raise MedloraError(
            f"{path} has no conversations: the file is empty. Give a JSONL file with one conversation per line."
        )
    return conversations[:limit] if limit else conversations


def with_system_prompt(messages: list[dict], system_prompt: str | None) -> list[dict]:
    if system_prompt and messages[0]["role"] != "system":
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


def _render(tokenizer, messages, generation_prompt=False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character spans of each assistant reply, end-of-turn token included.

    Rendering message prefixes finds the spans for any template whose output for the first k
    messages is a prefix of its output for k+1 (true of ChatML, Llama 3, Phi, Mistral templates).
    """
    text = _render(tokenizer, messages)
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_render(tokenizer, messages[:k], generation_prompt=True)) if k else 0
        upto = _render(tokenizer, messages[: k + 1])
        if not text.startswith(upto):
            raise MedloraError(
                "the chat template renders a conversation differently from its prefixes, so "
                "assistant tokens cannot be located. Use a model with a standard chat template."
            )
        # trailing whitespace after the end-of-turn token is template layout, not the reply
        spans.append((start, len(upto.rstrip())))
    return text, spans


def fingerprint(tokenizer) -> str:
    """A hash of what decides a tokenizer's output: vocabulary and rules, special tokens, chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    rules = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    special = json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)
    return hashlib.sha256("\0".join([rules, special, str(tokenizer.chat_template)]).encode()).hexdigest()


def tokenize_conversation(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    text, spans = assistant_spans(tokenizer, messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = [IGNORE] * len(encoded["input_ids"])
    for i, (start, _end) in enumerate(encoded["offset_mapping"]):
        if any(a <= start < b for a, b in spans):
            labels[i] = encoded["input_ids"][i]
    return encoded["input_ids"], labels


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


@dataclass
class TokenStats:
    conversations: int = 0
    truncated: int = 0
    dropped: int = 0
    tokens: int = 0
    supervised_tokens: int = 0

    def as_metrics(self, prefix: str) -> dict[str, int]:
        return {f"{prefix}_{name}": value for name, value in self.__dict__.items()}


def tokenize_dataset(conversations, tokenizer, system_prompt, max_seq_len: int, overlong: str):
    examples, stats = [], TokenStats()
    for messages in conversations:
        ids, labels = tokenize_conversation(tokenizer, with_system_prompt(messages, system_prompt))
        if len(ids) > max_seq_len:
            if overlong == "drop":
                stats.dropped += 1
                continue
            ids, labels = ids[:max_seq_len], labels[:max_seq_len]
            if all(label == IGNORE for label in labels[1:]):
                # the prompt alone fills the window: no reply token left to learn from
                stats.dropped += 1
                continue
            stats.truncated += 1
        examples.append(Example(ids, labels))
        stats.conversations += 1
        stats.tokens += len(ids)
        stats.supervised_tokens += sum(label != IGNORE for label in labels[1:])
    return examples, stats


def build_data(data_cfg) -> None:
    """Run `data.build` (a `_target_` that writes the data files) where the data group has one."""
    if data_cfg.get("build") is not None:
        from hydra.utils import instantiate

        instantiate(data_cfg.build)


def load_splits(data_cfg, seed: int) -> tuple[list, list]:
    """(train, eval) conversations of a `data` config: eval_file, or an eval_split of train_file."""
    train = load_conversations(data_cfg.train_file)
    if data_cfg.eval_file:
        evals = load_conversations(data_cfg.eval_file)
    else:
        train, evals = split_eval(train, data_cfg.eval_split, seed)
    return train[: data_cfg.max_train_samples], evals[: data_cfg.max_eval_samples]


def split_eval(conversations: list, fraction: float, seed: int) -> tuple[list, list]:
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, math.ceil(len(order) * fraction))
    if n_eval >= len(order):
        raise MedloraError(
            f"only {len(order)} conversations: too few to hold out data.eval_split={fraction}. "
            "Add data or give data.eval_file."
        )
    held = set(order[:n_eval])
    return (
        [c for i, c in enumerate(conversations) if i not in held],
        [c for i, c in enumerate(conversations) if i in held],
    )


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
