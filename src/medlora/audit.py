"""A tamper-evident audit trail: append-only JSONL whose entries chain by SHA-256.

Each entry carries `prev_hash` (the previous entry's `entry_hash`) and its own `entry_hash`,
computed over its canonical JSON with `prev_hash` included. Editing, deleting, inserting or
reordering any entry breaks the chain at that entry; `python -m medlora.audit verify PATH` finds
it. Cutting entries off the end leaves a valid shorter chain, so the run also records the last
hash (the head) in MLflow, and `verify --head HASH` checks against it.

Entries hold hashes and counts, never raw prompts or PHI.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from medlora.files import sha256_bytes

GENESIS = "0" * 64
EVENT_TYPES = (
    "data_ingest",
    "phi_redaction",
    "content_filter",
    "train_start",
    "checkpoint",
    "eval",
    "train_end",
    "adapter_export",
    "inference_triage",
    "output_check",
    "config_change",
)
LIBRARIES = ("medlora", "torch", "transformers", "peft", "accelerate", "bitsandbytes", "mlflow")


def canonical(entry: dict) -> bytes:
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def entry_hash(entry: dict) -> str:
    return sha256_bytes(canonical({k: v for k, v in entry.items() if k != "entry_hash"}))


def library_versions(names: Iterable[str] = LIBRARIES) -> dict[str, str]:
    """{distribution: version} of those of `names` that are installed."""
    found = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


class AuditTrail:
    """Appends chained entries to `path`; reopening an existing trail continues its chain."""

    def __init__(
        self,
        path: str | Path,
        actor: str,
        run_id: str | None = None,
        config_hash: str | None = None,
        git_commit: str | None = None,
    ):
        self.path = Path(path)
        self.context = {
            "actor": actor,
            "run_id": run_id,
            "config_hash": config_hash,
            "git_commit": git_commit,
            "versions": library_versions(),
        }
        self.seq, self.head = 0, GENESIS
        if self.path.is_file():
            lines = self.path.read_text().splitlines()
            if lines:
                last = json.loads(lines[-1])
                self.seq, self.head = last["seq"] + 1, last["entry_hash"]
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def record(
        self,
        event_type: str,
        outcome: str = "ok",
        *,
        inputs: dict | None = None,
        outputs: dict | None = None,
        counts: dict | None = None,
        rule_ids: list | None = None,
        **details,
    ) -> dict:
        """inputs/outputs map a name to a SHA-256; counts and rule ids summarise what happened."""
        if event_type not in EVENT_TYPES:
            raise ValueError(f"unknown audit event_type {event_type!r}; use one of {', '.join(EVENT_TYPES)}")
        entry = {
            "seq": self.seq,
            "ts_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "event_type": event_type,
            **self.context,
            "inputs": inputs or {},
            "outputs": outputs or {},
            "outcome": outcome,
            "rule_ids": sorted(rule_ids or []),
            "counts": dict(counts or {}),
            **details,
            "prev_hash": self.head,
        }
        entry["entry_hash"] = entry_hash(entry)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry, ensure_ascii=False) + "\n")
            f.flush()
        self.seq, self.head = self.seq + 1, entry["entry_hash"]
        return entry

    def set_run_id(self, run_id: str | None) -> None:
        self.context["run_id"] = run_id


def verify(path: str | Path, head: str | None = None) -> tuple[bool, str]:
    """(ok, message); the message names the first entry that breaks the chain."""
    previous, count = GENESIS, 0
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            where = f"line {line_number}"
            try:
                entry = json.loads(line)
                seq, stated_prev, stated_hash = entry["seq"], entry["prev_hash"], entry["entry_hash"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                return False, f"{where}: not an audit entry ({err})"
            if seq != count:
                return False, f"{where} (seq {seq}): expected seq {count}: an entry was deleted, inserted or moved"
            if stated_prev != previous:
                return False, f"{where} (seq {seq}): prev_hash does not match the entry before it: the chain is broken"
            if entry_hash(entry) != stated_hash:
                return False, f"{where} (seq {seq}): entry_hash does not match the entry's contents: it was edited"
            previous, count = stated_hash, count + 1
    if count == 0:
        return False, f"{path} holds no audit entries"
    if head and head != previous:
        return (
            False,
            f"the trail ends at {previous[:16]}… but its recorded head is {head[:16]}…: entries were cut off the end",
        )
    return True, f"OK: {count} entries, head {previous}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medlora.audit", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("verify", help="check that an audit trail is intact")
    check.add_argument("path", help="an audit.jsonl file")
    check.add_argument("--head", help="the trail's last entry_hash as recorded elsewhere (MLflow tag audit_head)")
    args = parser.parse_args(argv)
    try:
        ok, message = verify(args.path, args.head)
    except (OSError, UnicodeDecodeError) as err:
        reason = getattr(err, "strerror", None) or "not UTF-8 text"
        print(f"error: cannot read {args.path} ({reason}): give the path of a run's audit.jsonl.", file=sys.stderr)
        return 2
    print(message, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
