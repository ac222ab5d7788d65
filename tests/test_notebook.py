"""notebooks/sweep_analysis.ipynb runs top to bottom on a real (tiny) sweep, so it cannot rot unseen."""

from __future__ import annotations

import nbformat
from conftest import ROOT, mlflow_client
from nbclient import NotebookClient

NOTEBOOK = ROOT / "notebooks" / "sweep_analysis.ipynb"


def test_notebook_is_committed_without_outputs():
    code = [c for c in nbformat.read(NOTEBOOK, as_version=4).cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


def test_sweep_analysis_runs_top_to_bottom(optuna_sweep):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # as papermill does: a cell after the one tagged "parameters" sets this run's values
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(f'TRACKING_URI = "sqlite:///{optuna_sweep}/mlflow.db"'))
    NotebookClient(nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(optuna_sweep)}}).execute()

    client = mlflow_client(optuna_sweep)
    (parent,) = client.search_runs([client.get_experiment_by_name("medlora").experiment_id],
                                   filter_string="tags.`medlora.role` = 'sweep'")
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert f"run {parent.data.tags['best_run_id']}" in text and "3 jobs, 3 finished" in text
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 2  # eval loss against the swept values, and the loss curves
    tables = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert any("COMPLETE" in t and "user_attrs_mlflow_run_id" in t for t in tables)  # the Optuna study
