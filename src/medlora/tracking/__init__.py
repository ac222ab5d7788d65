"""MLflow tracking: one run per job; the jobs of a Hydra sweep nest under one parent run.

The parent is made by `MlflowSweepCallback` before the first job and found by each job through
its `medlora.sweep_dir` tag, which works whichever Hydra launcher runs the jobs. When the sweep
ends, medlora.sweep reads the children back and puts the best job and comparison plots on it.

A run is made (or resumed) while training waits, so a store that is down stops the run before it
starts; after that every write goes through medlora.tracking.writer, which no outage of the store
can stop training with, and `python -m medlora.tracking replay <run folder>` sends what a run kept.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from medlora.config import MedloraError
from medlora.tracking.writer import Stored, Writer, backlog_of, brief, keep_backlog, now_ms

log = logging.getLogger(__name__)

SWEEP_TAG = "medlora.sweep_dir"
RESUMES_TAG = "medlora.resumes"
CONTINUES_TAG = "medlora.continues_run"  # a resumed training's new run: the run id its checkpoint named
# a request to a store that is down fails at once (the writer waits and retries, off the training
# thread), and one to a store that hangs counts as failed after 10 s
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def _client(tracking: DictConfig):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking.uri)


def experiment_id(tracking: DictConfig) -> str:
    """Find or create the experiment; an unreachable store fails here, before any training."""
    client = _client(tracking)
    try:
        found = client.get_experiment_by_name(tracking.experiment_name)
        if found is not None:
            return found.experiment_id
        location = tracking.artifact_location
        if location and "://" not in str(location):
            location = Path(location).resolve().as_uri()
        return client.create_experiment(tracking.experiment_name, artifact_location=location)
    except Exception as err:  # mlflow raises MlflowException, requests' errors or sqlalchemy's
        if "already exists" in str(err):  # another job of a parallel sweep created it first
            return client.get_experiment_by_name(tracking.experiment_name).experiment_id
        raise MedloraError(
            f"cannot use the MLflow store tracking.uri={tracking.uri}: {str(err).splitlines()[0]}. "
            "Start the server (or fix the URI), or run without tracking: tracking=none."
        ) from err


def flatten(cfg: DictConfig) -> dict[str, str]:
    """`lora.rank` -> "32": the resolved config as MLflow params, long values cut to MLflow's limit."""
    from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH, MAX_PARAM_VAL_LENGTH

    flat: dict[str, str] = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}.{key}" if prefix else str(key))
        else:
            flat[prefix[:MAX_ENTITY_KEY_LENGTH]] = str(node)[:MAX_PARAM_VAL_LENGTH]

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return flat


def git_commit(root: str) -> str:
    def git(*args):
        return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=10)

    head = git("rev-parse", "HEAD")
    if head.returncode != 0:
        return "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    return head.stdout.strip() + ("-dirty" if dirty else "")


def ui_url(tracking: DictConfig, exp_id: str, run_id: str) -> str:
    uri = str(tracking.uri)
    base = uri.rstrip("/") if uri.startswith("http") else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{exp_id}/runs/{run_id}"


def _sweep_parent(client, exp_id: str, sweep_dir: str):
    runs = client.search_runs([exp_id], filter_string=f"tags.`{SWEEP_TAG}` = '{sweep_dir}'", max_results=1)
    return runs[0].info.run_id if runs else None


def _start_parent(client, exp_id: str, sweep_dir: str, overrides: list[str]) -> str:
    run = client.create_run(
        exp_id,
        run_name=f"sweep-{Path(sweep_dir).name}",
        tags={SWEEP_TAG: sweep_dir, "medlora.role": "sweep", "hydra_overrides": " ".join(overrides)[:8000]},
    )
    return run.info.run_id


