"""What a sweep's MLflow parent run shows: the search space, the best job, and comparison plots.

The summary is read back from MLflow (the parent's child runs), so a grid sweep
(`-m lora.rank=8,16`) and an Optuna search (`hparams_search=lora_optuna`) are summarised the same
way. The plots take the table `mlflow.search_runs` returns, so notebooks/sweep_analysis.ipynb
draws the same figures. For Optuna, each trial is linked to its MLflow run both ways.
"""

from __future__ import annotations

import logging
import math
import tempfile
from pathlib import Path

import pandas as pd
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from medlora.config import MedloraError

log = logging.getLogger(__name__)

SPACE_TAG = "search_space."  # parent tag per swept key: `search_space.lora.rank` = "8,16,32"
TRIAL_TAG = "optuna.trial_number"


def search_space(task_overrides, sweeper_params) -> dict[str, str]:
    """Swept keys and their values or ranges, as written: {"lora.rank": "choice(4, 8)"}.

    `hydra.sweeper.params` come first and the command line after it, as both sweepers read them:
    a fixed value on the command line takes a key out of the search."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    lines = [f"{key}={value}" for key, value in (sweeper_params or {}).items()] + list(task_overrides)
    space: dict[str, str] = {}
    for override in OverridesParser.create().parse_overrides(lines):
        if override.is_delete():
            continue
        if override.is_sweep_override():
            space[override.key_or_group] = override.input_line.split("=", 1)[1]
        else:
            space.pop(override.key_or_group, None)
    return space


def runs_frame(runs) -> pd.DataFrame:
    """MlflowClient runs as the table `mlflow.search_runs` returns (params.*, metrics.*, tags.*)."""
    rows = [
        {
            "run_id": r.info.run_id,
            "status": r.info.status,
            "start_time": r.info.start_time,
            **{f"params.{k}": v for k, v in r.data.params.items()},
            **{f"metrics.{k}": v for k, v in r.data.metrics.items()},
            **{f"tags.{k}": v for k, v in r.data.tags.items()},
        }
        for r in runs
    ]
    return pd.DataFrame(rows)


def swept_values(children: pd.DataFrame, keys: list[str], parse: bool = True) -> pd.DataFrame:
    """The value each child ran with for each swept key: its MLflow param, or for a config group
    (`model=a,b`, not a param) the job's own override. `parse`: numbers as numbers, else as logged."""
    columns = {}
    for key in keys:
        if f"params.{key}" in children:
            columns[key] = children[f"params.{key}"]
        else:
            overrides = children.get("tags.hydra_overrides", pd.Series("", index=children.index))
            columns[key] = overrides.fillna("").map(lambda line, key=key: _override_value(line, key))
    frame = pd.DataFrame(columns, index=children.index)
    return frame.map(_number) if parse else frame


def best_run(children: pd.DataFrame, metric: str = "eval_loss", minimize: bool = True):
    """The finished child with the lowest metric (highest unless `minimize`), or None when no child finished."""
    column = f"metrics.{metric}"
    if column not in children:
        return None
    done = children[(children["status"] == "FINISHED") & children[column].notna()]
    if done.empty:
        return None
    return done.loc[done[column].idxmin() if minimize else done[column].idxmax()]


def overrides_of(children: pd.DataFrame, index, keys: list[str]) -> str:
    """`lora.rank=8 training.learning_rate=0.0003`: the command-line overrides that rerun one child."""
    values = swept_values(children, keys, parse=False)
    return " ".join(f"{key}={values.at[index, key]}" for key in keys)


