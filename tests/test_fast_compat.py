"""medlora.fast.compat: each private library name it wraps still exists and behaves as the speed path assumes.

Pinned to the versions the shims were read against: an upgrade fails test_the_libraries_are_the_checked_versions
first, and the test of each shim then names what changed.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F

from medlora.fast import compat


def _tiny_llama(attn: str = "sdpa"):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn)


def test_the_libraries_are_the_checked_versions():
    """After an upgrade: check every shim of medlora/fast/compat.py against the new source, then bump CHECKED_AGAINST."""
    assert compat.installed_versions() == compat.CHECKED_AGAINST


@pytest.mark.parametrize("causal", [True, False])
def test_the_cpu_flash_kernel_is_sdpa_with_its_log_sum_exp(causal):
    torch.manual_seed(0)
    q = torch.randn(1, 4, 9, 16, requires_grad=True)
    k, v = (torch.randn(1, 4, 13 if not causal else 9, 16, requires_grad=True) for _ in range(2))
    out, lse = compat.flash_attention_cpu(q, k, v, causal, 0.25)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=0.25)
    scores = (q @ k.transpose(-1, -2)) * 0.25
    if causal:
        scores = scores.masked_fill(torch.ones(9, 9, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(lse, scores.logsumexp(-1))

    grad = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad)
    grads = compat.flash_attention_cpu_backward(grad, q, k, v, out, lse.contiguous(), causal, 0.25)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)


def test_log_softmax_in_place_equals_torch_s():
    """The chunked loss runs torch's CPU log-softmax kernel with its output over its input."""
    logits = torch.randn(37, 49152) * 4
    expected = torch.log_softmax(logits, dim=-1)
    assert compat.log_softmax_rows_(logits) is logits
    assert torch.equal(logits, expected)


def test_silu_backward_is_autograd_s():
    x = torch.randn(50, requires_grad=True)
    grad = torch.randn(50)
    (expected,) = torch.autograd.grad(F.silu(x), x, grad)
    assert torch.equal(compat.silu_backward(grad, x.detach()), expected)


def test_the_mkldnn_bf16_probe_answers():
    assert isinstance(compat.mkldnn_bf16_supported(), bool)


def test_sdpa_attention_forward_is_plain_sdpa_with_grouped_heads():
    attention = _tiny_llama().model.layers[0].self_attn
    q, k, v = torch.randn(1, 4, 7, 8), torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 8)
    out, weights = compat.sdpa_attention_forward(attention, q, k, v, None, is_causal=True, scaling=0.5)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.5, enable_gqa=True)
    assert weights is None
    torch.testing.assert_close(out, expected.transpose(1, 2))  # (batch, length, heads, dim), as o_proj reads it


def test_a_registered_attention_is_what_the_model_runs():
    calls = []

    def counted(module, query, key, value, attention_mask, **kwargs):
        calls.append(module.layer_idx)
        return compat.sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    compat.register_attention("medlora_test_attention", counted)
    model = _tiny_llama("medlora_test_attention")
    assert compat.attn_implementation(model) == "medlora_test_attention"
    ids = torch.randint(0, 128, (2, 5))
    with torch.no_grad():
        # with sdpa's mask, a padded batch gives what sdpa gives
        mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
        ours = model(input_ids=ids, attention_mask=mask).logits
        model.set_attn_implementation("sdpa")
        theirs = model(input_ids=ids, attention_mask=mask).logits
    assert calls == [0]
    torch.testing.assert_close(ours, theirs)


def test_a_model_that_forgets_its_quantization_saves_as_plain_weights(tmp_path):
    """What a dequantized GGUF model carries: transformers refuses to save it until the markers go."""
    import json
    from types import SimpleNamespace

    model = _tiny_llama()
    model.config.quantization_config = {"quant_method": "gguf"}
    model.hf_quantizer = SimpleNamespace(quantization_config=SimpleNamespace(quant_method="gguf"))
    with pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(tmp_path / "refused")
    compat.forget_quantization(model)
    model.save_pretrained(tmp_path / "plain")
    assert "quantization_config" not in json.loads((tmp_path / "plain" / "config.json").read_text())


def _lora(**config):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(_tiny_llama(), LoraConfig(r=2, target_modules="all-linear", **config))


def test_peft_builds_the_lora_linear_the_fused_layer_subclasses():
    """medlora.fast.lora.fuse_lora_layers turns these layers into FusedLoraLinear by class, which is what peft
    would build with it registered as a custom module: the subclass adds no state and no __init__."""
    from peft.tuners.lora import Linear

    from medlora.fast.lora import FusedLoraLinear

    layers = [m for m in _lora().modules() if isinstance(m, Linear)]
    assert layers and all(type(m) is Linear for m in layers)
    assert not {"__init__", "__slots__"} & vars(FusedLoraLinear).keys()
    for layer in layers:
        assert all(hasattr(layer, name) for name in compat.LORA_LAYER_FIELDS)
        assert compat.lora_variants(layer) == {}
    dora = [m for m in _lora(use_dora=True).modules() if isinstance(m, Linear)]
    assert all(set(compat.lora_variants(m)) == {"default"} for m in dora)


def test_a_lora_layer_told_to_skip_its_input_cast_keeps_the_input_dtype():
    layer = next(m for m in _lora().modules() if hasattr(m, "lora_A"))
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    assert layer._cast_input_dtype(x, torch.float32).dtype == torch.float32
    compat.skip_input_cast(layer)
    assert layer._cast_input_dtype(x, torch.float32) is x


def test_resetting_accelerate_lets_the_next_accelerator_take_its_own_precision():
    from accelerate import Accelerator

    compat.reset_accelerator_state()
    assert Accelerator(cpu=True, mixed_precision="bf16").mixed_precision == "bf16"
    compat.reset_accelerator_state()
    assert Accelerator(cpu=True, mixed_precision="no").mixed_precision == "no"
    compat.reset_accelerator_state()  # leave no state to the tests after this one


def test_bitsandbytes_repacks_4bit_weights_only_where_the_flag_allows():
    """tests/test_quantized.py checks the effect: gradients through 4-bit layers survive an eval pass."""
    bnb = pytest.importorskip("bitsandbytes")

    assert "self.support_avx512bf16_for_cpu" in inspect.getsource(bnb.nn.Linear4bit.forward)
    model = torch.nn.Sequential(bnb.nn.Linear4bit(16, 16), torch.nn.Linear(16, 16))
    assert compat.keep_4bit_layout_trainable(model) == 1 and model[0].support_avx512bf16_for_cpu is False
