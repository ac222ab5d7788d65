"""The speed path (medlora.fast) computes the same maths as the plain one: packed attention, the
chunked loss, fused LoRA layers, fast dropout; and fast.apply reports what ran."""

from __future__ import annotations

import itertools
import random
from collections import Counter

import pytest
import torch
from omegaconf import OmegaConf

from medlora import batching, fast
from medlora import data as medata
from medlora.adapters import add_adapter
from medlora.fast import compat
from medlora.fast.attention import _PackedCausalAttention, _plain_causal
from medlora.fast.lora import FastDropout, keep_mask, pack_bits, unpack_bits
from medlora.loss import loss_sum
from medlora.model import DTYPES, load_tokenizer, resolve_checkpoint
from medlora.prepare import data_key as _data_key

from helpers import AUTO_ALLOCATOR, ROOT, TINY, compose, mlflow_client, train
from helpers.speed import LORA, adapted, random_examples, tiny, training


@pytest.mark.parametrize("attn, varlen", [("sdpa", True), ("sdpa", False), ("eager", False)])
def test_packed_logits_match_each_conversation_alone(attn, varlen):
    """No conversation of a packed row sees another: its logits are those it gets on its own.

    With sdpa_varlen attention runs per conversation; otherwise transformers builds a
    block-diagonal mask from the restarting position_ids.
    """
    model = tiny(packed=varlen, attn=attn)
    assert compat.attn_implementation(model) == ("sdpa_varlen" if varlen else attn)
    examples = random_examples()
    batch = batching.collate_packed(examples)
    assert "attention_mask" not in batch  # a 2-D mask would switch off the per-conversation masking
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
        start = 0
        for e in examples:
            alone = model(input_ids=torch.tensor([e.input_ids])).logits[0]
            torch.testing.assert_close(packed[start : start + len(e.input_ids)], alone, atol=2e-5, rtol=1e-4)
            start += len(e.input_ids)


def test_packed_attention_is_sdpa_per_conversation_with_its_output_kept_once():
    """Bit for bit what sdpa gives each conversation alone, outputs and gradients, with grouped
    query heads and a one-token conversation; the output it saves is the tensor it returns."""
    torch.manual_seed(0)
    bounds = [0, 1, 40, 41, 120, 200]
    # the layouts a decoder layer passes: heads split out of a (1, length, heads * dim) projection
    q = torch.randn(1, 200, 6, 16).transpose(1, 2).requires_grad_()
    k, v = (torch.randn(1, 200, 2, 16).transpose(1, 2).requires_grad_() for _ in range(2))
    grad = torch.randn(1, 200, 6, 16)
    alone = [
        torch.nn.functional.scaled_dot_product_attention(
            q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], is_causal=True, scale=0.3, enable_gqa=True
        ).transpose(1, 2)
        for a, b in itertools.pairwise(bounds)
    ]
    expected = torch.cat(alone, dim=1)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad)

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = _PackedCausalAttention.apply(q, k, v, None, None, bounds, 0, 0.3)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    assert torch.equal(out, expected)
    assert all(torch.equal(g, e) for g, e in zip(grads, expected_grads))
    assert [t.untyped_storage().data_ptr() for t in saved][3] == out.untyped_storage().data_ptr()
    assert (
        sum(t.untyped_storage().nbytes() for t in saved)
        == sum(t.untyped_storage().nbytes() for t in (q, k, v, out)) + 6 * 200 * 4
    )


def test_only_plain_causal_attention_takes_the_packed_cpu_function():
    assert _plain_causal({"dropout": 0.0, "scaling": 0.125, "position_ids": torch.arange(4)})
    assert not _plain_causal({"dropout": 0.1})
    assert not _plain_causal({"softcap": 50.0})
    assert not _plain_causal({"position_bias": torch.zeros(1, 2, 4, 4)})  # a tensor: no truth test on it
    assert not _plain_causal({"s_aux": torch.zeros(2)})


