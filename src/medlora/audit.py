"""A tamper-evident audit trail: append-only JSONL whose entries chain by SHA-256.

Each entry carries `prev_hash` (the previous entry's `entry_hash`) and its own `entry_hash`,
computed over its canonical JSON with `prev_hash` included. Editing, deleting, inserting or
reordering any entry breaks the chain at that entry; `python -m medlora.audit verify PATH` finds
it. Cutting entries off the end leaves a valid shorter chain, so the run also records the last
hash (the head) in MLflow, and `verify --head HASH` checks against it.

An entry is written as one line with its newline, so a crash mid-write leaves a last line without
one. Reopening the trail sets that line aside in `audit.jsonl.partial` and
continues the chain from the last whole entry.

Entries hold hashes and counts, never raw prompts or PHI.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import sys
from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from medlora.config import MedloraError
from medlora.files import sha256_bytes, write_files

log = logging.getLogger(__name__)

GENESIS = "0" * 64
EVENT_TYPES = (
    "data_ingest",
    "phi_redaction",
    "content_filter",
    "train_start",
    "resume",
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
    """Appends chained entries to `path`; reopening an existing trail checks its chain and continues it.

    The file exists from the moment the trail is opened: a run folder that holds it is a run that
    began, which medlora.cli never deletes.
    """

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
        self.seq, self.head = _reopen(self.path) if self.path.is_file() else (0, GENESIS)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.touch()

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


def _reopen(path: Path) -> tuple[int, str]:
    """(next seq, head) of an existing trail, its last line set aside first if a crash cut it."""
    whole, partial = _split(path.read_bytes())
    error, seq, head = _chain(whole.split(b"\n")[:-1])
    if error:
        raise MedloraError(
            f"cannot continue the audit trail {path}: {error}. Check it with `python -m medlora.audit verify "
            f"{path}`; a trail that does not verify is evidence to keep, so give the run another folder."
        )
    if partial:
        aside = path.with_name(path.name + ".partial")
        earlier = aside.read_bytes() if aside.is_file() else b""
        # each file is replaced whole, the set-aside copy first: a crash in between leaves the line in
        # both, and the next reopen does the same again
        write_files({aside: earlier + partial + b"\n", path: whole})
        log.warning(
            "audit trail %s: its last line (%d bytes, seq %d) was cut off mid-write by a crash; moved to %s. "
            "The chain continues from the last whole entry.",
            path,
            len(partial),
            seq,
            aside,
        )
    return seq, head


def _split(data: bytes) -> tuple[bytes, bytes]:
    """(the whole lines, what follows the last newline): record() writes an entry and its newline in one
    go, so text after the last newline is a line a crash cut off. Bytes, not text: the cut may fall
    inside a character, and one bad byte is then a broken entry, named by its line."""
    end = data.rfind(b"\n") + 1
    return data[:end], data[end:]


def _chain(lines: Iterable[bytes]) -> tuple[str | None, int, str]:
    """(what breaks the chain or None, entries read, the last entry_hash)."""
    previous, count = GENESIS, 0
    for line_number, line in enumerate(lines, start=1):
        where = f"line {line_number}"
        try:
            entry = json.loads(line)
            seq, stated_prev, stated_hash = entry["seq"], entry["prev_hash"], entry["entry_hash"]
        except (ValueError, KeyError, TypeError) as err:  # ValueError: bad JSON, or bytes that are not UTF-8
            return f"{where}: not an audit entry ({err})", count, previous
        if seq != count:
            return (
                f"{where} (seq {seq}): expected seq {count}: an entry was deleted, inserted or moved",
                count,
                previous,
            )
        if stated_prev != previous:
            return (
                f"{where} (seq {seq}): prev_hash does not match the entry before it: the chain is broken",
                count,
                previous,
            )
        if entry_hash(entry) != stated_hash:
            return (
                f"{where} (seq {seq}): entry_hash does not match the entry's contents: it was edited",
                count,
                previous,
            )
        previous, count = stated_hash, count + 1
    return None, count, previous


def verify(path: str | Path, head: str | None = None) -> tuple[bool, str]:
    """(ok, message); the message names the first entry that breaks the chain."""
    whole, partial = _split(Path(path).read_bytes())
    error, count, previous = _chain(whole.split(b"\n")[:-1])
    if error:
        return False, error
    if partial:
        return (
            False,
            f"line {count + 1}: cut off mid-write by a crash (no newline at its end); reopening the trail "
            "(AuditTrail on the same path) sets it aside and continues the chain",
        )
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
    except OSError as err:
        print(
            f"error: cannot read {args.path} ({err.strerror}): give the path of a run's audit.jsonl.", file=sys.stderr
        )
        return 2
    print(message, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