def plot_metric_vs_params(
    children: pd.DataFrame, keys: list[str], metric: str = "eval_loss", minimize: bool = True
) -> Figure:
    """One panel per swept key: every finished child's final metric against its value there;
    the best child is the red star."""
    values = swept_values(children, keys)
    scores = children.get(f"metrics.{metric}", pd.Series(math.nan, index=children.index))
    best = best_run(children, metric, minimize)
    fig = Figure(figsize=(4 * max(len(keys), 1), 3.4), layout="constrained")
    FigureCanvasAgg(fig)
    for ax, key in zip(fig.subplots(1, max(len(keys), 1), squeeze=False)[0], keys):
        x = values[key]
        numeric = pd.api.types.is_numeric_dtype(x)
        if not numeric:  # categories (a config group): one position per value, in first-seen order
            positions = {name: i for i, name in enumerate(dict.fromkeys(map(str, x)))}
            x = x.map(lambda v, positions=positions: positions[str(v)])
            ax.set_xticks(range(len(positions)), list(positions), rotation=30, ha="right")
        ax.scatter(x, scores, color="tab:blue")
        if best is not None:
            ax.scatter([x[best.name]], [scores[best.name]], marker="*", s=200, color="tab:red", label="best")
        positive = [v for v in x if v > 0]
        if numeric and positive and min(positive) * 20 <= max(positive) and len(positive) == len(x):
            ax.set_xscale("log")  # learning rates, ranks: spread over orders of magnitude
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    fig.suptitle(f"final {metric} per job ({len(scores.dropna())} finished of {len(children)})")
    return fig


