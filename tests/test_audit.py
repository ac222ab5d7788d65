"""The audit trail: intact chains verify; any edit, deletion, insertion or reordering is caught."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

from medlora.audit import GENESIS, AuditTrail, entry_hash, verify
from medlora.config import MedloraError


@pytest.fixture
def trail(tmp_path):
    audit = AuditTrail(tmp_path / "audit.jsonl", actor="test", run_id="r1", config_hash="c" * 64, git_commit="abc")
    audit.record("data_ingest", inputs={"train_file": "a" * 64}, counts={"conversations": 330})
    audit.record("phi_redaction", counts={"NAME": 2, "PHONE": 1}, rule_ids=["phi.NAME", "phi.PHONE"])
    audit.record("train_start")
    audit.record("eval", counts={"eval_loss_x1000": 2597})
    audit.record("train_end", outputs={"adapter": "b" * 64})
    return audit


def _lines(audit):
    return audit.path.read_text().splitlines()


def _write(audit, lines):
    audit.path.write_text("".join(line + "\n" for line in lines))


def test_intact_trail_verifies_and_chains(trail):
    entries = [json.loads(line) for line in _lines(trail)]
    assert [e["seq"] for e in entries] == [0, 1, 2, 3, 4]
    assert entries[0]["prev_hash"] == GENESIS
    assert all(b["prev_hash"] == a["entry_hash"] for a, b in zip(entries, entries[1:]))
    assert all(entry_hash(e) == e["entry_hash"] for e in entries)
    assert {"ts_utc", "actor", "run_id", "config_hash", "git_commit", "versions", "outcome"} <= set(entries[0])
    assert "torch" in entries[0]["versions"]
    assert verify(trail.path) == (True, f"OK: 5 entries, head {entries[-1]['entry_hash']}")


def test_reopening_continues_the_chain(trail):
    again = AuditTrail(trail.path, actor="test")
    again.record("adapter_export")
    ok, message = verify(trail.path)
    assert ok and message.startswith("OK: 6 entries")


def test_edit_is_caught(trail):
    lines = _lines(trail)
    entry = json.loads(lines[1])
    entry["counts"]["NAME"] = 0
    lines[1] = json.dumps(entry)
    _write(trail, lines)
    ok, message = verify(trail.path)
    assert not ok and message.startswith("line 2 (seq 1): entry_hash does not match")


def test_edit_with_recomputed_hash_is_caught_by_the_next_entry(trail):
    lines = _lines(trail)
    entry = json.loads(lines[1])
    entry["outcome"] = "skipped"
    entry["entry_hash"] = entry_hash(entry)
    lines[1] = json.dumps(entry)
    _write(trail, lines)
    ok, message = verify(trail.path)
    assert not ok and message.startswith("line 3 (seq 2): prev_hash does not match")


def test_delete_is_caught(trail):
    lines = _lines(trail)
    _write(trail, lines[:2] + lines[3:])
    ok, message = verify(trail.path)
    assert not ok and message.startswith("line 3 (seq 3): expected seq 2")


def test_insert_is_caught(trail):
    lines = _lines(trail)
    _write(trail, lines[:3] + [lines[2]] + lines[3:])
    ok, message = verify(trail.path)
    assert not ok and message.startswith("line 4 (seq 2): expected seq 3")


def test_reorder_is_caught(trail):
    lines = _lines(trail)
    lines[1], lines[2] = lines[2], lines[1]
    _write(trail, lines)
    ok, message = verify(trail.path)
    assert not ok and message.startswith("line 2 (seq 2): expected seq 1")


def test_cut_off_end_is_caught_with_the_recorded_head(trail):
    head = trail.head
    _write(trail, _lines(trail)[:-1])
    assert verify(trail.path)[0]  # a shorter chain is still a chain...
    ok, message = verify(trail.path, head=head)
    assert not ok and "cut off the end" in message  # ...but not the one the run recorded


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "medlora.audit", *args], capture_output=True, text=True)


def test_verify_command_exit_codes(trail, tmp_path):
    ok = _cli("verify", str(trail.path))
    assert ok.returncode == 0 and ok.stdout.startswith("OK: 5 entries")
    lines = _lines(trail)
    _write(trail, lines[:1] + lines[2:])
    bad = _cli("verify", str(trail.path))
    assert bad.returncode == 1 and "line 2 (seq 2): expected seq 1" in bad.stderr
    missing = _cli("verify", str(tmp_path / "nope.jsonl"))
    assert missing.returncode == 2 and "cannot read" in missing.stderr and "Traceback" not in missing.stderr


def _cut(trail) -> bytes:
    """What a crash leaves when it stops record() mid-line: part of a sixth entry, cut inside a character."""
    whole = trail.path.read_bytes()
    trail.record("checkpoint", note="café au lait")
    line = trail.path.read_bytes()[len(whole) :]
    cut = line[: line.index("é".encode()) + 1]
    trail.path.write_bytes(whole + cut)
    return cut


def test_opening_a_trail_makes_its_file(tmp_path):
    AuditTrail(tmp_path / "run" / "audit.jsonl", actor="test")
    assert (tmp_path / "run" / "audit.jsonl").read_bytes() == b""
    assert verify(tmp_path / "run" / "audit.jsonl") == (
        False,
        f"{tmp_path / 'run' / 'audit.jsonl'} holds no audit entries",
    )


def test_verify_names_a_last_line_cut_by_a_crash(trail):
    _cut(trail)
    ok, message = verify(trail.path)
    assert (ok, message) == (
        False,
        "line 6: cut off mid-write by a crash (no newline at its end); reopening the trail (AuditTrail on the "
        "same path) sets it aside and continues the chain",
    )


def test_reopening_sets_a_cut_line_aside_and_continues_from_the_last_whole_entry(trail, caplog):
    lines, head = _lines(trail), trail.head
    cut = _cut(trail)
    with caplog.at_level(logging.WARNING, logger="medlora.audit"):
        again = AuditTrail(trail.path, actor="test")
    aside = trail.path.with_name("audit.jsonl.partial")
    assert [r.getMessage() for r in caplog.records] == [
        f"audit trail {trail.path}: its last line ({len(cut)} bytes, seq 5) was cut off mid-write by a crash; "
        f"moved to {aside}. The chain continues from the last whole entry."
    ]
    assert aside.read_bytes() == cut + b"\n"
    assert _lines(trail) == lines and (again.seq, again.head) == (5, head)
    resumed = again.record("resume", step=20)
    assert (resumed["seq"], resumed["prev_hash"]) == (5, head)
    assert verify(trail.path) == (True, f"OK: 6 entries, head {resumed['entry_hash']}")
    assert _cli("verify", str(trail.path)).returncode == 0


def test_a_second_cut_line_joins_the_first_one_set_aside(trail):
    first = _cut(trail)
    AuditTrail(trail.path, actor="test")
    second = _cut(trail)
    AuditTrail(trail.path, actor="test").record("resume")
    assert trail.path.with_name("audit.jsonl.partial").read_bytes() == first + b"\n" + second + b"\n"
    assert verify(trail.path)[1].startswith("OK: 6 entries")


def test_a_trail_cut_to_nothing_starts_a_new_chain(tmp_path):
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b'{"seq": 0, "ts_utc": "2026-')
    entry = AuditTrail(path, actor="test").record("train_start")
    assert (entry["seq"], entry["prev_hash"]) == (0, GENESIS)
    assert path.with_name("audit.jsonl.partial").read_bytes() == b'{"seq": 0, "ts_utc": "2026-\n'
    assert verify(path)[0]


def test_a_broken_chain_before_the_cut_is_refused_and_left_as_it_is(trail):
    lines = _lines(trail)
    entry = json.loads(lines[1])
    entry["counts"]["NAME"] = 0
    _write(trail, [lines[0], json.dumps(entry), *lines[2:]])
    _cut(trail)
    spoiled = trail.path.read_bytes()
    with pytest.raises(MedloraError) as refused:
        AuditTrail(trail.path, actor="test")
    assert str(refused.value).startswith(
        f"cannot continue the audit trail {trail.path}: line 2 (seq 1): entry_hash does not match the entry's "
        "contents: it was edited. Check it with `python -m medlora.audit verify"
    )
    assert trail.path.read_bytes() == spoiled and not trail.path.with_name("audit.jsonl.partial").exists()


def test_a_byte_that_is_not_utf8_breaks_the_chain_at_its_line(trail):
    lines = trail.path.read_bytes().split(b"\n")
    lines[2] = lines[2].replace(b'"train_start"', b'"train_st\xffrt"')
    trail.path.write_bytes(b"\n".join(lines))
    ok, message = verify(trail.path)
    assert not ok and message.startswith("line 3: not an audit entry ('utf-8' codec can't decode byte 0xff")
    bad = _cli("verify", str(trail.path))
    assert bad.returncode == 1 and "line 3: not an audit entry" in bad.stderr
    with pytest.raises(MedloraError, match=r"cannot continue the audit trail .*: line 3: not an audit entry"):
        AuditTrail(trail.path, actor="test")


def test_a_line_separator_inside_an_entry_is_not_a_line_break(trail):
    # json.dumps(ensure_ascii=False) leaves U+2028 and U+0085 as they are; str.splitlines would split at them
    trail.record("eval", note="one\u2028two\x85three")
    again = AuditTrail(trail.path, actor="test")
    assert again.seq == 6 and verify(trail.path)[1].startswith("OK: 6 entries")
