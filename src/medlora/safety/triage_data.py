"""The triage model's training and validation files, built at the start of each `data=safety_triage` run.

Sources, each row one conversation and one of the four labels:
- `data/safety_triage/train/`, `val/` and `rules/` (the sets the rules were written against: train
  only): this project's own rows;
- `<shared>/safety_public/*.jsonl`: public red-teaming and moderation prompts, split into train and
  val by near-duplicate group; read here, never copied into the repository;
- `<shared>/medquad/`: benign medical questions, a seeded sample per split.
`data/safety_triage/test/` is never read here: it is the held-out split.

Writes `train.jsonl` and `val.jsonl` in the classifier's chat format (instruction, transcript, label)
for train.py, and `val_rows.jsonl` (the conversations and labels) for choosing thresholds; a file is
rewritten only when its content changes, so the tokenized-data cache stays valid.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
from collections import Counter
from pathlib import Path

from medlora.config import MedloraError
from medlora.data import read_jsonl
from medlora.safety.triage_model import LABELS, classifier_messages

log = logging.getLogger(__name__)

PUBLIC = "safety_public"
MEDQUAD = "medquad"
NEAR_DUPLICATE = 0.6  # token-set Jaccard at or above which two public prompts count as one scenario


def build(
    own_dir: str,
    shared_dir: str | None,
    out_dir: str,
    instruction: str,
    max_chars: int,
    seed: int,
    medquad: dict,
    public_val_fraction: float,
) -> dict[str, Counter]:
    own, out = Path(own_dir), Path(out_dir)
    splits = {"train": _own(own / "train") + _own(own / "rules"), "val": _own(own / "val")}
    if not splits["train"] or not splits["val"]:
        raise MedloraError(f"{own}: no triage rows in train/ or val/: the project's own data is missing.")
    shared = Path(shared_dir) if shared_dir else None
    if shared is not None and (shared / PUBLIC).is_dir():
        for name, rows in _public(shared / PUBLIC, public_val_fraction).items():
            splits[name] += rows
    if shared is not None and (shared / MEDQUAD).is_dir():
        for name, file in (("train", "train.jsonl"), ("val", "eval.jsonl")):
            splits[name] += _medquad(shared / MEDQUAD / file, int(medquad[name]), seed)
    if not any(source != "own" for _, _, _, source in splits["train"]):
        log.warning(
            "triage data: %s has no %s/ or %s/: building from the project's own data alone (data/safety_triage/)",
            shared,
            PUBLIC,
            MEDQUAD,
        )
    splits["val"] = _without_train_texts(splits["val"], splits["train"])
    for rows in splits.values():  # mixed, so a capped run (data.max_train_samples) still sees every kind
        random.Random(seed).shuffle(rows)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        _write_if_changed(
            out / f"{name}.jsonl",
            [
                {
                    "messages": [
                        *classifier_messages(instruction, messages, max_chars),
                        {"role": "assistant", "content": label},
                    ],
                    "label": label,
                    "source": source,
                }
                for _, messages, label, source in rows
            ],
        )
    _write_if_changed(
        out / "val_rows.jsonl",
        [
            {"id": row_id, "messages": messages, "label": label, "source": source}
            for row_id, messages, label, source in splits["val"]
        ],
    )
    counts = {name: Counter(label for _, _, label, _ in rows) for name, rows in splits.items()}
    for name, rows in splits.items():
        sources = Counter(source for *_, source in rows)
        log.info("triage data %s: %d conversations %s from %s", name, len(rows), dict(counts[name]), dict(sources))
    return counts


def read_rows(path: Path) -> list[tuple[str, list[dict], str]]:
    """(id, messages, label) of a triage file: {"messages", "label"} rows, or the rule sets' {"prompt", "expected"}."""
    rows = []
    for number, row in read_jsonl(path):
        where = f"{path}:{number}"
        label = row.get("label", row.get("expected"))
        if label not in LABELS:
            raise MedloraError(f"{where}: label {label!r} is not one of {', '.join(LABELS)}.")
        messages = row["messages"] if "messages" in row else [{"role": "user", "content": row.get("prompt")}]
        if not (
            isinstance(messages, list)
            and messages
            and all(
                isinstance(m, dict)
                and m.get("role") in ("user", "assistant")
                and isinstance(m.get("content"), str)
                and m["content"].strip()
                for m in messages
            )
        ):
            raise MedloraError(
                f'{where}: `messages` must be a list of user/assistant turns with text (or give a "prompt" string).'
            )
        if messages[-1]["role"] != "user":
            raise MedloraError(f"{where}: the conversation must end with a user turn: its label is about that turn.")
        rows.append((str(row.get("id", f"{path.stem}-{number}")), messages, label))
    return rows


def _own(folder: Path) -> list[tuple]:
    return [(*row, "own") for path in sorted(folder.glob("*.jsonl")) for row in read_rows(path)]


def _public(folder: Path, val_fraction: float) -> dict[str, list[tuple]]:
    """Public prompts by split; near-duplicates ("how to make a bomb" variants) stay on one side."""
    rows = []
    for path in sorted(folder.glob("*.jsonl")):
        for number, row in read_jsonl(path):
            if row.get("label") in LABELS and isinstance(row.get("text"), str):
                rows.append(
                    (
                        str(row.get("id", f"{path.stem}-{number}")),
                        [{"role": "user", "content": row["text"]}],
                        row["label"],
                        path.stem,
                    )
                )
    group = _near_duplicate_groups([r[1][0]["content"] for r in rows])
    splits = {"train": [], "val": []}
    for i, row in enumerate(rows):
        anchor = rows[group[i]][0]  # the group's first id decides its side
        side = int(hashlib.sha256(anchor.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < val_fraction
        splits["val" if side else "train"].append(row)
    return splits


def _tokens(text: str) -> frozenset[str]:
    return frozenset(re.findall(r"[a-z0-9]+", text.lower()))


def _near_duplicate_groups(texts: list[str]) -> list[int]:
    """Each text's group: the index of the first text it is linked to through near-duplicates."""
    parent = list(range(len(texts)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    tokens = [_tokens(t) for t in texts]
    for i in range(len(texts)):
        for j in range(i):
            union = len(tokens[i] | tokens[j])
            if union and len(tokens[i] & tokens[j]) / union >= NEAR_DUPLICATE:
                a, b = root(i), root(j)
                parent[max(a, b)] = min(a, b)
    return [root(i) for i in range(len(texts))]


def _medquad(path: Path, n: int, seed: int) -> list[tuple]:
    if not path.is_file() or n <= 0:
        return []
    questions = []
    for number, row in read_jsonl(path):
        user = next((m.get("content") for m in row.get("messages", []) if m.get("role") == "user"), None)
        if isinstance(user, str) and user.strip():
            questions.append((f"medquad-{path.stem}-{number}", [{"role": "user", "content": user}], "allow", MEDQUAD))
    return random.Random(seed).sample(questions, min(n, len(questions)))


def _normalised(messages: list[dict]) -> str:
    return " ".join(" ".join(m["content"] for m in messages).lower().split())


def _without_train_texts(val: list[tuple], train: list[tuple]) -> list[tuple]:
    """Validation conversations that also appear in training would flatter the thresholds."""
    seen = {_normalised(messages) for _, messages, _, _ in train}
    return [row for row in val if _normalised(row[1]) not in seen]


def _write_if_changed(path: Path, rows: list[dict]) -> None:
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)  # parallel jobs of a sweep may race: each write is whole
