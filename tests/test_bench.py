"""The throughput benchmark runs end to end (on the tiny model: its figures mean nothing here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from medlora.config import resolve_precision

from helpers import ROOT


@pytest.mark.slow
def test_benchmark_writes_its_table_and_json(tmp_path):
    # rows of 512 tokens hold several conversations, so the shared system prompt shows
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "train_throughput.py"),
            "--model",
            "tiny_random",
            "--samples",
            "8",
            "--eval-samples",
            "4",
            "--max-seq-len",
            "512",
            "--settings",
            "medlora,trl-fastest",
            "--matmul-size",
            "512",
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads((tmp_path / "train_throughput.json").read_text())
    assert [r["setting"] for r in report["results"]] == ["medlora", "trl-fastest"]
    for r in report["results"]:
        assert r["real_tokens_per_second"] > r["supervised_tokens_per_second"] > 0
        assert r["peak_rss_gb"] > 0.1 and r["eval_loss"] > 0
    # both read the same held-out set with the same code before training
    assert abs(report["results"][0]["eval_loss_before"] - report["results"][1]["eval_loss_before"]) < 1e-2
    # both train in the precision=auto choice: bf16 only where this CPU computes it natively
    precision = resolve_precision("auto", "cpu")
    assert [r["precision"] for r in report["results"]] == [precision, precision]
    assert list(report["matmul_peak_gflops"]) == [precision] and report["matmul_peak_gflops"][precision] > 0
    table = (tmp_path / "train_throughput.md").read_text()
    assert f"| medlora | {precision} |" in table and "Definitions:" in table and "MFU" in table
    assert "- medlora vs TRL's fastest setting (trl-fastest): " in table
    # every conversation begins with the safety system prompt: medlora computes it once per optimizer step
    assert 0 < report["results"][0]["shared_prefix_fraction"] < 0.5 and "once per optimizer step" in table


def test_benchmark_bad_input_is_one_message_and_nothing_written(tmp_path):
    bad_line = tmp_path / "bad.jsonl"
    bad_line.write_text('{"messages": [\n')
    scratch = tmp_path / "tmp"  # where the benchmark's work folder would go
    scratch.mkdir()
    for args, message in (
        (["--data", str(tmp_path / "missing.jsonl")], "--data"),
        (["--settings", "nope"], "unknown setting"),
        (["--merge"], "--merge needs an earlier"),
        (["--model", "nosuch"], "--model nosuch is not a config in conf/model/"),
        (["--data", str(bad_line)], "bad.jsonl:1: not valid JSON"),
    ):
        done = subprocess.run(
            [sys.executable, str(ROOT / "bench" / "train_throughput.py"), *args, "--out", str(tmp_path / "out")],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "TMPDIR": str(scratch)},
        )
        assert done.returncode == 1 and message in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "out").exists() and not list(scratch.iterdir())
