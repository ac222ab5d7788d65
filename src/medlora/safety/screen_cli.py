"""`python -m medlora.safety screen --in prompts.jsonl --out decisions.jsonl`: triage a file of prompts.

Each input line is a JSON object with an optional `id` (default: its line number) and one of `prompt`,
`messages` (the latest user turn is triaged, with the user turn before it as context) or `text`. Each
output line is `{"id", "action", "categories"}`. The whole input is read and checked before anything is
written, and the output appears at once (temp file + rename), so a bad line or a crash never leaves a
partial file behind.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from medlora.config import MedloraError
from medlora.data import read_jsonl
from medlora.safety.settings import medical_defaults
from medlora.safety.triage import Decision, Triage

PROMPT_HELP = 'give a "prompt" string, a "messages" list with a user turn, or a "text" string'


class ScreenError(Exception):
    """Bad input: the message names the file, the line and the fix."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m medlora.safety screen",
        description="Triage prompts before generation: emergency, crisis, refuse or allow (rules only, no model).")
    parser.add_argument("--in", dest="input", required=True, metavar="PROMPTS.jsonl",
                        help='one JSON object per line: {"id": ..., "prompt": ...} (or "messages", or "text")')
    parser.add_argument("--out", dest="output", required=True, metavar="DECISIONS.jsonl",
                        help='one {"id", "action", "categories"} line per input line; written atomically')
    defaults = medical_defaults()["triage"]  # conf/safety/medical.yaml
    parser.add_argument("--emergency-number", default=defaults["emergency_number"],
                        help=f"number the emergency reply tells people to call (default {defaults['emergency_number']}"
                             " from conf/safety/medical.yaml; e.g. 112 in the EU, 999 in the UK)")
    parser.add_argument("--crisis-line", default=defaults["crisis_line"],
                        help=f'crisis service named in the crisis reply (default "{defaults["crisis_line"]}")')
    return parser


def _text_of(row: dict, where: str) -> tuple[str, str | None]:
    """(text to triage, previous user turn or None) from one input object."""
    if isinstance(row.get("prompt"), str):
        return row["prompt"], None
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise ScreenError(f'{where}: "messages" must be a list of {{"role", "content"}} objects.')
        users = [m.get("content") for m in messages if m.get("role") == "user"]
        if not users or not all(isinstance(u, str) for u in users):
            raise ScreenError(f'{where}: "messages" has no user turn with string content: {PROMPT_HELP}.')
        return users[-1], users[-2] if len(users) > 1 else None
    if isinstance(row.get("text"), str):
        return row["text"], None
    raise ScreenError(f"{where}: no prompt found: {PROMPT_HELP}.")


def read_prompts(path: Path) -> list[tuple[object, str, str | None]]:
    """(id, text, context) per non-blank line; the first bad line raises ScreenError."""
    if not path.exists():
        raise ScreenError(f"--in {path} does not exist: pass a JSONL file with one "
                          '{"id": ..., "prompt": ...} object per line.')
    if not path.is_file():
        raise ScreenError(f"--in {path} is not a file: pass a JSONL file.")
    try:
        rows = read_jsonl(path)
    except MedloraError as err:
        raise ScreenError(str(err)) from err
    prompts = []
    for number, row in rows:
        text, context = _text_of(row, f"{path}:{number}")
        prompts.append((row.get("id", number), text, context))
    return prompts


def write_atomic(path: Path, lines: Iterable[str]) -> None:
    """Write to a temp file in the same folder, then rename: readers see the old file or the whole new one."""
    temp = None
    try:
        with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.",
                                         suffix=".tmp", delete=False) as handle:
            temp = Path(handle.name)
            handle.writelines(lines)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        if temp is not None:
            temp.unlink(missing_ok=True)
        raise


def _check_output(path: Path, source: Path) -> None:
    if not path.parent.is_dir():
        raise ScreenError(f"--out {path}: folder {path.parent} does not exist: create it or choose another path.")
    if path.exists() and path.resolve() == source.resolve():
        raise ScreenError(f"--out {path} is the input file: choose a different output path.")


def _row(prompt_id: object, decision: Decision) -> str:
    return json.dumps({"id": prompt_id, "action": decision.action, "categories": decision.categories}) + "\n"


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit_:  # argparse exits on --help (0) and on usage errors (2)
        return int(exit_.code or 0)
    source, target = Path(args.input), Path(args.output)
    try:
        for flag, value, example in (("--emergency-number", args.emergency_number, "112"),
                                     ("--crisis-line", args.crisis_line, '"Samaritans (call 116 123)"')):
            if not value.strip():
                raise ScreenError(f"{flag} is empty: give the local service, e.g. {flag} {example}, or leave it out.")
        triage = Triage({"emergency_number": args.emergency_number, "crisis_line": args.crisis_line})
        _check_output(target, source)
        prompts = read_prompts(source)
    except (ScreenError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    decisions = [(prompt_id, triage.check(text, context)) for prompt_id, text, context in prompts]
    write_atomic(target, (_row(prompt_id, d) for prompt_id, d in decisions))
    counts = Counter(d.action for _, d in decisions)
    summary = ", ".join(f"{counts[a]} {a}" for a in ("emergency", "crisis", "refuse", "allow"))
    print(f"screened {len(decisions)} prompts ({summary}) -> {target}")
    return 0
