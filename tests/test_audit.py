"""The audit trail: intact chains verify; any edit, deletion, insertion or reordering is caught."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from medlora.audit import GENESIS, AuditTrail, entry_hash, verify


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