def test_packed_labels_never_cross_a_conversation_boundary():
    examples = random_examples(3)
    batch = batching.collate_packed(examples)
    starts = batch["cu_seq_lens_q"][:-1].tolist()
    assert all(batch["labels"][0, s] == medata.IGNORE for s in starts)
    assert batch["position_ids"][0, starts].tolist() == [0, 0, 0]
    assert batch["input_ids"].numel() == sum(len(e.input_ids) for e in examples) == batching.real_tokens(batch)


def test_chunked_loss_and_gradients_equal_the_models_own(monkeypatch):
    monkeypatch.setattr("medlora.fast.loss.CHUNK_ELEMENTS", 49152 * 7)  # several chunks, the last one partial
    model, _ = adapted(tiny(packed=True), fused_lora=False, fast_dropout=False)
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)  # lora_B starts at zero; give every adapter weight a gradient
    batch = batching.collate_packed(random_examples(4))
    results = []
    for chunked in (False, True):
        model.zero_grad()
        total, count = loss_sum(model, batch, chunked)
        (total / count).backward()
        results.append(
            (total.item(), count, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        )
    (plain, n_plain, g_plain), (fast_loss, n_fast, g_fast) = results
    assert (
        n_plain == n_fast == sum(int((torch.tensor(e.labels[1:]) != medata.IGNORE).sum()) for e in random_examples(4))
    )
    assert fast_loss == pytest.approx(plain, rel=1e-5)
    for name in g_plain:
        torch.testing.assert_close(g_fast[name], g_plain[name], atol=1e-6, rtol=1e-4)


def _tiny_with_biases():
    """tiny_random with a bias on every projection, as Qwen2's attention has, in the packed setup."""
    from transformers import AutoConfig, AutoModelForCausalLM

    packed = tiny(packed=True)
    config = AutoConfig.from_pretrained(packed.name_or_path, attention_bias=True, mlp_bias=True)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(
        config, dtype=torch.float32, attn_implementation=compat.attn_implementation(packed)
    )


def _lora_step(fused: bool, dropout: float, bias: str, precision: str, weights: str) -> tuple[float, dict]:
    """(loss, adapter gradients) of one packed micro-batch; `weights` is the base weights' dtype
    and `precision` the autocast one. Same seeds, so every run draws the same LoRA weights and the
    same dropout masks (the fused layers and MLPs draw them as FastDropout does in peft's layers)."""
    base = _tiny_with_biases() if bias == "all" else tiny(packed=True)
    torch.manual_seed(0)  # after loading: the first load of a fresh cache draws the random checkpoint
    # bf16 as train.py runs it: bf16 base weights, fp32 adapter weights, autocast
    model, applied = adapted(
        base.to(DTYPES[weights]).float() if precision == "fp32" else base.to(DTYPES[weights]),
        dropout=dropout,
        bias=bias,
        precision=precision,
        fused_lora=fused,
        fast_dropout=True,
    )
    assert applied.fused_lora == fused and applied.fast_dropout == (7 * 2 if dropout else 0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)  # lora_B starts at zero; give every adapter weight a gradient
    kinds = {type(m).__name__ for m in model.modules()}
    assert ("FusedLoraLinear" in kinds) == fused
    # fused: each SwiGLU MLP runs as one function too (an instance forward replaces the class's)
    mlps = [m for m in model.modules() if hasattr(m, "down_proj")]
    assert mlps and all(("forward" in vars(m)) == fused for m in mlps) and applied.fused_swiglu == fused * len(mlps)
    model.train()
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        total, count = loss_sum(model, batching.collate_packed(random_examples(4)), True)
    (total / count).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert all(g.dtype == torch.float32 for g in grads.values())
    return total.item(), grads


@pytest.mark.parametrize("dropout, bias", [(0.0, "none"), (0.1, "none"), (0.1, "all")])
def test_fused_lora_layers_compute_peft_s_loss_and_gradients(dropout, bias):
    """fp32: the same products summed in other orders, so equal to fp32 rounding."""
    plain, g_plain = _lora_step(False, dropout, bias, "fp32", "fp32")
    fused, g_fused = _lora_step(True, dropout, bias, "fp32", "fp32")
    # lora.bias=all trains the base layers' biases too
    assert g_fused.keys() == g_plain.keys() and any(n.endswith("proj.base_layer.bias") for n in g_plain) == (
        bias == "all"
    )
    assert fused == pytest.approx(plain, rel=1e-5)
    for name in g_plain:
        torch.testing.assert_close(g_fused[name], g_plain[name], atol=1e-6, rtol=1e-4)


# bf16 keeps 8 significant bits: each rounding to bf16 is off by up to U relative
BF16_U = 2.0**-8


def test_fused_lora_layers_in_bf16_are_as_close_to_fp32_as_peft_s():
    """bf16 under autocast, against the fp32 maths on the same (bf16-rounded) base weights.

    Both paths round the same products to bf16, at other points (peft rounds the dropped input,
    the fused layer its product), so neither equals the other; each must stay within the error
    of bf16 arithmetic. An adapter gradient of the tiny model passes some tens of roundings of up
    to U each (activations, their gradients, matmul outputs); independent errors add in
    quadrature, so a whole tensor's relative error (Frobenius norm) is a few U: up to about 5 U
    for peft's own bf16 path on this batch. So: every gradient within 8 U of the fp32 maths, and
    the fused path no further from it than peft's own bf16 path plus 1 U; a gradient 3% off in
    scale is about 9 U off and fails (an 11% one, about 29 U). The loss sums per-token terms whose
    rounding errors average out: within U / 4 of the fp32 loss (a single rounding of it: U / 2).
    """
    reference, g_reference = _lora_step(False, 0.1, "none", "fp32", "bf16")
    errors = {}
    for fused in (False, True):
        loss, grads = _lora_step(fused, 0.1, "none", "bf16", "bf16")
        assert abs(loss - reference) <= BF16_U / 4 * abs(reference), fused
        errors[fused] = {n: float((grads[n] - g_reference[n]).norm() / g_reference[n].norm()) for n in g_reference}
        assert max(errors[fused].values()) <= 8 * BF16_U, (fused, max(errors[fused].items(), key=lambda e: e[1]))
    assert all(errors[True][n] <= errors[False][n] + BF16_U for n in g_reference)


def test_fused_layers_keep_no_copy_of_a_norm_s_output():
    """The norms keep their inputs; the fused layers that read their outputs keep those too, and remake the outputs."""
    model, applied = adapted(tiny(packed=True), dropout=0.1, fused_lora=True, fast_dropout=True)
    model.train()
    outputs = {}  # storage -> (what made it, the tensor, held so that its memory is not reused)

    def note(name: str, tensor: torch.Tensor) -> None:
        outputs[tensor.data_ptr()] = (name, tensor)

    for name, module in model.named_modules():
        if name.endswith("layernorm"):
            module.register_forward_hook(lambda m, a, out, name=name: note(name, out))
    kept = set()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.add(t.data_ptr()) or t, lambda t: t):
        total, count = loss_sum(model, batching.collate_packed(random_examples(4)), True)
    layers = len(model.get_base_model().model.layers)
    assert len(outputs) == 2 * layers and applied.norm_outputs_marked == 2 * layers + 1  # and the final norm
    assert sorted(outputs[p][0] for p in kept & outputs.keys()) == []
    # the remade outputs give the gradients (compared with peft's in the test above)
    (total / count).backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_A" in n)


