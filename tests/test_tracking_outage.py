"""Tracking that cannot kill training: a run whose MLflow server goes away and comes back loses
nothing and logs nothing twice; one whose server never comes back finishes, keeps a backlog, and
`python -m medlora.tracking replay` sends it once however often it runs; an artifact store that
refuses writes costs its artifacts only; a resumed run logs each step once; a tracker that fails
while another error propagates leaves that error the one raised."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from helpers import ROOT, TINY, start_train

STEPS = 40
FAST = [
    *TINY,
    f"training.max_steps={STEPS}",
    "training.log_every=1",
    "training.batch_size=2",
    "training.gradient_accumulation_steps=1",
    "data.max_train_samples=8",
    "data.max_eval_samples=4",
    "tracking.retry_max_wait=1",
]
DOWN = "does not answer"
BACK = "is back after"


class MlflowServer:
    """`mlflow server` over a SQLite store in `folder`, on a port of its own; stop() kills it the way a
    crash would, and start() brings it back on the same port and store."""

    def __init__(self, folder: Path):
        self.folder = folder
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        command = [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{self.folder}/mlflow.db",
            "--artifacts-destination",
            str(self.folder / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]
        with open(self.folder / "server.log", "a") as out:
            # its background job runner is no part of tracking, and halves the start-up time
            env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
            self.process = subprocess.Popen(command, stdout=out, stderr=out, start_new_session=True, env=env)
        deadline = time.monotonic() + 120  # 5-10 s alone, more on 2 busy cores
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=1)
                return
            except OSError:
                assert self.process.poll() is None, (self.folder / "server.log").read_text()[-3000:]
                time.sleep(0.2)
        raise AssertionError(f"mlflow server did not start: {(self.folder / 'server.log').read_text()[-3000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)  # the uvicorn worker too: its whole session
            self.process.wait(timeout=30)
        self.process = None

    def ensure(self) -> None:
        if self.process is None:
            self.start()

    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.uri)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    made = MlflowServer(tmp_path_factory.mktemp("mlflow_server"))
    made.start()
    yield made
    made.stop()


def logging_to(server: MlflowServer, tmp_path: Path, flush_timeout: float) -> list[str]:
    """Overrides for a short run into `server`, in an experiment of its own, artifacts through the server."""
    return [
        *FAST,
        f"tracking.uri={server.uri}",
        f"tracking.experiment_name={tmp_path.name}",
        "tracking.artifact_location=null",
        f"tracking.flush_timeout={flush_timeout}",
    ]


def wait_for_metric(client, experiment_name: str, key: str, timeout: float = 180) -> str:
    """The id of the first run of the experiment that logs `key`: polled the way a user watches the UI."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        experiment = client.get_experiment_by_name(experiment_name)
        for run in client.search_runs([experiment.experiment_id]) if experiment else []:
            if client.get_metric_history(run.info.run_id, key):
                return run.info.run_id
        time.sleep(0.2)
    raise AssertionError(f"no run logged {key} within {timeout} s")


def snapshot(client, run_id: str) -> dict:
    """Everything the run holds, each metric as its full history."""
    run = client.get_run(run_id)
    history = {
        key: [(m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, key)]
        for key in run.data.metrics
    }
    artifacts = sorted(f.path for f in client.list_artifacts(run_id)) + sorted(
        f.path for f in client.list_artifacts(run_id, "adapter")
    )
    return {
        "status": (run.info.status, run.info.end_time),
        "params": run.data.params,
        "tags": run.data.tags,
        "metrics": history,
        "artifacts": artifacts,
    }


def assert_each_step_once(held: dict) -> None:
    """Every step's train_loss, exactly once and in the order it was logged; every other key once per step."""
    train_loss = sorted(held["metrics"]["train_loss"])
    assert [step for step, _, _ in train_loss] == list(range(1, STEPS + 1))
    stamps = [stamp for _, _, stamp in train_loss]
    assert stamps == sorted(stamps)
    for key, history in held["metrics"].items():
        steps = [step for step, _, _ in history]
        assert len(steps) == len(set(steps)), f"{key} logged twice at a step: {sorted(steps)}"