class Tracker:
    """The MLflow run of one job. With tracking disabled every call does nothing.

    Every write (params, metrics, tags, artifacts, tables, the status) is queued and sent by a
    medlora.tracking.writer.Writer, so none can stop training; `persist` (at each checkpoint) and
    `finish` save what the store has not taken to `tracking_backlog.jsonl` in `folder`, the run's
    folder (paths.output_dir unless given).
    """

    def __init__(self, cfg: DictConfig, folder: str | Path | None = None):
        self.cfg = cfg
        self.folder = Path(folder) if folder else None
        self.enabled = bool(cfg.tracking.enabled)
        self.run_id = None
        self.url = None
        self._stored = Stored()
        self._writer: Writer | None = None

    def start(self, sweep_dir: str | None = None, overrides: list[str] = (), resume_run_id: str | None = None) -> None:
        """A new run (the child of its sweep's parent in a sweep), or with `resume_run_id` that run
        again: RUNNING once more, its `medlora.resumes` tag counting, and nothing it holds logged twice.
        A store without that run (another store, a deleted run) gets a new run, tagged with the id."""
        if not self.enabled:
            return
        tracking = self.cfg.tracking
        self.client = _client(tracking)
        if resume_run_id and self._resume(resume_run_id):
            self.log_params(flatten(self.cfg))
            return
        exp_id = experiment_id(tracking)
        all_tags = {"hydra_overrides": " ".join(overrides)[:8000]}
        if resume_run_id:
            all_tags[CONTINUES_TAG] = resume_run_id
        if sweep_dir:
            parent = _sweep_parent(self.client, exp_id, sweep_dir) or _start_parent(
                self.client, exp_id, sweep_dir, overrides
            )
            all_tags["mlflow.parentRunId"] = parent
        name = (
            tracking.run_name
            or f"{Path(str(self.cfg.model.base_model)).stem}-r{self.cfg.lora.rank}-{time.strftime('%H%M%S')}"
        )
        self._create(exp_id, name, all_tags)
        self.log_params(flatten(self.cfg))

    def _resume(self, run_id: str) -> bool:
        """Reattach to `run_id`; False when the store answers that it has no such run."""
        tracking = self.cfg.tracking
        try:
            run = self.client.get_run(run_id)
            self._stored = Stored.of_run(self.client, run)
            resumes = int(run.data.tags.get(RESUMES_TAG, "0")) + 1
            self.client.update_run(run_id, status="RUNNING")
            self.client.set_tag(run_id, RESUMES_TAG, str(resumes))
        except Exception as err:  # mlflow raises MlflowException, requests' errors or sqlalchemy's
            if getattr(err, "error_code", None) == "RESOURCE_DOES_NOT_EXIST":
                log.warning(
                    "MLflow run %s is not in tracking.uri=%s: the resumed training goes on in a new run (tag %s)",
                    run_id,
                    tracking.uri,
                    CONTINUES_TAG,
                )
                return False
            raise MedloraError(
                f"cannot resume the MLflow run {run_id} in tracking.uri={tracking.uri}: {brief(err)}. "
                "Start the server (or fix the URI), or run without tracking: tracking=none."
            ) from err
        self._stored.tags[RESUMES_TAG] = str(resumes)
        self.run_id = run_id
        self.url = ui_url(tracking, run.info.experiment_id, run_id)
        # what the attempt before queued and MLflow never took (saved at its last checkpoint or end)
        # goes first; not its closing status, as this attempt closes the run
        for write in backlog_of(self._folder(), run_id):
            if write["kind"] != "status":
                self._put(write)
        return True

    def _folder(self) -> Path:
        return self.folder or Path(self.cfg.paths.output_dir)

    def start_beside(self, name: str, tags: dict[str, str], parent_run_id: str | None = None) -> None:
        """A run of another kind (an evaluation, an export): nested under `parent_run_id` and in its
        experiment when there is one, else in the configured experiment."""
        if not self.enabled:
            return
        self.client = _client(self.cfg.tracking)
        if parent_run_id:
            exp_id = self.client.get_run(parent_run_id).info.experiment_id
            tags = {**tags, "mlflow.parentRunId": parent_run_id}
        else:
            exp_id = experiment_id(self.cfg.tracking)
        self._create(exp_id, name, tags)

    def attach(self, run_id: str) -> None:
        """Write into an existing run (an export logs its model beside the adapter's training metrics)."""
        if not self.enabled:
            return
        self.client = _client(self.cfg.tracking)
        self.run_id = run_id
        self.url = ui_url(self.cfg.tracking, self.client.get_run(run_id).info.experiment_id, run_id)

    def _create(self, exp_id: str, name: str, tags: dict[str, str]) -> None:
        """A new run with the tags every run of this project carries (code, machine, model) and `tags`."""
        every = {
            "git_commit": git_commit(self.cfg.paths.root_dir),
            "host": socket.gethostname(),
            "model": str(self.cfg.model.base_model),
        }
        run = self.client.create_run(exp_id, run_name=name, tags={**every, **tags})
        self.run_id = run.info.run_id
        self._stored.tags.update(run.data.tags)
        self.url = ui_url(self.cfg.tracking, exp_id, self.run_id)

    def _put(self, write: dict) -> None:
        if self._writer is None:
            tracking = self.cfg.tracking
            self._writer = Writer(self.client, self.run_id, str(tracking.uri), self._stored, tracking.retry_max_wait)
        self._writer.put(write)

    def log_params(self, params: dict) -> None:
        if self.enabled:
            self._put({"kind": "log", "params": {k: str(v) for k, v in params.items()}, "tags": {}, "metrics": []})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.enabled:
            now = now_ms()
            rows = [[k, float(v), now, int(step)] for k, v in metrics.items()]
            self._put({"kind": "log", "params": {}, "tags": {}, "metrics": rows})

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.enabled:
            self._put({"kind": "log", "params": {}, "tags": {k: str(v) for k, v in tags.items()}, "metrics": []})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled and Path(path).exists():
            self._put({"kind": "artifact", "path": str(Path(path).resolve()), "artifact_path": artifact_path})

    def log_table(self, table: dict[str, list], artifact_file: str) -> None:
        """A table the MLflow UI can compare across runs (Evaluation tab)."""
        if self.enabled:
            self._put({"kind": "table", "data": table, "artifact_file": artifact_file})

    def log_model(self, model, tokenizer, **kwargs) -> str | None:
        """The model with MLflow's transformers flavor into this run, which it then ends (FINISHED);
        returns its model URI. Not queued: the caller needs the URI, and an export has no training
        to protect from the store."""
        if not self.enabled:
            return None
        import mlflow

        mlflow.set_tracking_uri(self.cfg.tracking.uri)
        # the flavour logs into the active fluent run; resuming ours keeps the client's run the one written
        with mlflow.start_run(run_id=self.run_id, log_system_metrics=False):
            info = mlflow.transformers.log_model({"model": model, "tokenizer": tokenizer}, **kwargs)
        return info.model_uri

    def persist(self) -> None:
        """Save the writes the store has not taken yet beside the run (a checkpoint calls this before
        it saves), so a crash after the checkpoint loses none of what came before it: the resumed run,
        or a replay, sends them. Never raises, and never waits for the store."""
        if not (self.enabled and self._writer is not None and self.cfg.tracking.backlog):
            return
        try:
            keep_backlog(self._folder(), str(self.cfg.tracking.uri), self.run_id, self._writer.pending())
        except Exception as err:
            log.warning("could not save the MLflow writes still queued for run %s: %s", self.run_id, brief(err))

    def finish(self, status: str = "FINISHED", error: str | None = None) -> None:
        """End the run: wait for its writes (tracking.flush_timeout at most while the store is down),
        then save those it did not take beside the run. Never raises: this runs while the error that
        stopped training propagates, and a tracking failure must not take its place."""
        if not (self.enabled and self.run_id):
            return
        try:
            if error:
                self.set_tags({"error": error[:8000]})
            self._put({"kind": "status", "status": status, "end_time": now_ms()})
            writer, self._writer = self._writer, None
            try:
                left = writer.close(float(self.cfg.tracking.flush_timeout))
            except KeyboardInterrupt:  # Ctrl-C while the run waits for the store: keep what it lacks, then stop
                self._keep(writer.abandon())
                raise
            self._keep(left)
        except Exception as err:
            log.warning("could not close the MLflow run %s: %s", self.run_id, brief(err))

    def _keep(self, writes: list[dict]) -> None:
        """`writes` become the run's backlog; none left clears what a checkpoint saved."""
        tracking, folder = self.cfg.tracking, self._folder()
        if not tracking.backlog:
            if writes:
                log.warning(
                    "MLflow at %s did not take %d writes of run %s; they are dropped (tracking.backlog=false)",
                    tracking.uri,
                    len(writes),
                    self.run_id,
                )
            return
        path = keep_backlog(folder, str(tracking.uri), self.run_id, writes)
        if writes:
            log.warning(
                "MLflow at %s did not take %d writes of run %s: they are in %s; once it is back, send them with "
                "`python -m medlora.tracking replay %s`",
                tracking.uri,
                len(writes),
                self.run_id,
                path,
                folder,
            )
