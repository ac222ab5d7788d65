"""Sweeps, grid (`-m`) and Optuna (`hparams_search=lora_optuna`): one MLflow parent per sweep with a
child per job, the best job and comparison plots on the parent, failed jobs marked and skipped; and
notebooks/sweep_analysis.ipynb runs top to bottom on a real (tiny) sweep, so it cannot rot unseen."""

from __future__ import annotations

import shutil

import nbformat
import optuna
import pytest
from nbclient import NotebookClient
from optuna.trial import TrialState

from helpers import AUTO_ALLOCATOR, ROOT, SWEEP_JOB, mlflow_client, optuna_search, train

PLOTS = {"plots/eval_loss_vs_params.png", "plots/train_loss.png"}


def _runs(tmp):
    client = mlflow_client(tmp)
    runs = client.search_runs(
        [client.get_experiment_by_name("medlora").experiment_id], order_by=["attributes.start_time ASC"]
    )
    parents = [r for r in runs if r.data.tags.get("medlora.role") == "sweep"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def _artifacts(tmp, run_id, folder=None):
    return {a.path for a in mlflow_client(tmp).list_artifacts(run_id, folder)}


def _study(tmp):
    return optuna.load_study(study_name="lora_tiny_random", storage=f"sqlite:///{tmp}/optuna.db")


def _assert_best_is_lowest(parent, children):
    finished = [c for c in children if c.info.status == "FINISHED"]
    lowest = min(finished, key=lambda c: c.data.metrics["eval_loss"])
    assert parent.data.tags["best_run_id"] == lowest.info.run_id
    assert parent.data.metrics["best_eval_loss"] == lowest.data.metrics["eval_loss"]
    return lowest


@pytest.mark.slow
def test_two_job_sweep_nests_under_one_parent(tmp_path):
    result = train(tmp_path, *SWEEP_JOB, "lora.rank=4,8", multirun=True)
    assert result.returncode == 0, result.stderr[-3000:]
    (parent,), children = _runs(tmp_path)
    assert len(children) == 2
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert sorted(c.data.params["lora.rank"] for c in children) == ["4", "8"]
    # the sweep values are left out when train.py reads training.allocator before Hydra starts
    assert {c.data.params["resolved_allocator"] for c in children} == {AUTO_ALLOCATOR}
    assert all(c.info.status == "FINISHED" and "eval_loss" in c.data.metrics for c in children)
    assert parent.info.status == "FINISHED" and parent.data.tags["jobs_finished"] == "2"
    assert (tmp_path / "sweep" / "0" / "adapter").is_dir() and (tmp_path / "sweep" / "1" / "adapter").is_dir()
    # the summary: search space, best job, results table and plots
    assert parent.data.tags["search_space.lora.rank"] == "4,8" and parent.data.tags["sweeper"] == "basic"
    best = _assert_best_is_lowest(parent, children)
    assert parent.data.tags["best_overrides"] == f"lora.rank={best.data.params['lora.rank']}"
    assert {"search_space.yaml", "sweep_results.csv"} <= _artifacts(tmp_path, parent.info.run_id)
    assert _artifacts(tmp_path, parent.info.run_id, "plots") == PLOTS


@pytest.mark.slow
def test_failed_job_is_marked_and_the_sweep_goes_on(tmp_path):
    result = train(tmp_path, *SWEEP_JOB, "lora.rank=0,4", multirun=True)
    assert result.returncode != 0  # Hydra reports the failed job once the sweep is done
    (parent,), children = _runs(tmp_path)
    status = {c.data.params["lora.rank"]: c.info.status for c in children}
    assert status == {"0": "FAILED", "4": "FINISHED"}
    failed = next(c for c in children if c.info.status == "FAILED")
    assert "lora.rank=0 is invalid" in failed.data.tags["error"]
    assert parent.info.status == "FINISHED" and parent.data.tags["jobs_failed"] == "1"
    # Hydra skips on_multirun_end after a failed job: the summary comes from the exit path
    assert parent.data.tags["best_overrides"] == "lora.rank=4"
    assert _artifacts(tmp_path, parent.info.run_id, "plots") == PLOTS


@pytest.mark.slow
def test_optuna_search_records_every_trial_under_one_parent(optuna_sweep):
    (parent,), children = _runs(optuna_sweep)
    assert len(children) == 3 and all(c.info.status == "FINISHED" for c in children)
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    tags = parent.data.tags
    assert tags["sweeper"] == "optuna" and tags["optuna.study_name"] == "lora_tiny_random"
    assert tags["search_space.lora.rank"] == "choice(4, 8, 16, 32, 64)"
    assert tags["search_space.training.learning_rate"] == "tag(log, interval(1e-5, 1e-3))"
    # every trial names its MLflow run and every run its trial
    trials = _study(optuna_sweep).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    runs = {c.info.run_id: c for c in children}
    for trial in trials:
        run = runs[trial.user_attrs["mlflow_run_id"]]
        assert run.data.tags["optuna.trial_number"] == str(trial.number)
        assert run.data.metrics["eval_loss"] == trial.value
        assert run.data.params["lora.rank"] == str(trial.params["lora.rank"])
    best = _assert_best_is_lowest(parent, children)
    assert tags["best_trial_number"] == best.data.tags["optuna.trial_number"]
    assert f"lora.alpha={best.data.params['lora.alpha']}" in tags["best_overrides"].split()
    assert {"search_space.yaml", "sweep_results.csv", "optimization_results.yaml"} <= _artifacts(
        optuna_sweep, parent.info.run_id
    )
    assert _artifacts(optuna_sweep, parent.info.run_id, "plots") == PLOTS


@pytest.mark.slow
def test_optuna_search_resumes_its_study(optuna_sweep, tmp_path):
    shutil.copy(optuna_sweep / "optuna.db", tmp_path / "optuna.db")
    result = optuna_search(tmp_path, n_trials=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [t.number for t in _study(tmp_path).trials] == [0, 1, 2, 3, 4]
    (_,), children = _runs(tmp_path)
    assert sorted(c.data.tags["optuna.trial_number"] for c in children) == ["3", "4"]


@pytest.mark.slow
def test_failed_trial_is_fail_in_the_study_and_the_search_goes_on(tmp_path):
    # a random sampler with this seed draws rank 4, 0, 4: the middle trial fails validation
    result = optuna_search(
        tmp_path,
        "hydra/sweeper/sampler=random",
        "hydra.sweeper.sampler.seed=0",
        "lora.rank=choice(0,4)",
        "lora.alpha=16",
        "lora.dropout=0",
        "training.learning_rate=1e-3",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    trials = _study(tmp_path).trials
    assert [(t.params["lora.rank"], t.state) for t in trials] == [
        (4, TrialState.COMPLETE),
        (0, TrialState.FAIL),
        (4, TrialState.COMPLETE),
    ]
    (parent,), children = _runs(tmp_path)
    assert [c.info.status for c in children] == ["FINISHED", "FAILED", "FINISHED"]
    assert "lora.rank=0 is invalid" in children[1].data.tags["error"]
    assert trials[1].user_attrs["mlflow_run_id"] == children[1].info.run_id
    assert parent.info.status == "FINISHED" and parent.data.tags["jobs_failed"] == "1"
    assert parent.data.tags["search_space.lora.rank"] == "choice(0,4)"
    assert "search_space.lora.alpha" not in parent.data.tags  # fixed on the command line
    assert parent.data.tags["best_overrides"] == "lora.rank=4"


def test_unusable_study_storage_is_one_clear_error(tmp_path):
    result = optuna_search(tmp_path, "hydra.sweeper.storage=sqlite:////proc/medlora/optuna.db")
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith("error: hydra.sweeper.storage=sqlite:////proc/medlora/optuna.db: cannot create /proc/medlora")
    )
    assert "Traceback" not in result.stderr and not (tmp_path / "sweep").exists()


def test_summary_reads_config_groups_from_the_overrides_and_plots_them_as_categories():
    import pandas as pd

    from medlora.sweep import best_run, overrides_of, plot_metric_vs_params, swept_values

    children = pd.DataFrame(
        {
            "run_id": ["a", "b", "c"],
            "status": ["FINISHED", "FINISHED", "FAILED"],
            "params.lora.rank": ["8", "16", "16"],
            "metrics.eval_loss": [2.5, 2.25, None],
            "tags.hydra_overrides": ["lora.rank=8 debug=fast", "lora.rank=16 debug=overfit", "lora.rank=16 debug=fast"],
        }
    )
    keys = ["lora.rank", "debug"]
    assert swept_values(children, keys).to_dict("list") == {
        "lora.rank": [8, 16, 16],
        "debug": ["fast", "overfit", "fast"],
    }
    best = best_run(children)
    assert best["run_id"] == "b" and overrides_of(children, best.name, keys) == "lora.rank=16 debug=overfit"
    rank_ax, debug_ax = plot_metric_vs_params(children, keys).axes
    assert [t.get_text() for t in debug_ax.get_xticklabels()] == ["fast", "overfit"]
    assert rank_ax.get_xscale() == "linear"  # 8 to 16 is no spread over orders of magnitude


def test_resumed_study_closes_trials_an_interrupted_search_left_running(tmp_path):
    from medlora.sweep import OptunaStudy

    storage = f"sqlite:///{tmp_path}/optuna.db"
    study = optuna.create_study(study_name="lora_tiny_random", storage=storage)
    study.tell(study.ask({"lora.rank": optuna.distributions.IntDistribution(4, 64)}), 1.0)
    study.ask()  # the trial a Ctrl-C stopped: the sweeper never told its result
    OptunaStudy(storage, "lora_tiny_random").check()
    assert [t.state for t in _study(tmp_path).trials] == [TrialState.COMPLETE, TrialState.FAIL]


# the notebook reads the same Optuna sweep as the tests above (conftest.optuna_sweep, made once)
NOTEBOOK = ROOT / "notebooks" / "sweep_analysis.ipynb"


def test_notebook_is_committed_without_outputs():
    code = [c for c in nbformat.read(NOTEBOOK, as_version=4).cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


@pytest.mark.slow
def test_sweep_analysis_runs_top_to_bottom(optuna_sweep):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # as papermill does: a cell after the one tagged "parameters" sets this run's values
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(f'TRACKING_URI = "sqlite:///{optuna_sweep}/mlflow.db"'))
    NotebookClient(
        nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(optuna_sweep)}}
    ).execute()

    client = mlflow_client(optuna_sweep)
    (parent,) = client.search_runs(
        [client.get_experiment_by_name("medlora").experiment_id], filter_string="tags.`medlora.role` = 'sweep'"
    )
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert f"run {parent.data.tags['best_run_id']}" in text and "3 jobs, 3 finished" in text
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 2  # eval loss against the swept values, and the loss curves
    tables = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert any("COMPLETE" in t and "user_attrs_mlflow_run_id" in t for t in tables)  # the Optuna study