def replay(folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "medlora.tracking", "replay", str(folder)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
def test_a_server_that_goes_away_and_comes_back_loses_nothing(server, tmp_path):
    server.ensure()
    client = server.client()
    run = start_train(tmp_path, *logging_to(server, tmp_path, flush_timeout=120))
    try:
        run_id = wait_for_metric(client, tmp_path.name, "train_loss")
        server.stop()
        time.sleep(1)  # steps go on while nothing answers
        server.start()
        out, err = run.communicate(timeout=300)
    finally:
        run.kill()
    console = out + err
    assert run.returncode == 0, console[-3000:]
    assert console.count(DOWN) == 1 and console.count(BACK) == 1, console[-3000:]
    held = snapshot(client, run_id)
    assert held["status"][0] == "FINISHED"
    assert_each_step_once(held)
    assert {"eval_loss", "eval_loss_before", "train_tokens_per_second"} <= set(held["metrics"])
    assert held["params"]["lora.rank"] == "32" and held["params"]["resolved_device"] == "cpu"
    assert "audit_head" in held["tags"]
    assert {"config_resolved.yaml", "audit.jsonl", "train.log", "adapter/adapter_model.safetensors"} <= set(
        held["artifacts"]
    )
    assert not (tmp_path / "run" / "tracking_backlog.jsonl").exists()


@pytest.mark.slow
def test_a_server_that_never_comes_back_leaves_a_backlog_that_replays_once(server, tmp_path):
    server.ensure()
    client = server.client()
    run = start_train(tmp_path, *logging_to(server, tmp_path, flush_timeout=1))
    try:
        run_id = wait_for_metric(client, tmp_path.name, "train_loss")
        server.stop()
        out, err = run.communicate(timeout=300)
    finally:
        run.kill()
    console = out + err
    folder = tmp_path / "run"
    backlog = folder / "tracking_backlog.jsonl"
    assert run.returncode == 0, console[-3000:]
    assert console.count(DOWN) == 1 and BACK not in console, console[-3000:]
    assert f"python -m medlora.tracking replay {folder}" in console
    writes = [json.loads(line) for line in backlog.read_text().splitlines()]
    assert {w["run_id"] for w in writes} == {run_id} and writes[-1]["kind"] == "status"
    assert any(w["kind"] == "artifact" and w["artifact_path"] == "adapter" for w in writes)

    refused = replay(folder)  # still down: one message, nothing sent
    assert refused.returncode == 2
    assert refused.stderr.startswith(f"error: cannot reach MLflow run {run_id} at {server.uri}")
    assert len(refused.stderr.strip().splitlines()) == 1 and "Traceback" not in refused.stderr

    server.start()
    first = replay(folder)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.startswith(f"run {run_id}: sent ") and first.stdout.endswith(", the status FINISHED\n")
    held = snapshot(client, run_id)
    assert held["status"][0] == "FINISHED"
    assert_each_step_once(held)
    for write in writes:
        if write["kind"] == "log":
            assert write["params"].items() <= held["params"].items()
            assert write["tags"].items() <= held["tags"].items()
            for key, value, _, step in write["metrics"]:
                assert [v for s, v, _ in held["metrics"][key] if s == step] == [value]
    assert "adapter/adapter_model.safetensors" in held["artifacts"]

    again = replay(folder)
    assert again.returncode == 0, again.stderr[-3000:]
    assert snapshot(client, run_id) == held
    artifacts = sum(w["kind"] == "artifact" for w in writes)  # an upload overwrites: the only writes sent again
    assert again.stdout == f"run {run_id}: sent {artifacts} artifacts\n"


@pytest.mark.slow
def test_a_tracker_failing_in_the_error_path_leaves_the_error_raised(server, tmp_path, cfg_train, monkeypatch, caplog):
    """Training fails; as the run is closed the server is gone and the backlog cannot be written
    (a folder is in its place): the training error is what propagates, the tracker's a warning."""
    from medlora.cli import RunInfo
    from medlora.train import LoraRecipe, run

    server.ensure()
    cfg = cfg_train(*logging_to(server, tmp_path, flush_timeout=0))
    (tmp_path / "tracking_backlog.jsonl").mkdir()

    def train(recipe):
        server.stop()
        raise RuntimeError("the accelerator fell off the bus")

    monkeypatch.setattr(LoraRecipe, "train", train)
    with caplog.at_level(logging.WARNING, logger="medlora.tracking"):
        with pytest.raises(RuntimeError, match="the accelerator fell off the bus") as raised:
            run(cfg, RunInfo(output_dir=tmp_path))
    assert raised.type is RuntimeError
    assert "could not close the MLflow run" in caplog.text and "is a folder" in caplog.text
    server.start()


@pytest.mark.slow
def test_writes_queued_at_a_checkpoint_reach_the_resumed_run_after_a_crash(server, tmp_path, cfg_train):
    """The server is down at a checkpoint and the process dies after it: the writes queued then are
    in the run folder, and the resumed run sends them before its own, each step once."""
    from medlora.tracking import Tracker

    server.ensure()
    cfg = cfg_train(*logging_to(server, tmp_path, flush_timeout=0))
    first = Tracker(cfg, tmp_path)
    first.start()
    first.log_metrics({"train_loss": 1.0}, 1)
    wait_for_metric(server.client(), tmp_path.name, "train_loss")
    server.stop()
    first.log_metrics({"train_loss": 2.0}, 2)
    first.log_metrics({"train_loss": 3.0}, 3)
    first.persist()  # what the checkpoint at step 3 does before it saves
    first.log_metrics({"train_loss": 4.0}, 4)
    first._writer.abandon()  # the process dies: its queue with it
    saved = [json.loads(line) for line in (tmp_path / "tracking_backlog.jsonl").read_text().splitlines()]
    assert [(key, value, step) for w in saved for key, value, _, step in w["metrics"]] == [
        ("train_loss", 2.0, 2),
        ("train_loss", 3.0, 3),
    ]

    server.start()
    again = Tracker(cfg, tmp_path)
    again.start(resume_run_id=first.run_id)
    for step in (4, 5):  # from the checkpoint at step 3 on
        again.log_metrics({"train_loss": 10.0 * step}, step)
    again.finish()
    client = server.client()
    history = [(m.step, m.value) for m in client.get_metric_history(first.run_id, "train_loss")]
    assert sorted(history) == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]
    assert client.get_run(first.run_id).info.status == "FINISHED"
    assert not (tmp_path / "tracking_backlog.jsonl").exists()  # all sent: nothing left to replay


