"""JSONL conversations -> chat template (with the safety system prompt) -> tokens with labels.

Loss is computed on assistant tokens only: system, user and template tokens get label -100.
Reading and checking a file needs no torch, so train.py reports a bad file before the heavy
libraries load; the examples become batches in medlora.batching.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from medlora.config import MedloraError

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
