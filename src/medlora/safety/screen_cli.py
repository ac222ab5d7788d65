"""`python -m medlora.safety screen --in prompts.jsonl --out decisions.jsonl`: triage a file of prompts.

Each input line is a JSON object with an optional `id` (default: its line number) and one of `prompt`,
`messages` (the whole conversation, triaged as it stands after its latest user turn) or `text`. Each
output line is `{"id", "action", "categories", "source"}`, plus the model's `scores` when it ran. The
rules and the triage model named in conf/safety/medical.yaml both run unless `--model null`. The whole
input is read and checked before anything is written, and the output appears at once (temp file +
rename), so a bad line or a crash never leaves a partial file behind. When every line also has a
`label` (emergency, crisis, refuse or allow, as in data/safety_triage/), the figures of the triage
targets are printed too: emergencies sent to emergency care, crises caught, harm declined, benign flagged.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path

from medlora.config import MedloraError
from medlora.data import read_jsonl
from medlora.files import write_file
from medlora.safety.settings import ROOT, medical_defaults
from medlora.safety.triage import Decision, Triage
from medlora.safety.triage_eval import measure
from medlora.safety.triage_model import LABELS

# the triage targets' figures and the label each is a share of
FIGURES = (
    ("emergency_recall", "emergency"),
    ("crisis_caught", "crisis"),
    ("harmful_declined", "refuse"),
    ("benign_flagged", "allow"),
)
PROMPT_HELP = 'give a "prompt" string, a "messages" list with a user turn, or a "text" string'


class ScreenError(Exception):
    """Bad input: the message names the file, the line and the fix."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m medlora.safety screen",
        description="Triage prompts before generation: emergency, crisis, refuse or allow (rules and the triage model).",
    )
    parser.add_argument(
        "--in",
        dest="input",
        required=True,
        metavar="PROMPTS.jsonl",
        help='one JSON object per line: {"id": ..., "prompt": ...} (or "messages", or "text")',
    )
    parser.add_argument(
        "--out",
        dest="output",
        required=True,
        metavar="DECISIONS.jsonl",
        help='one {"id", "action", "categories"} line per input line; written atomically',
    )
    defaults = medical_defaults()["triage"]  # conf/safety/medical.yaml
    parser.add_argument(
        "--emergency-number",
        default=defaults["emergency_number"],
        help=f"number the emergency reply tells people to call (default {defaults['emergency_number']}"
        " from conf/safety/medical.yaml; e.g. 112 in the EU, 999 in the UK)",
    )
    parser.add_argument(
        "--crisis-line",
        default=defaults["crisis_line"],
        help=f'crisis service named in the crisis reply (default "{defaults["crisis_line"]}")',
    )
    parser.add_argument(
        "--model",
        default=defaults["model"],
        help=f"triage model: an adapter folder, a Hub guard model, or null for the rules alone "
        f"(default {defaults['model']})",
    )
    return parser


def _conversation_of(row: dict, where: str) -> list[dict]:
    """The conversation to triage from one input object."""
    for key in ("prompt", "text"):
        if isinstance(row.get(key), str):
            return [{"role": "user", "content": row[key]}]
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages
        ):
            raise ScreenError(
                f'{where}: "messages" must be a list of {{"role", "content"}} objects with string content.'
            )
        if not any(m.get("role") == "user" for m in messages):
            raise ScreenError(f'{where}: "messages" has no user turn: {PROMPT_HELP}.')
        return [{"role": m.get("role"), "content": m["content"]} for m in messages]
    raise ScreenError(f"{where}: no prompt found: {PROMPT_HELP}.")


def read_prompts(path: Path) -> list[tuple[object, list[dict], str | None]]:
    """(id, conversation, label or None) per non-blank line; the first bad line raises ScreenError."""
    if not path.exists():
        raise ScreenError(
            f'--in {path} does not exist: pass a JSONL file with one {{"id": ..., "prompt": ...}} object per line.'
        )
    if not path.is_file():
        raise ScreenError(f"--in {path} is not a file: pass a JSONL file.")
    try:
        rows = read_jsonl(path)
    except MedloraError as err:
        raise ScreenError(str(err)) from err
    prompts = []
    for number, row in rows:
        label = row.get("label")
        if label is not None and label not in LABELS:
            raise ScreenError(
                f'{path}:{number}: "label" is {label!r}: give one of {", ".join(LABELS)}, or leave it out.'
            )
        prompts.append((row.get("id", number), _conversation_of(row, f"{path}:{number}"), label))
    return prompts


def _check_output(path: Path, source: Path) -> None:
    if not path.parent.is_dir():
        raise ScreenError(f"--out {path}: folder {path.parent} does not exist: create it or choose another path.")
    if path.exists() and path.resolve() == source.resolve():
        raise ScreenError(f"--out {path} is the input file: choose a different output path.")


def _row(prompt_id: object, decision: Decision) -> str:
    row = {"id": prompt_id, "action": decision.action, "categories": decision.categories, "source": decision.source}
    if decision.scores is not None:
        row["scores"] = {label: round(p, 4) for label, p in decision.scores.items()}
    return json.dumps(row) + "\n"


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit_:  # argparse exits on --help (0) and on usage errors (2)
        return int(exit_.code or 0)
    source, target = Path(args.input), Path(args.output)
    try:
        for flag, value, example in (
            ("--emergency-number", args.emergency_number, "112"),
            ("--crisis-line", args.crisis_line, '"Samaritans (call 116 123)"'),
        ):
            if not value.strip():
                raise ScreenError(f"{flag} is empty: give the local service, e.g. {flag} {example}, or leave it out.")
        _check_output(target, source)
        prompts = read_prompts(source)
        settings = {
            **medical_defaults()["triage"],
            "emergency_number": args.emergency_number,
            "crisis_line": args.crisis_line,
            "model": None if args.model in ("null", "none", "") else args.model,
        }
        triage = Triage.from_config(settings, os.environ.get("MEDLORA_CACHE") or str(ROOT / ".cache"))
    except (ScreenError, MedloraError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    found = triage.check_many([conversation for _, conversation, _ in prompts])
    decisions = [(prompt_id, decision) for (prompt_id, _, _), decision in zip(prompts, found)]
    try:
        write_file(target, "".join(_row(prompt_id, d) for prompt_id, d in decisions))
    except MedloraError as err:  # the disk filled or the folder went away while screening
        print(f"error: {err}", file=sys.stderr)
        return 2
    counts = Counter(d.action for _, d in decisions)
    summary = ", ".join(f"{counts[a]} {a}" for a in ("emergency", "crisis", "refuse", "allow"))
    print(f"screened {len(decisions)} prompts ({summary}) -> {target}")
    labels = [label for _, _, label in prompts]
    if all(labels):
        figures = measure(labels, [d.action for _, d in decisions])
        counts = Counter(labels)
        print(
            "against the labels: "
            + ", ".join(f"{name} {figures[name]:.3f} (n={counts[label]})" for name, label in FIGURES if name in figures)
        )
    return 0
