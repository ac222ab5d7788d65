"""A Hydra sweep in MLflow: one parent run per multirun (grid or Optuna), each job a child of it.

Hydra calls the callback in the launching process; the jobs find their parent by the sweep folder
(medlora.tracking.Tracker.start).
"""

from __future__ import annotations

import atexit
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from medlora.config import RUN_METRICS, MedloraError
from medlora.tracking import _client, _start_parent, _sweep_parent, experiment_id, ui_url

log = logging.getLogger(__name__)


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
