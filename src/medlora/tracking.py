"""MLflow tracking: one run per job; the jobs of a Hydra sweep nest under one parent run.

The parent is made by `MlflowSweepCallback` before the first job and found by each job through
its `medlora.sweep_dir` tag, which works whichever Hydra launcher runs the jobs. When the sweep
ends, medlora.sweep reads the children back and puts the best job and comparison plots on it.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from medlora.config import RUN_METRICS, MedloraError

log = logging.getLogger(__name__)

SWEEP_TAG = "medlora.sweep_dir"
# a server that is down should fail the run in seconds, not after MLflow's minutes of retries
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
    """The MLflow run of one job. With tracking disabled every call does nothing."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.enabled = bool(cfg.tracking.enabled)
        self.run_id = None
        self.url = None

    def start(self, sweep_dir: str | None = None, overrides: list[str] = ()) -> None:
        if not self.enabled:
            return
        tracking = self.cfg.tracking
        self.client = _client(tracking)
        exp_id = experiment_id(tracking)
        all_tags = {"hydra_overrides": " ".join(overrides)[:8000]}
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
        self.run_id = self.client.create_run(exp_id, run_name=name, tags={**every, **tags}).info.run_id
        self.url = ui_url(self.cfg.tracking, exp_id, self.run_id)

    def log_params(self, params: dict) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAMS_TAGS_PER_BATCH

        items = [Param(k, str(v)) for k, v in params.items()]
        for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + MAX_PARAMS_TAGS_PER_BATCH])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.enabled:
            for key, value in tags.items():
                self.client.set_tag(self.run_id, key, str(value))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if not self.enabled or not Path(path).exists():
            return
        if Path(path).is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_table(self, table: dict[str, list], artifact_file: str) -> None:
        """A table the MLflow UI can compare across runs (Evaluation tab)."""
        if self.enabled:
            import mlflow

            mlflow.set_tracking_uri(self.cfg.tracking.uri)
            mlflow.log_table(data=table, artifact_file=artifact_file, run_id=self.run_id)

    def log_model(self, model, tokenizer, **kwargs) -> str | None:
        """The model with MLflow's transformers flavor into this run, which it then ends (FINISHED);
        returns its model URI."""
        if not self.enabled:
            return None
        import mlflow

        mlflow.set_tracking_uri(self.cfg.tracking.uri)
        # the flavour logs into the active fluent run; resuming ours keeps the client's run the one written
        with mlflow.start_run(run_id=self.run_id, log_system_metrics=False):
            info = mlflow.transformers.log_model({"model": model, "tokenizer": tokenizer}, **kwargs)
        return info.model_uri

    def finish(self, status: str = "FINISHED", error: str | None = None) -> None:
        if self.enabled and self.run_id:
            if error:
                self.client.set_tag(self.run_id, "error", error[:8000])
            self.client.set_terminated(self.run_id, status)


