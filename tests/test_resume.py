"""Runs that survive faults: kill -9, SIGTERM, a corrupt checkpoint and a full disk, through the real
`python train.py` on the tiny model in fp32 with LoRA dropout on (so every RNG restore counts).
A resumed run must end with the adapter an uninterrupted run saves, to the last bit."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medlora import checkpoint
from medlora.config import MedloraError

from helpers import ROOT, TINY, conversation, isolated, mlflow_client, write_jsonl

STEPS = 12
FAULTY = [
    *TINY,
    "precision=fp32",
    "data=jsonl",
    "lora.dropout=0.1",
    f"training.max_steps={STEPS}",
    "training.batch_size=2",
    "training.gradient_accumulation_steps=2",
    "training.save_every=3",
    "training.save_every_minutes=0",
    "training.keep_checkpoints=2",
    "training.eval_every=6",
]


def _command(tmp: Path, data: Path, run_dir: Path, *extra: str) -> list[str]:
    overrides = [o for o in isolated(tmp) if not o.startswith("hydra.run.dir")]
    return [
        sys.executable,
        str(ROOT / "train.py"),
        *overrides,
        f"hydra.run.dir={run_dir}",
        *FAULTY,
        f"data.train_file={data}",
        f"data.eval_file={data}",
        *extra,
    ]


def _env() -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def _run(tmp, data, run_dir, *extra) -> subprocess.CompletedProcess:
    cmd = _command(tmp, data, run_dir, *extra)
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=_env())


def _interrupt(tmp, data, run_dir, after: str, signum: int = signal.SIGKILL) -> tuple[int, str]:
    """Start the run, send `signum` once a line containing `after` appears; (exit code, output)."""
    proc = subprocess.Popen(
        _command(tmp, data, run_dir),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(),
    )
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if after in line:
            proc.send_signal(signum)
            break
    seen += proc.stdout.readlines()
    return proc.wait(timeout=300), "".join(seen)


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run: its adapter, and the data file every run here trains on."""
    tmp = tmp_path_factory.mktemp("reference")
    data = write_jsonl(
        tmp / "qa.jsonl", [conversation(f"Question {i} about sleep?", f"Answer {i}: rest.") for i in range(8)]
    )
    result = _run(tmp, data, tmp / "run")
    assert result.returncode == 0, result.stderr[-3000:]
    # three checkpoints a run of 12 steps saves every 3 steps, the last two kept and the best by eval loss
    kept = [p.name for p in checkpoint.checkpoints(tmp / "run" / "checkpoints")]
    assert kept == ["step_6", "step_9", "step_12"] or kept == ["step_9", "step_12"]
    return _adapter(tmp / "run"), data


def _metric_steps(tmp: Path, key: str) -> list[int]:
    client = mlflow_client(tmp)
    (run,) = client.search_runs([client.get_experiment_by_name("medlora").experiment_id])
    return run, [m.step for m in client.get_metric_history(run.info.run_id, key)]


@pytest.mark.slow
@pytest.mark.parametrize(
    "after",
    [
        "checkpoint saved to",  # mid-step, just after a checkpoint
        "step 6: eval loss",  # mid-eval's aftermath, before the next checkpoint
        "adapter saved to",  # during the final save and logging
    ],
)
def test_kill_9_then_the_same_command_ends_with_the_uninterrupted_adapter(reference, tmp_path, after):
    adapter, data = reference
    code, _ = _interrupt(tmp_path, data, tmp_path / "run", after)
    assert code == -signal.SIGKILL
    again = _run(tmp_path, data, tmp_path / "run")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout + again.stderr
    assert _same(_adapter(tmp_path / "run"), adapter)
    run, steps = _metric_steps(tmp_path, "train_loss")
    assert run.info.status == "FINISHED"
    assert steps == list(range(1, STEPS + 1))  # one MLflow run, every step's metric once
    ok, message = _verify(tmp_path / "run" / "audit.jsonl")
    assert ok, message


def _verify(path: Path) -> tuple[bool, str]:
    from medlora.audit import verify

    return verify(path)


