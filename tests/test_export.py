"""Export: the merged checkpoint loads with plain transformers and computes what base + adapter computes;
the adapter logs to MLflow as a transformers/peft model that records its base model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from medlora.cli import RunInfo
from medlora.config import MedloraError

from helpers import TINY, compose, infer, train


@pytest.fixture(scope="module")
def merged(adapter, tmp_path_factory):
    """`python infer.py adapter=... export.merged_dir=...`: the real entry point, no generation."""
    tmp = tmp_path_factory.mktemp("export")
    result = infer(tmp, f"adapter={adapter['dir']}", f"export.merged_dir={tmp}/merged", "tracking=none")
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp


def _inputs(folder):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"
    chats = [
        [{"role": "user", "content": "What is anemia?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How is asthma treated in children?"}],
    ]
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


@torch.no_grad()
def _peft_logits(adapter, inputs):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(adapter["base_path"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter["dir"]).eval()
    with model.disable_adapter():
        plain = model(**inputs).logits
    return model(**inputs).logits, plain


def test_merged_checkpoint_is_standalone(merged):
    folder = merged / "merged"
    files = {p.name for p in folder.iterdir()}
    assert {
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "README.md",
    } <= files
    assert not any(name.startswith("adapter_") for name in files)
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["use_cache"] is True
    # the session's audit trail holds the hash of every file it wrote
    (entry,) = [json.loads(line) for line in (merged / "session" / "audit.jsonl").read_text().splitlines()]
    assert entry["event_type"] == "adapter_export" and set(entry["outputs"]) == {p for p in files}


@torch.no_grad()
def test_merged_logits_equal_base_plus_adapter(adapter, merged):
    from transformers import AutoModelForCausalLM  # plain transformers: no peft, no medlora

    model = AutoModelForCausalLM.from_pretrained(merged / "merged").eval()
    assert model.dtype == torch.float32
    inputs = _inputs(merged / "merged")
    expected, base_only = _peft_logits(adapter, inputs)
    merged_logits = model(**inputs).logits
    mask = inputs["attention_mask"].bool()  # padded positions carry no prediction
    assert (merged_logits - expected)[mask].abs().max().item() < 1e-4
    assert (expected - base_only)[mask].abs().max().item() > 1e-1  # the adapter changes the outputs


@pytest.mark.slow
def test_a_4bit_trained_adapter_merges_into_unquantized_weights(tmp_path):
    """QLoRA: an adapter trained on a 4-bit base merges into the full-precision base, W + (alpha / r) B A,
    computed here from the saved files alone."""
    pytest.importorskip("bitsandbytes")
    from safetensors.torch import load_file

    from medlora.model import resolve_checkpoint

    rank, alpha = 4, 8
    trained = train(
        tmp_path,
        *TINY,
        "model.quantization=4bit",
        f"lora.rank={rank}",
        f"lora.alpha={alpha}",
        "training.max_steps=2",
        "training.batch_size=2",
        "training.gradient_accumulation_steps=1",
        "training.learning_rate=1e-2",
        "data.max_train_samples=4",
        "data.max_eval_samples=2",
        "tracking=none",
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    run_dir = tmp_path / "run"
    assert OmegaConf.load(run_dir / "config_resolved.yaml").model.quantization == "4bit"
    exported = infer(
        tmp_path / "export", f"adapter={run_dir / 'adapter'}", f"export.merged_dir={tmp_path}/merged", "tracking=none"
    )
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())

    cfg = compose("infer", ["model=tiny_random"])
    base_path, _ = resolve_checkpoint(cfg.model, cfg.paths.cache_dir, cfg.seed)
    base = load_file(Path(base_path) / "model.safetensors")
    lora = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    assert merged.keys() == base.keys()
    updated = set()
    for key in lora:
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            a, b = lora[key], lora[key.replace("lora_A", "lora_B")]
            assert b.abs().max() > 0  # trained: lora_B starts at zero
            expected = base[f"{module}.weight"] + (alpha / rank) * (b @ a)
            torch.testing.assert_close(merged[f"{module}.weight"], expected, atol=1e-6, rtol=1e-5)
            updated.add(f"{module}.weight")
    assert len(updated) == 7 * 2  # every linear layer of both blocks (q, k, v, o, gate, up, down)
    assert all(merged[k].dtype == torch.float32 and torch.equal(merged[k], base[k]) for k in base.keys() - updated)


def test_export_never_overwrites_a_folder(adapter, merged):
    from medlora.infer.session import run

    overrides = [f"adapter={adapter['dir']}", f"export.merged_dir={merged}/merged", "tracking=none"]
    with pytest.raises(MedloraError, match="already exists"):
        run(compose("infer", overrides), RunInfo(output_dir=merged / "again", overrides=tuple(overrides)))


@torch.no_grad()
def test_adapter_logs_to_mlflow_as_a_peft_model_and_registers(adapter, tmp_path):
    import mlflow
    from mlflow import MlflowClient

    from medlora.infer.session import run

    overrides = [
        f"run_id={adapter['run_id']}",
        f"tracking.uri={adapter['uri']}",
        "export.log_model=true",
        "export.registered_model_name=medlora-tiny",
    ]
    run(compose("infer", overrides), RunInfo(output_dir=tmp_path / "session", overrides=tuple(overrides)))
    client = MlflowClient(tracking_uri=adapter["uri"])
    (version,) = client.search_model_versions("name='medlora-tiny'")
    assert version.run_id == adapter["run_id"]  # logged beside the adapter's training run
    mlflow.set_tracking_uri(adapter["uri"])
    flavor = mlflow.models.get_model_info("models:/medlora-tiny/1").flavors["transformers"]
    assert flavor["local_base_model_path"] == str(adapter["base_path"]) and flavor["peft_adaptor"] == "peft"
    components = mlflow.transformers.load_model("models:/medlora-tiny/1", return_type="components")
    inputs = _inputs(adapter["dir"])
    expected, _ = _peft_logits(adapter, inputs)
    assert torch.equal(components["model"].eval()(**inputs).logits, expected)