def test_resumed_run_logs_every_step_once(cfg_train, tmp_path, caplog):
    from mlflow import MlflowClient

    from medlora.tracking import Tracker

    cfg = cfg_train(*TINY)
    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    first = Tracker(cfg)
    first.start()
    for step in range(1, 6):  # the run checkpointed at step 3, then crashed after step 5
        first.log_metrics({"train_loss": 10.0 - step}, step)
    first.log_metrics({"eval_loss": 9.0}, 3)
    first.finish("FAILED", error="RuntimeError: crash")
    assert client.get_run(first.run_id).info.status == "FAILED"

    with caplog.at_level(logging.WARNING, logger="medlora.tracking"):
        again = Tracker(cfg_train(*TINY, "lora.rank=8"))
        again.start(resume_run_id=first.run_id)
        assert again.run_id == first.run_id
        resumed = client.get_run(first.run_id)
        assert resumed.info.status == "RUNNING" and resumed.data.tags["medlora.resumes"] == "1"
        for step in range(4, 9):  # from the checkpoint at step 3 on: 4 and 5 a second time
            again.log_metrics({"train_loss": 100.0 + step}, step)
        again.log_metrics({"eval_loss": 8.0}, 6)
        again.finish()
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    history = [(m.step, m.value) for m in client.get_metric_history(first.run_id, "train_loss")]
    assert sorted(history) == [(1, 9.0), (2, 8.0), (3, 7.0), (4, 6.0), (5, 5.0), (6, 106.0), (7, 107.0), (8, 108.0)]
    assert sorted((m.step, m.value) for m in client.get_metric_history(first.run_id, "eval_loss")) == [
        (3, 9.0),
        (6, 8.0),
    ]
    assert run.data.params["lora.rank"] == "32"  # params never change: the first value stays
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        f"MLflow run {first.run_id} keeps the params it has (an MLflow param never changes), so these are not "
        "logged: lora.rank=8 (it has 32)"
    ]
    assert run.data.tags["error"] == "RuntimeError: crash"  # the tag of the failed attempt stays

    third = Tracker(cfg)
    third.start(resume_run_id=first.run_id)
    third.finish()
    assert client.get_run(first.run_id).data.tags["medlora.resumes"] == "2"