@pytest.mark.slow
def test_sigterm_saves_at_the_step_boundary_and_the_rerun_completes(reference, tmp_path):
    adapter, data = reference
    code, out = _interrupt(tmp_path, data, tmp_path / "run", "step 6: eval loss", signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, out[-3000:]
    assert "stopped by SIGTERM at step" in out and "Run the same command again to resume" in out
    stopped = json.loads((tmp_path / "run" / "run_state.json").read_text())
    assert stopped["status"] == "stopped"
    assert (tmp_path / "run" / "checkpoints" / f"step_{stopped['step']}").is_dir()
    again = _run(tmp_path, data, tmp_path / "run")
    assert again.returncode == 0, again.stderr[-3000:]
    assert _same(_adapter(tmp_path / "run"), adapter)


@pytest.mark.slow
def test_the_same_command_in_a_new_folder_continues_the_unfinished_run_beside_it(reference, tmp_path):
    adapter, data = reference
    code, _ = _interrupt(tmp_path, data, tmp_path / "runs" / "first", "checkpoints/step_6")
    assert code == -signal.SIGKILL
    # a corrupt newest checkpoint is named and passed over for the one before it (and replaced)
    newest = checkpoint.checkpoints(tmp_path / "runs" / "first" / "checkpoints")[-1]
    blob = bytearray((newest / "adapter_model.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (newest / "adapter_model.safetensors").write_bytes(bytes(blob))
    again = _run(tmp_path, data, tmp_path / "runs" / "second")
    assert again.returncode == 0, again.stderr[-3000:]
    out = again.stdout + again.stderr
    assert f"resuming the unfinished run {tmp_path / 'runs' / 'first'}" in out
    assert f"checkpoint {newest} is corrupt (adapter_model.safetensors does not match its SHA-256" in out
    assert _same(_adapter(tmp_path / "runs" / "first"), adapter)
    assert not (tmp_path / "runs" / "second" / "adapter").exists()
    # a finished run is never resumed: the same command again starts over in its own folder
    third = _run(tmp_path, data, tmp_path / "runs" / "third", "training.max_steps=3")
    assert third.returncode == 0 and "resumed from" not in third.stdout + third.stderr


def test_a_corrupt_checkpoint_is_named_and_the_one_before_is_used(tmp_path, caplog):
    folder = tmp_path / "checkpoints"
    for step in (3, 6):
        (folder / f"step_{step}").mkdir(parents=True)
        (folder / f"step_{step}" / "weights.bin").write_bytes(bytes(range(16)))
        (folder / f"step_{step}" / checkpoint.STATE).write_text(json.dumps({"step": step}))
        hashes = checkpoint.folder_hashes(folder / f"step_{step}")
        (folder / f"step_{step}" / checkpoint.MANIFEST).write_text(json.dumps(hashes))
    (folder / ".step_9-abc").mkdir()  # what a kill during a save leaves beside its final name
    assert checkpoint.latest_valid(folder) == folder / "step_6"
    (folder / "step_6" / "weights.bin").write_bytes(bytes(range(1, 17)))
    assert checkpoint.latest_valid(folder) == folder / "step_3"
    assert "step_6 is corrupt (weights.bin does not match its SHA-256 in manifest.json)" in caplog.text
    (folder / "step_3" / "weights.bin").unlink()
    assert checkpoint.latest_valid(folder) is None
    assert "step_3 is corrupt (weights.bin is missing)" in caplog.text
    checkpoint.prune(folder, keep_last=1)
    assert not (folder / ".step_9-abc").exists() and [p.name for p in checkpoint.checkpoints(folder)] == ["step_6"]


def test_a_save_on_a_full_disk_keeps_the_last_good_one_and_says_how_much_was_needed(tmp_path, monkeypatch):
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "adapter_model.safetensors").write_bytes(b"the good one")

    class Model:
        def parameters(self):
            return [torch.nn.Parameter(torch.zeros(250_000))]

        def save_pretrained(self, folder):
            (Path(folder) / "adapter_model.safetensors").write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(MedloraError, match=r"was not saved: the disk is full \(\d+ MB free in .*, about 1 MB needed\)"):
        checkpoint.save_adapter(Model(), None, target)
    assert (target / "adapter_model.safetensors").read_bytes() == b"the good one"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temporary folder left


def test_the_first_signal_asks_for_a_stop_and_a_second_ctrl_c_stops_at_once():
    with checkpoint.StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received == signal.SIGTERM  # training goes on to the step boundary
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    # outside the run, the handlers are the ones before it
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
