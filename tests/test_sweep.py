"""`python train.py -m ...`: one MLflow parent per sweep, a child per job, a failed job does not stop the rest."""

from __future__ import annotations

from conftest import TINY, mlflow_client, train

FAST = [*TINY, "training.max_steps=2", "training.batch_size=2", "training.gradient_accumulation_steps=1",
        "data.max_train_samples=4", "data.max_eval_samples=4"]


def _runs(tmp):
    client = mlflow_client(tmp)
    runs = client.search_runs([client.get_experiment_by_name("medlora").experiment_id])
    parents = [r for r in runs if r.data.tags.get("medlora.role") == "sweep"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def test_two_job_sweep_nests_under_one_parent(tmp_path):
    result = train(tmp_path, *FAST, "lora.rank=4,8", multirun=True)
    assert result.returncode == 0, result.stderr[-3000:]
    (parent,), children = _runs(tmp_path)
    assert len(children) == 2
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert sorted(c.data.params["lora.rank"] for c in children) == ["4", "8"]
    assert all(c.info.status == "FINISHED" and "eval_loss" in c.data.metrics for c in children)
    assert parent.info.status == "FINISHED" and parent.data.tags["jobs_finished"] == "2"
    assert (tmp_path / "sweep" / "0" / "adapter").is_dir() and (tmp_path / "sweep" / "1" / "adapter").is_dir()


def test_failed_job_is_marked_and_the_sweep_goes_on(tmp_path):
    result = train(tmp_path, *FAST, "lora.rank=0,4", multirun=True)
    assert result.returncode != 0  # Hydra reports the failed job once the sweep is done
    (parent,), children = _runs(tmp_path)
    status = {c.data.params["lora.rank"]: c.info.status for c in children}
    assert status == {"0": "FAILED", "4": "FINISHED"}
    failed = next(c for c in children if c.info.status == "FAILED")
    assert "lora.rank=0 is invalid" in failed.data.tags["error"]
    assert parent.info.status == "FINISHED" and parent.data.tags["jobs_failed"] == "1"