@pytest.mark.parametrize("shape", [(8,), (3, 5), (7, 576), (1, 1)])
def test_dropout_masks_are_kept_as_bits(shape):
    torch.manual_seed(0)
    mask = keep_mask(torch.empty(shape), 0.3, fast=True)
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-mask.numel() // 8)
    assert torch.equal(unpack_bits(packed, mask.shape), mask.to(torch.uint8))


def test_fused_layers_keep_no_byte_per_element_mask():
    model, _ = adapted(tiny(packed=True), dropout=0.1, fused_lora=True, fast_dropout=True)
    model.train()
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        loss_sum(model, batching.collate_packed(random_examples(4)), True)
    tokens = sum(len(e.input_ids) for e in random_examples(4))
    layers = len(model.get_base_model().model.layers)
    # (the model keeps a small bool tensor of its own, one element per token)
    assert not [t for t in kept if t.dtype == torch.bool and t.numel() > tokens]
    # one bit per input element of each adapted layer: the tiny model's layers read 64 features, down_proj 128
    masks = Counter(t.numel() for t in kept if t.dtype == torch.uint8)
    assert masks == {tokens * 64 // 8: 6 * layers, tokens * 128 // 8: layers}


def test_an_mlp_that_does_more_than_swiglu_keeps_its_own_path():
    """Starcoder2 and Seed-OSS drop out after down_proj: fusing their MLP would lose that step."""
    from transformers.models.llama.modeling_llama import LlamaMLP

    class DroppingMLP(LlamaMLP):
        def forward(self, x):
            down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
            down_proj = torch.nn.functional.dropout(down_proj, p=0.5, training=self.training)
            return down_proj

    model = tiny(packed=True)
    for layer in model.model.layers[::2]:
        layer.mlp.__class__ = DroppingMLP
    model, applied = adapted(model, dropout=0.1, fused_lora=True, fast_dropout=True)
    mlps = [layer.mlp for layer in model.get_base_model().model.layers]
    assert [("forward" in vars(m)) for m in mlps] == [not isinstance(m, DroppingMLP) for m in mlps]
    assert any(isinstance(m, DroppingMLP) for m in mlps) and not all(isinstance(m, DroppingMLP) for m in mlps)
    assert applied.fused_swiglu == sum(not isinstance(m, DroppingMLP) for m in mlps)


def test_apply_reports_what_ran_and_why_not():
    """Each fallback is a field of Applied, and every field an MLflow param."""
    model, applied = adapted(tiny(packed=True), dropout=0.1, precision="bf16")
    layers = 7 * 2  # q, k, v, o, gate, up and down in each of the two layers
    assert applied == fast.Applied(
        attention="sdpa_varlen",
        attention_reason="packed rows: sdpa runs once per conversation",
        fused_lora=True,
        fused_lora_reason=None,
        fused_swiglu=2,
        norm_outputs_marked=5,
        fast_dropout=layers,
        input_casts_skipped=layers,
        chunked_loss=True,
        chunked_loss_reason=None,
        shared_prefix="step",
        shared_prefix_reason=None,
        allocator=applied.allocator,
    )
    params = applied.params()
    assert {
        "resolved_attention",
        "resolved_chunked_loss",
        "resolved_shared_prefix",
        "resolved_allocator",
    } <= params.keys()
    assert len(params) == len(vars(applied)) and params["resolved_fused_lora_reason"] == "none"

    # eager attention runs over whole rows: no shared prefix; fp32 keeps peft's input cast
    _, eager = adapted(tiny(packed=True, attn="eager"), shared_prefix_scope="row")
    assert (eager.attention, eager.attention_reason, eager.shared_prefix) == ("eager", None, "off")
    assert "runs over whole rows" in eager.shared_prefix_reason and eager.input_casts_skipped == 0
    _, unpacked = adapted(tiny(packed=False), packing=False)
    assert (unpacked.attention, unpacked.shared_prefix) == (
        "sdpa",
        "off",
    ) and "packing" in unpacked.shared_prefix_reason
    # DoRA has its own maths: peft's layers
    dora, _, _ = add_adapter(tiny(packed=True), OmegaConf.create({**LORA, "dropout": 0.0, "use_dora": True}), False)
    applied = fast.apply(dora, training(), precision="fp32")
    assert not applied.fused_lora and applied.fused_lora_reason.startswith("DoRA") and applied.fused_swiglu == 0
    assert "FusedLoraLinear" not in {type(m).__name__ for m in dora.modules()}
    # a softcapped head (Gemma-2) needs the full logits; nothing asked, nothing reported
    model = tiny(packed=True)
    model.config.final_logit_softcapping = 30.0
    _, softcapped = adapted(model)
    assert not softcapped.chunked_loss and "final_logit_softcapping" in softcapped.chunked_loss_reason
    _, off = adapted(tiny(packed=True), chunked_loss=False, fused_lora=False, fast_dropout=False, shared_prefix=False)
    assert (off.chunked_loss, off.chunked_loss_reason, off.fused_lora, off.fused_lora_reason) == (
        False,
        None,
        False,
        None,
    )
    assert (off.fast_dropout, off.shared_prefix, off.shared_prefix_reason) == (0, "off", None)


def test_pack_respects_the_budget_and_uses_every_example_once():
    lengths = [random.Random(i).randint(1, 512) for i in range(300)]
    bins = batching.pack(lengths, 2048)
    assert sorted(i for b in bins for i in b) == list(range(300))
    assert all(sum(lengths[i] for i in b) <= 2048 for b in bins)
    # best-fit decreasing leaves little room: at most one bin more than a perfect split
    assert len(bins) <= -(-sum(lengths) // 2048) + 1
    sampler = batching.PackedBatches(lengths, 2048, seed=1)
    first, second = list(sampler), list(sampler)
    assert first != second and sorted(map(sorted, first)) == sorted(map(sorted, second))


def test_fast_dropout_keeps_the_distribution():
    torch.manual_seed(0)
    drop = FastDropout(0.1).train()
    x = torch.ones(1000, 1000)
    y = drop(x)
    kept = (y != 0).float().mean().item()
    assert kept == pytest.approx(0.9, abs=0.002)
    assert torch.unique(y).tolist() == pytest.approx([0.0, 1 / 0.9])
    assert y.mean().item() == pytest.approx(1.0, abs=0.003)
    assert torch.equal(drop.eval()(x), x)


@pytest.mark.slow
def test_fast_and_plain_paths_train_to_the_same_losses(tmp_path):
    """The real entry point with every speed option on, then off, on the same packed batches, seed and maths:
    the same train loss at every step and the same eval loss before and after."""
    # rows of 512 tokens: two of the sample conversations each (about 220 tokens with the system prompt); a
    # learning rate that moves the weights, so each step's loss depends on the gradients of the steps before
    common = [
        *TINY,
        "debug=fast",
        "lora.dropout=0.0",
        "precision=fp32",
        "training.gradient_accumulation_steps=2",
        "training.batch_size=1",
        "training.max_seq_len=512",
        "training.max_steps=4",
        "training.learning_rate=1e-2",
        "training.warmup_ratio=0",
    ]
    # the plain path as bench/train_throughput.py's medlora-plain runs it: eager attention over a
    # block-diagonal mask, the model's own loss, peft's LoRA layers and dropout, no shared prefix
    plain = [
        "model.attn_implementation=eager",
        "training.chunked_loss=false",
        "training.fused_lora=false",
        "training.fast_dropout=false",
        "training.shared_prefix=false",
        "training.allocator=system",
    ]
    runs, params, losses = {}, {}, {}
    for name, options in (("fast", []), ("plain", plain)):
        done = train(tmp_path / name, *common, *options)
        assert done.returncode == 0, done.stderr[-3000:]
        client = mlflow_client(tmp_path / name)
        run = client.search_runs(client.search_experiments()[0].experiment_id)[0]
        runs[name], params[name] = run.data.metrics, run.data.params
        losses[name] = [
            (m.step, m.value)
            for m in sorted(client.get_metric_history(run.info.run_id, "train_loss"), key=lambda m: m.step)
        ]
    # train.py restarted itself under the allocator it was given, or stayed on the system's
    assert (params["fast"]["resolved_allocator"], params["plain"]["resolved_allocator"]) == (AUTO_ALLOCATOR, "system")
    assert {
        k: params["fast"][f"resolved_{k}"] for k in ("attention", "fused_lora", "chunked_loss", "shared_prefix")
    } == {"attention": "sdpa_varlen", "fused_lora": "True", "chunked_loss": "True", "shared_prefix": "step"}
    assert {
        k: params["plain"][f"resolved_{k}"] for k in ("attention", "fused_lora", "chunked_loss", "shared_prefix")
    } == {"attention": "eager", "fused_lora": "False", "chunked_loss": "False", "shared_prefix": "off"}
    # the same sums in other orders (flash kernels against eager softmax, chunked against whole
    # logits, fused against peft's layers): fp32 rounding (epsilon 1.2e-7) carried through four
    # AdamW steps, a few epsilons at most
    assert [step for step, _ in losses["fast"]] == [step for step, _ in losses["plain"]] == [1, 2, 3, 4]
    assert [v for _, v in losses["fast"]] == pytest.approx([v for _, v in losses["plain"]], rel=1e-6)
    for key in ("eval_loss_before", "eval_loss"):
        assert runs["fast"][key] == pytest.approx(runs["plain"][key], rel=1e-6)
    assert runs["fast"]["eval_loss"] < runs["fast"]["eval_loss_before"]  # the steps did train
    assert runs["fast"]["train_tokens_per_second"] > 0
    # the sample data's conversations all begin with the safety system prompt: the fast path computes it once
    assert runs["fast"]["train_shared_prefix_fraction"] > 0 == runs["plain"]["train_shared_prefix_fraction"]


@pytest.mark.slow
def test_prepared_data_is_reused_until_an_input_changes(tmp_path):
    cache = tmp_path / "cache"
    # the data cache starts empty; the models are shared (dequantizing the tokenizer's GGUF again takes a minute)
    (ROOT / ".cache" / "models").mkdir(parents=True, exist_ok=True)
    cache.mkdir()
    (cache / "models").symlink_to(ROOT / ".cache" / "models")
    overrides = [f"paths.cache_dir={cache}", *TINY, "debug=fast", "tracking=none"]
    first = train(tmp_path / "a", *overrides)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "reused from" not in first.stdout + first.stderr and len(list((cache / "data").glob("*.safetensors"))) == 1
    second = train(tmp_path / "b", *overrides, "lora.rank=4")  # LoRA settings do not shape the data
    assert second.returncode == 0 and "cleaned and tokenized data reused from" in second.stdout + second.stderr

    # what does shape it changes the key, so the next run prepares the data again
    def key(*changes: str) -> str:
        cfg = compose("train", [*overrides, *changes])
        return _data_key(cfg, tokenizer, *medata.load_splits(cfg.data, cfg.seed))

    tokenizer = load_tokenizer(resolve_checkpoint(compose("train", TINY).model, str(cache), 42)[1])
    same = key()
    assert key("lora.rank=4", "training.learning_rate=1e-3", "seed=7") == same
    changed = [
        key("training.max_seq_len=128"),
        key("training.overlong=drop"),
        key("safety.phi_redaction.enabled=false"),
        key("data.max_train_samples=3"),
        key("safety.system_prompt=Be brief."),
    ]
    assert same not in changed and len(set(changed)) == len(changed)


def test_loss_of_a_packed_batch_is_the_sum_over_its_conversations():
    model = tiny(packed=True)
    examples = random_examples(4, seed=3)
    with torch.no_grad():
        packed, n_packed = loss_sum(model, batching.collate_packed(examples), chunked=True)
        alone = [loss_sum(model, batching.collate([e], pad_id=0), chunked=False) for e in examples]
    assert n_packed == sum(n for _, n in alone)
    assert packed.item() == pytest.approx(sum(s.item() for s, _ in alone), rel=1e-5)