def plot_curves(curves: list[tuple[str, list]], metric: str = "train_loss", best: str | None = None) -> Figure:
    """Each child's (label, metric history as MLflow `Metric`s) on one axis; the `best` label drawn thicker."""
    fig = Figure(figsize=(7, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for label, history in curves:
        points = sorted((m.step, m.value) for m in history)
        ax.plot(
            [s for s, _ in points],
            [v for _, v in points],
            label=label,
            linewidth=2.5 if label == best else 1.0,
            marker="." if len(points) < 20 else None,
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize="x-small", ncol=1 + len(curves) // 12, loc="upper right")
    return fig


def curve_labels(children: pd.DataFrame, keys: list[str]) -> pd.Series:
    """`rank=8 alpha=16 learning_rate=0.000349` per child: the last part of each swept key, floats
    to 3 significant digits; the run id where nothing was swept."""
    values = swept_values(children, keys)

    def label(index) -> str:
        parts = [f"{key.rsplit('.', 1)[-1]}={_short(values.at[index, key])}" for key in keys]
        return " ".join(parts) or children.at[index, "run_id"][:8]

    return pd.Series([label(i) for i in children.index], index=children.index)


def summarize(
    client,
    exp_id: str,
    parent_id: str,
    keys: list[str],
    sweep_dir: str,
    metric: str = "eval_loss",
    minimize: bool = True,
) -> dict | None:
    """Put the best job, a results table and the plots on the parent run; return the best job's record."""
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    runs = client.search_runs(
        [exp_id],
        filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_id}'",
        order_by=["attributes.start_time ASC"],
        max_results=5000,
    )
    children = runs_frame(runs)
    if children.empty:
        return None
    values = swept_values(children, keys, parse=False)
    best = best_run(children, metric, minimize)
    with tempfile.TemporaryDirectory() as tmp:
        extra = children.reindex(columns=[f"tags.{TRIAL_TAG}", f"metrics.{metric}"]).dropna(axis=1, how="all")
        table = pd.concat(
            [
                children[["run_id", "status"]],
                values,
                extra.rename(columns={f"tags.{TRIAL_TAG}": "trial", f"metrics.{metric}": metric}),
            ],
            axis=1,
        )
        table.to_csv(Path(tmp) / "sweep_results.csv", index=False)
        client.log_artifact(parent_id, str(Path(tmp) / "sweep_results.csv"))
        plots = Path(tmp) / "plots"
        plots.mkdir()
        plot_metric_vs_params(children, keys, metric, minimize).savefig(plots / f"{metric}_vs_params.png", dpi=110)
        labels = curve_labels(children, keys)
        curves = [
            (labels[i], client.get_metric_history(children.at[i, "run_id"], "train_loss")) for i in children.index
        ]
        plot_curves(curves, best=labels[best.name] if best is not None else None).savefig(
            plots / "train_loss.png", dpi=110
        )
        client.log_artifacts(parent_id, str(plots), "plots")
    results = Path(sweep_dir) / "optimization_results.yaml"  # Optuna's study-wide best, resumed trials too
    if results.is_file():
        client.log_artifact(parent_id, str(results))
    if best is None:
        return None
    record = {"best_run_id": best["run_id"], "best_overrides": overrides_of(children, best.name, keys)}
    if pd.notna(best.get(f"tags.{TRIAL_TAG}")):
        record["best_trial_number"] = best[f"tags.{TRIAL_TAG}"]
    for key, value in record.items():
        client.set_tag(parent_id, key, value)
    client.log_metric(parent_id, f"best_{metric}", float(best[f"metrics.{metric}"]))
    return {**record, f"best_{metric}": float(best[f"metrics.{metric}"])}


def log_search_space(client, parent_id: str, space: dict[str, str], sweeper: dict) -> None:
    """The search space as tags (one per key, visible in the runs table) and as search_space.yaml."""
    for key, value in space.items():
        client.set_tag(parent_id, SPACE_TAG + key, value)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "search_space.yaml"
        path.write_text(yaml.safe_dump({**sweeper, "search_space": space}, sort_keys=False))
        client.log_artifact(parent_id, str(path))


class OptunaStudy:
    """The study an Optuna sweep writes to, seen from outside the sweeper (which keeps its own)."""

    def __init__(self, storage: str, study_name: str) -> None:
        self.url, self.study_name = storage, study_name
        self.linked: set[int] = set()
        self._storage = None

    def check(self) -> None:
        """Fail early and clearly on a storage that cannot be opened; close trials left RUNNING by
        an interrupted sweep, which would otherwise count as running forever."""
        from optuna.trial import TrialState

        if self.url.startswith("sqlite:///"):
            folder = Path(self.url.removeprefix("sqlite:///")).parent
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise MedloraError(
                    f"hydra.sweeper.storage={self.url}: cannot create {folder} ({err.strerror}). "
                    "Give a writable place: hydra.sweeper.storage=sqlite:////absolute/path/optuna.db."
                ) from err
        try:
            study = self._study()
        except KeyError:  # a new study: the sweeper creates it
            return
        except Exception as err:  # sqlalchemy's and optuna's errors for a bad URL or a server that is down
            reason = str(err).splitlines()[0].rstrip(".") if str(err) else type(err).__name__
            raise MedloraError(
                f"cannot open the Optuna study storage hydra.sweeper.storage={self.url}: {reason}. "
                "Fix the URL (SQLite: sqlite:////absolute/path/optuna.db), install the database's "
                "driver, or start the database."
            ) from err
        stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        for trial in stale:
            study.tell(trial.number, state=TrialState.FAIL)
        if stale:
            log.warning(
                "study %s: trials %s were left running by an interrupted sweep; marked FAIL",
                self.study_name,
                [t.number for t in stale],
            )
        log.info("study %s resumes after %d trials", self.study_name, len(study.trials))

    def link(self, job_overrides: list[str], run_id: str | None) -> int | None:
        """Find the running trial whose sampled values are this job's overrides (the sweeper writes
        them as `key=value`) and record the job's MLflow run on it; return its number."""
        from optuna.trial import TrialState

        study = self._study()
        given = set(job_overrides)
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if trial.number not in self.linked and {f"{k}={v}" for k, v in trial.params.items()} <= given:
                self.linked.add(trial.number)
                if run_id:
                    study_id = self._storage.get_study_id_from_name(self.study_name)
                    trial_id = self._storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
                    self._storage.set_trial_user_attr(trial_id, "mlflow_run_id", run_id)
                return trial.number
        return None

    def _study(self):
        import optuna

        if self._storage is None:
            self._storage = optuna.storages.RDBStorage(self.url)
        return optuna.load_study(study_name=self.study_name, storage=self._storage)


def _override_value(line: str, key: str) -> str | None:
    for item in line.split(" "):
        name, _, value = item.partition("=")
        if name.lstrip("+") == key:
            return value
    return None


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _number(value):
    """ "16" -> 16, "0.0003" -> 0.0003; anything else stays as it is."""
    if not isinstance(value, str):
        return value
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value