def test_resuming_a_run_the_store_lacks_starts_a_new_one_that_names_it(cfg_train, caplog):
    from mlflow import MlflowClient

    from medlora.config import MedloraError
    from medlora.tracking import Tracker

    cfg = cfg_train(*TINY)
    tracker = Tracker(cfg)
    with caplog.at_level(logging.WARNING, logger="medlora.tracking"):
        tracker.start(resume_run_id="0123abcd")
    tracker.finish()
    run = MlflowClient(tracking_uri=cfg.tracking.uri).get_run(tracker.run_id)
    assert tracker.run_id != "0123abcd" and run.data.tags["medlora.continues_run"] == "0123abcd"
    assert "medlora.resumes" not in run.data.tags and run.data.params["lora.rank"] == "32"
    assert f"MLflow run 0123abcd is not in tracking.uri={cfg.tracking.uri}: the resumed training goes on" in caplog.text
    # a store that does not answer is no store without the run: the run stops before training, as a new one would
    with pytest.raises(
        MedloraError, match=r"cannot resume the MLflow run 0123abcd in tracking.uri=http://127.0.0.1:9: "
    ):
        Tracker(cfg_train(*TINY, "tracking.uri=http://127.0.0.1:9")).start(resume_run_id="0123abcd")


def test_an_artifact_store_that_refuses_writes_costs_only_its_artifacts(cfg_train, tmp_path, caplog):
    """An artifact location whose folder cannot be made (a file is in its place): the run ends FINISHED
    with its metrics; the artifacts go to the backlog, and replay sends them once the store is fixed."""
    from mlflow import MlflowClient

    from medlora.tracking import Tracker
    from medlora.tracking.__main__ import main

    blocked = tmp_path / "artifacts"
    blocked.write_text("not a folder")
    cfg = cfg_train(*TINY, f"tracking.artifact_location={blocked}", "tracking.flush_timeout=0")
    (tmp_path / "notes.txt").write_text("kept")
    tracker = Tracker(cfg)
    tracker.start()
    with caplog.at_level(logging.WARNING, logger="medlora.tracking"):
        tracker.log_artifact(tmp_path / "notes.txt")
        tracker.log_metrics({"train_loss": 1.5}, 1)
        tracker.log_artifact(tmp_path / "notes.txt", "again")
        tracker.finish()
    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics == {"train_loss": 1.5}
    assert caplog.text.count("artifact store did not take") == 1
    writes = [json.loads(line) for line in (tmp_path / "tracking_backlog.jsonl").read_text().splitlines()]
    assert [(w["kind"], w["artifact_path"]) for w in writes] == [("artifact", None), ("artifact", "again")]

    blocked.unlink()
    assert main(["replay", str(tmp_path)]) == 0
    assert main(["replay", str(tmp_path)]) == 0
    assert sorted(f.path for f in client.list_artifacts(tracker.run_id)) == ["again", "notes.txt"]
    assert [m.step for m in client.get_metric_history(tracker.run_id, "train_loss")] == [1]
