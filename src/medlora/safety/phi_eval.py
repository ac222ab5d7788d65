"""Scoring the PHI redactor on gold notes (data/phi_deid): recall per identifier type, what it does to PHI-free
clinical notes, and how many clinical values survive.

A gold file is JSONL: {"id", "style", "text"}, where the text marks each identifier as [[CATEGORY|value]] and
each clinical value that must be kept as {{value}}. An identifier counts as removed when redacted spans of any
category cover every character of it (a name redacted as [LOCATION] is still gone).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

_MARK = re.compile(r"\[\[([A-Z_]+)\|([^\[\]|]+)\]\]|\{\{([^{}]+)\}\}")
# Safe Harbor's identifiers: a facility is not one (a de-identification policy adds it); a year alone is allowed
SAFE_HARBOR_EXCLUDED = ("FACILITY",)
_YEAR_ONLY = re.compile(r"(?:in\s+)?(?:19|20)\d\d")


@dataclass
class GoldNote:
    id: str
    style: str
    text: str
    phi: list[tuple[int, int, str]] = field(default_factory=list)
    clinical: list[tuple[int, int]] = field(default_factory=list)


def parse(row: dict) -> GoldNote:
    note = GoldNote(row["id"], row["style"], "")
    pieces, position, length = [], 0, 0
    for match in _MARK.finditer(row["text"]):
        before = row["text"][position : match.start()]
        pieces.append(before)
        length += len(before)
        value = match.group(2) if match.group(1) else match.group(3)
        if match.group(1):
            note.phi.append((length, length + len(value), match.group(1)))
        else:
            note.clinical.append((length, length + len(value)))
        pieces.append(value)
        length += len(value)
        position = match.end()
    pieces.append(row["text"][position:])
    note.text = "".join(pieces)
    return note


def read_gold(folder: str | Path, stems: tuple[str, ...] | None = None) -> list[GoldNote]:
    """The notes of every .jsonl file in `folder` (or only of the files named by `stems`)."""
    notes = []
    for path in sorted(Path(folder).glob("*.jsonl")):
        if stems is not None and path.stem not in stems:
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                notes.append(parse(json.loads(line)))
    return notes


_LEADING_TITLE = re.compile(
    r"(?i)^(?:(?:dr|mr|mrs|ms|mx|miss|prof|rev|pastor|sr|fr)\.?\s+|(?:dob|d\.o\.b\.)[:\s]+|"
    r"baby\s+(?:girl|boy)\s+)+"
)


def _needed(text: str, start: int, end: int) -> set[int]:
    """The characters of a gold identifier that must go: its letters and digits, less a leading title or label
    ('Mrs. Fatima Al-Sayegh' needs 'Fatima Al-Sayegh'; the quotes around a nickname need not go)."""
    title = _LEADING_TITLE.match(text[start:end])
    start += title.end() if title else 0
    return {i for i in range(start, end) if text[i].isalnum()}


def score(redactor, notes: list[GoldNote]) -> dict:
    """Recall per gold type (all categories the redactor redacts), Safe Harbor pooled recall, PHI-free notes
    touched, placeholders per PHI-free note and the share of clinical values kept."""
    found, total = Counter(), Counter()
    touched = free = placeholders = 0
    kept = clinical = 0
    misses: list[tuple[str, str, str]] = []
    for note, spans in zip(notes, redactor.detect_many(n.text for n in notes)):
        removed = [s for s in spans if not s.keep and s.category in redactor.categories]
        chars = set()
        for s in removed:
            chars.update(range(s.start, s.end))
        for start, end, category in note.phi:
            kind = "DATE_YEAR" if category == "DATE" and _YEAR_ONLY.fullmatch(note.text[start:end]) else category
            total[kind] += 1
            hit = _needed(note.text, start, end) <= chars
            found[kind] += hit
            if not hit:
                misses.append((note.id, kind, note.text[start:end]))
        for start, end in note.clinical:
            clinical += 1
            kept += not any(s.start < end and start < s.end for s in removed)
        if not note.phi:
            free += 1
            touched += bool(removed)
            placeholders += len(removed)
    pooled = [k for k in total if k not in SAFE_HARBOR_EXCLUDED and k != "DATE_YEAR"]
    return {
        "notes": len(notes),
        "identifiers": sum(total.values()),
        "recall": {k: {"found": found[k], "total": total[k], "recall": found[k] / total[k]} for k in sorted(total)},
        "safe_harbor_recall": sum(found[k] for k in pooled) / max(1, sum(total[k] for k in pooled)),
        "phi_free_notes": free,
        "phi_free_touched": touched / max(1, free),
        "placeholders_per_phi_free_note": placeholders / max(1, free),
        "clinical_values": clinical,
        "clinical_kept": kept / max(1, clinical),
        "misses": misses,
    }