class MlflowSweepCallback(Callback):
    """One parent run per Hydra multirun (grid or Optuna): it gets the search space when the sweep
    starts, and the best job, a results table and comparison plots (medlora.sweep) when it ends."""

    def __init__(self) -> None:
        self.parent = None
        self.study = None
        self.failed = 0
        self.finished = 0

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        _exit_on_user_error(lambda: self._start(config))

    def _start(self, config: DictConfig) -> None:
        from medlora.sweep import OptunaStudy, log_search_space, search_space

        sweeper = config.hydra.sweeper
        optuna = "optuna" in str(sweeper._target_)
        if optuna and sweeper.storage and sweeper.study_name:
            self.study = OptunaStudy(str(sweeper.storage), str(sweeper.study_name))
            self.study.check()
        if not config.tracking.enabled:
            return
        client = _client(config.tracking)
        exp_id = experiment_id(config.tracking)
        sweep_dir = str(Path(config.hydra.sweep.dir).resolve())
        run_id = _sweep_parent(client, exp_id, sweep_dir) or _start_parent(
            client, exp_id, sweep_dir, list(config.hydra.overrides.task)
        )
        space = search_space(config.hydra.overrides.task, sweeper.get("params"))
        metric = config.get("optimized_metric", "eval_loss")
        direction = str(sweeper.direction) if optuna else RUN_METRICS.get(metric, "minimize")
        self.parent = _SweepParent(
            client,
            exp_id,
            run_id,
            sweep_dir,
            list(space),
            ui_url(config.tracking, exp_id, run_id),
            metric,
            direction != "maximize",
        )
        described = {"sweeper": config.hydra.runtime.choices.get("hydra/sweeper", "basic")}
        if optuna:
            described.update(
                {key: str(sweeper[key]) for key in ("study_name", "storage", "direction", "n_trials")},
                sampler=str(sweeper.sampler._target_),
            )
        for key, value in described.items():
            client.set_tag(run_id, key if key == "sweeper" else f"optuna.{key}", value)
        log_search_space(client, run_id, space, described)
        # Hydra skips on_multirun_end when a job failed (it re-raises that job's error after the
        # sweep), so the parent is also summarised and closed when the process exits
        atexit.register(self.close)

    def on_job_end(self, config: DictConfig, job_return, **kwargs) -> None:
        if job_return.status.name == "FAILED":
            self.failed += 1
        else:
            self.finished += 1
        if self.study is not None:
            try:
                self._link_trial(config)
            except Exception as err:  # the link is a convenience: never let it stop the sweep
                log.warning("could not link this job to its Optuna trial: %s", err)

    def _link_trial(self, config: DictConfig) -> None:
        from medlora.sweep import TRIAL_TAG

        run_id = self.parent.job_run(config.hydra.runtime.output_dir) if self.parent else None
        number = self.study.link(list(config.hydra.overrides.task), run_id)
        if run_id and number is not None:
            self.parent.client.set_tag(run_id, TRIAL_TAG, number)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        self.close()

    def close(self) -> None:
        if self.parent is None:
            return
        parent, self.parent = self.parent, None
        parent.summarize()
        parent.client.set_tag(parent.run_id, "jobs_finished", self.finished)
        parent.client.set_tag(parent.run_id, "jobs_failed", self.failed)
        # a sweep in which no job finished (all failed, or the sweeper stopped first) has no result
        parent.client.set_terminated(parent.run_id, "FINISHED" if self.finished else "FAILED")


@dataclass
class _SweepParent:
    client: object
    exp_id: str
    run_id: str
    sweep_dir: str
    keys: list[str]
    url: str
    metric: str = "eval_loss"
    minimize: bool = True

    def job_run(self, output_dir: str) -> str | None:
        """The child run of the job that wrote to `output_dir` (the latest, if a sweep folder was reused)."""
        runs = self.client.search_runs(
            [self.exp_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{self.run_id}' and params.`paths.output_dir` = '{output_dir}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        return runs[0].info.run_id if runs else None

    def summarize(self) -> None:
        from medlora.sweep import summarize

        try:
            best = summarize(
                self.client, self.exp_id, self.run_id, self.keys, self.sweep_dir, self.metric, self.minimize
            )
        except Exception as err:  # a summary that fails must not keep the parent open
            log.warning("could not summarise the sweep on its MLflow run %s: %s", self.url, err)
            return
        if best is None:
            log.warning("sweep: no job finished; parent run %s", self.url)
            return
        log.info(
            "sweep: best %s %.4f with %s (run %s); results and plots on the parent run %s",
            self.metric,
            best[f"best_{self.metric}"],
            best["best_overrides"] or "the base config",
            best["best_run_id"],
            self.url,
        )


def _exit_on_user_error(step) -> None:
    """A MedloraError before the sweep starts: one message and exit 2, as for a single run."""
    try:
        step()
    except MedloraError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
