"""QLoRA on CPU: bitsandbytes 4-bit base weights with a LoRA adapter train through the real entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import TINY, mlflow_client, train

bnb = pytest.importorskip("bitsandbytes")


@pytest.mark.slow
def test_4bit_lora_trains_a_few_steps(tmp_path):
    result = train(
        tmp_path,
        *TINY,
        "model.quantization=4bit",
        "training.max_steps=3",
        "training.batch_size=2",
        "training.gradient_accumulation_steps=1",
        "training.learning_rate=1e-2",
        "data.max_train_samples=6",
        "data.max_eval_samples=4",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    client = mlflow_client(tmp_path)
    (run,) = client.search_runs([client.get_experiment_by_name("medlora").experiment_id])
    assert run.data.params["model.quantization"] == "4bit"
    assert run.data.metrics["eval_loss"] < run.data.metrics["eval_loss_before"]
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_gradients_through_4bit_layers_survive_an_eval_pass():
    """bitsandbytes repacks 4-bit weights for a backward-less CPU kernel after an eval pass;
    medlora turns that off, so gradients after eval must equal gradients before it."""
    from conftest import ROOT
    from hydra import compose, initialize_config_dir

    from medlora.adapters import add_adapter
    from medlora.model import load_model, resolve_checkpoint

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["model=tiny_random", "model.quantization=4bit", "lora.dropout=0"])
    path, _ = resolve_checkpoint(cfg.model, cfg.paths.cache_dir, cfg.seed)
    model, _, _ = add_adapter(load_model(path, cfg.model, "bf16", "cpu"), cfg.lora, False)
    torch.manual_seed(0)
    with torch.no_grad():  # non-zero B so that every adapter's gradient depends on the layers above it
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    batch = {"input_ids": torch.randint(0, 1000, (2, 12))}
    batch["labels"] = batch["input_ids"].clone()

    def grads():
        model.train()
        model.zero_grad()
        # plain torch autocast: an Accelerator here would fix bf16 for the rest of this process
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(**batch).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    before = grads()
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=batch["input_ids"])
    after = grads()
    first_layer_a = next(n for n in before if "layers.0." in n and "lora_A" in n)
    assert before[first_layer_a].abs().sum() > 0
    for name in before:
        torch.testing.assert_close(after[name], before[name])


# Phi-4-mini's architecture (fused qkv_proj and gate_up_proj, 3/4 rotary, a 200k vocabulary) at a
# width and depth a CPU test can train
PHI4_SMALL = [
    "model=phi4_mini_random",
    "model.random_init.num_hidden_layers=2",
    "model.random_init.hidden_size=128",
    "model.random_init.intermediate_size=256",
    "model.random_init.num_attention_heads=4",
    "model.random_init.num_key_value_heads=2",
]


def test_phi4_mini_random_is_phi4_mini_sized():
    from omegaconf import OmegaConf
    from transformers import AutoConfig, AutoModelForCausalLM

    from medlora.config import option

    arch = OmegaConf.to_container(option("model", "phi4_mini_random").random_init)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**arch))
    assert type(model).__name__ == "Phi3ForCausalLM"
    # Phi-4-mini-instruct's 3,836,021,760 parameters, the tied embeddings counted once
    assert sum(p.numel() for p in model.parameters()) == 3_836_021_760


@pytest.mark.slow
def test_phi4_mini_architecture_trains_in_4bit_with_its_vocabulary(tmp_path):
    result = train(
        tmp_path,
        *PHI4_SMALL,
        "training.max_seq_len=256",
        "training.max_steps=2",
        "training.gradient_accumulation_steps=2",
        "data.max_train_samples=6",
        "data.max_eval_samples=2",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    client = mlflow_client(tmp_path)
    (run,) = client.search_runs([client.get_experiment_by_name("medlora").experiment_id])
    assert run.data.params["model.quantization"] == "4bit"
    assert run.data.metrics["train_shared_prefix_fraction"] > 0
    from conftest import ROOT
    from hydra import compose, initialize_config_dir

    from medlora.model import resolve_checkpoint

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=PHI4_SMALL)
    checkpoint, _ = resolve_checkpoint(cfg.model, cfg.paths.cache_dir, cfg.seed)  # the one the run built
    config = json.loads((Path(checkpoint) / "config.json").read_text())
    # the vocabulary of the model stood in for, not the tokenizer's 49,152, and bf16 as Phi-4-mini ships
    assert (config["vocab_size"], config["dtype"]) == (200064, "bfloat16")
