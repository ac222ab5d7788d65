"""The speed paths compute the same maths as the plain ones: packing, the chunked loss, fast dropout."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
from omegaconf import OmegaConf

from helpers import AUTO_ALLOCATOR, ROOT, TINY, compose, mlflow_client, train
from medlora import data as medata
from medlora.adapters import FastDropout, add_adapter, keep_mask, pack_bits, unpack_bits
from medlora.loss import loss_sum
from medlora.model import DTYPES, _PackedCausalAttention, _plain_causal, load_model, load_tokenizer, resolve_checkpoint
from medlora.prepare import data_key as _data_key


def _tiny(packed: bool, attn: str = "sdpa"):
    model_cfg = OmegaConf.load(ROOT / "conf" / "model" / "tiny_random.yaml")
    model_cfg.attn_implementation = attn
    path, _ = resolve_checkpoint(model_cfg, str(ROOT / ".cache"), seed=42)
    return load_model(path, model_cfg, "fp32", "cpu", packed=packed).eval()


def _examples(n: int = 5, seed: int = 0) -> list[medata.Example]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(12, 60)
        ids = [rng.randrange(100, 40000) for _ in range(length)]
        cut = rng.randint(4, length - 4)
        out.append(medata.Example(ids, [medata.IGNORE] * cut + ids[cut:]))
    return out


@pytest.mark.parametrize("attn, varlen", [("sdpa", True), ("sdpa", False), ("eager", False)])
def test_packed_logits_match_each_conversation_alone(attn, varlen):
    """No conversation of a packed row sees another: its logits are those it gets on its own.

    With sdpa_varlen attention runs per conversation; otherwise transformers builds a
    block-diagonal mask from the restarting position_ids.
    """
    model = _tiny(packed=varlen, attn=attn)
    assert model.config._attn_implementation == ("sdpa_varlen" if varlen else attn)
    examples = _examples()
    batch = medata.collate_packed(examples)
    assert "attention_mask" not in batch  # a 2-D mask would switch off the per-conversation masking
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
        start = 0
        for e in examples:
            alone = model(input_ids=torch.tensor([e.input_ids])).logits[0]
            torch.testing.assert_close(packed[start: start + len(e.input_ids)], alone, atol=2e-5, rtol=1e-4)
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
    alone = [torch.nn.functional.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], is_causal=True,
                                                              scale=0.3, enable_gqa=True).transpose(1, 2)
             for a, b in zip(bounds[:-1], bounds[1:])]
    expected = torch.cat(alone, dim=1)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad)

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = _PackedCausalAttention.apply(q, k, v, None, None, bounds, 0, 0.3)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    assert torch.equal(out, expected)
    assert all(torch.equal(g, e) for g, e in zip(grads, expected_grads))
    assert [t.untyped_storage().data_ptr() for t in saved][3] == out.untyped_storage().data_ptr()
    assert sum(t.untyped_storage().nbytes() for t in saved) == sum(t.untyped_storage().nbytes() for t in (q, k, v, out)) + 6 * 200 * 4


def test_only_plain_causal_attention_takes_the_packed_cpu_function():
    assert _plain_causal({"dropout": 0.0, "scaling": 0.125, "position_ids": torch.arange(4)})
    assert not _plain_causal({"dropout": 0.1})
    assert not _plain_causal({"softcap": 50.0})
    assert not _plain_causal({"position_bias": torch.zeros(1, 2, 4, 4)})  # a tensor: no truth test on it
    assert not _plain_causal({"s_aux": torch.zeros(2)})


def test_packed_labels_never_cross_a_conversation_boundary():
    examples = _examples(3)
    batch = medata.collate_packed(examples)
    starts = batch["cu_seq_lens_q"][:-1].tolist()
    assert all(batch["labels"][0, s] == medata.IGNORE for s in starts)
    assert batch["position_ids"][0, starts].tolist() == [0, 0, 0]
    assert batch["input_ids"].numel() == sum(len(e.input_ids) for e in examples) == medata.real_tokens(batch)


def _with_prefix(examples: list[medata.Example], prefix: list[int]) -> list[medata.Example]:
    """The examples behind one unlabelled prefix, as the safety system prompt stands before each conversation."""
    return [medata.Example(prefix + e.input_ids, [medata.IGNORE] * len(prefix) + e.labels) for e in examples]


def test_a_shared_prefix_is_laid_once_per_row():
    a = medata.Example([1, 2, 3, 4, 5, 6], [-100, -100, -100, -100, 5, 6])
    b = medata.Example([1, 2, 3, 7, 8], [-100, -100, -100, -100, 8])
    c = medata.Example([1, 2, 9, 9], [-100, -100, -100, 9])
    batch = medata.collate_packed([a, b], share_prefix=True)
    assert batch["shared_prefix"] == 3
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 3, 4]]
    assert batch["labels"].tolist() == [[-100, -100, -100, -100, 5, 6, -100, 8]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 6, 8]
    assert (medata.real_tokens(batch), medata.shared_tokens(batch), medata.supervised_tokens(batch)) == (11, 3, 3)
    # the prefix ends before the first label of every conversation, and one token before it, so
    # each later conversation keeps an unlabelled first token: c has a label at position 3
    assert medata.shared_prefix([a, b, c]) == 2
    assert medata.shared_prefix([a, medata.Example([1, 2, 3, 4, 5], [-100, 2, -100, -100, 5])]) == 0
    assert medata.shared_prefix([a, medata.Example([5, 2, 3, 4], [-100, -100, -100, 4])]) == 0
    # off, a single conversation, or nothing in common: the plain packed row, no shared_prefix key
    for examples, share in (([a, b], False), ([a], True), ([a, medata.Example([5, 5], [-100, 5])], True)):
        assert medata.collate_packed(examples, share_prefix=share).keys() == medata.collate_packed([a, b]).keys()
        assert "shared_prefix" not in medata.collate_packed(examples, share_prefix=share)
    assert medata.shared_tokens(medata.collate([a, b], pad_id=0)) == 0


@pytest.mark.parametrize("path", ["cpu-function", "sdpa"])
def test_a_shared_prefix_gives_each_conversation_its_logits_alone(path, monkeypatch):
    """Logits of a row with the prefix laid once, per conversation, against that conversation alone:
    through the CPU flash function, and through sdpa per conversation (GPUs, attention dropout)."""
    if path == "sdpa":
        monkeypatch.setattr("medlora.model._plain_causal", lambda kwargs: False)
    model = _tiny(packed=True)
    examples = _with_prefix(_examples(4, seed=5), [7, 3, 9, 11, 500, 12, 13, 14, 15])
    batch = medata.collate_packed(examples, share_prefix=True)
    assert batch["shared_prefix"] == 9
    with torch.no_grad():
        row = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
        bounds = batch["cu_seq_lens_q"].tolist()
        for i, e in enumerate(examples):
            alone = model(input_ids=torch.tensor([e.input_ids])).logits[0]
            mine = row[bounds[i]: bounds[i + 1]]
            if i:
                mine = torch.cat([row[:9], mine])  # the prefix's logits are the first conversation's
            torch.testing.assert_close(mine, alone, atol=2e-5, rtol=1e-4)


def test_a_shared_prefix_keeps_the_loss_and_gradients():
    """The fused LoRA path on a row with the prefix laid once, against the same conversations packed
    whole: the same loss and the same gradients (summed over the conversations that read the prefix)."""
    lora = OmegaConf.create({"rank": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear", "use_dora": False,
                             "use_rslora": False, "bias": "none"})
    model, _, _ = add_adapter(_tiny(packed=True), lora, False, fast_dropout=True, fused=True)
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    model.train()
    examples = _with_prefix(_examples(5, seed=1), list(range(200, 230)))
    results = []
    for share in (False, True):
        model.zero_grad()
        batch = medata.collate_packed(examples, share_prefix=share)
        total, count = loss_sum(model, batch, True)
        total.backward()
        results.append((total.item(), count, batch["input_ids"].numel(),
                        {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (whole, n_whole, width_whole, g_whole), (shared, n_shared, width_shared, g_shared) = results
    assert n_whole == n_shared and width_whole - width_shared == 4 * 30
    assert shared == pytest.approx(whole, rel=1e-6)
    for name in g_whole:
        # the prefix's gradient is summed over its readers in another order than the whole rows' is:
        # fp32 rounding, seen up to 1.5e-6 on elements near zero with this install's torch
        torch.testing.assert_close(g_shared[name], g_whole[name], atol=5e-6, rtol=1e-4)


def test_gradient_checkpointing_recomputes_a_shared_prefix_row_exactly():
    """training.gradient_checkpointing reruns each layer's forward, shared prefix and all, in the backward pass."""
    lora = OmegaConf.create({"rank": 4, "alpha": 8, "dropout": 0.1, "target_modules": "all-linear", "use_dora": False,
                             "use_rslora": False, "bias": "none"})
    batch = medata.collate_packed(_with_prefix(_examples(4, seed=2), list(range(300, 320))), share_prefix=True)
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model, _, _ = add_adapter(_tiny(packed=True), lora, checkpointing, fast_dropout=True, fused=True)
        assert model.get_base_model().is_gradient_checkpointing == checkpointing
        for p in model.parameters():
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.05)
        model.train()
        torch.manual_seed(1)  # the same dropout masks, which checkpointing draws again as they were
        total, _ = loss_sum(model, batch, True)
        total.backward()
        results.append((total.item(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (plain, g_plain), (checkpointed, g_checkpointed) = results
    assert checkpointed == plain
    for name in g_plain:
        torch.testing.assert_close(g_checkpointed[name], g_plain[name], atol=1e-6, rtol=1e-5)


def test_chunked_loss_and_gradients_equal_the_models_own(monkeypatch):
    from medlora import loss as lm_loss

    monkeypatch.setattr(lm_loss, "CHUNK_ELEMENTS", 49152 * 7)  # several chunks, the last one partial
    model = _tiny(packed=True)
    model, _, _ = add_adapter(model, OmegaConf.create({"rank": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear",
                                                      "use_dora": False, "use_rslora": False, "bias": "none"}), False)
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)  # lora_B starts at zero; give every adapter weight a gradient
    batch = medata.collate_packed(_examples(4))
    results = []
    for chunked in (False, True):
        model.zero_grad()
        total, count = loss_sum(model, batch, chunked)
        (total / count).backward()
        results.append((total.item(), count, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (plain, n_plain, g_plain), (fast, n_fast, g_fast) = results
    assert n_plain == n_fast == sum(int((torch.tensor(e.labels[1:]) != medata.IGNORE).sum()) for e in _examples(4))
    assert fast == pytest.approx(plain, rel=1e-5)
    for name in g_plain:
        torch.testing.assert_close(g_fast[name], g_plain[name], atol=1e-6, rtol=1e-4)


def test_log_softmax_in_place_equals_torch_s():
    """The chunked loss runs torch's CPU log-softmax kernel with its output over its input."""
    logits = torch.randn(37, 49152) * 4
    expected = torch.log_softmax(logits, dim=-1)
    torch.ops.aten._log_softmax.out(logits, -1, False, out=logits)
    assert torch.equal(logits, expected)


def _tiny_with_biases():
    """tiny_random with a bias on every projection, as Qwen2's attention has, in the packed setup."""
    from transformers import AutoConfig, AutoModelForCausalLM

    packed = _tiny(packed=True)
    config = AutoConfig.from_pretrained(packed.name_or_path, attention_bias=True, mlp_bias=True)
    config._attn_implementation = packed.config._attn_implementation
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


@pytest.mark.parametrize("dropout, bias, precision", [(0.0, "none", "fp32"), (0.1, "none", "fp32"), (0.1, "all", "fp32"),
                                                     (0.1, "none", "bf16")])
def test_fused_lora_layers_compute_peft_s_loss_and_gradients(dropout, bias, precision):
    """Same seed, so the fused layers and MLPs draw the same dropout masks as FastDropout in peft's layers."""
    lora = OmegaConf.create({"rank": 4, "alpha": 8, "dropout": dropout, "target_modules": "all-linear",
                             "use_dora": False, "use_rslora": False, "bias": bias})
    batch = medata.collate_packed(_examples(4))
    results = []
    for fused in (False, True):
        torch.manual_seed(0)
        base = _tiny_with_biases() if bias == "all" else _tiny(packed=True)
        # bf16 as train.py runs it: bf16 base weights, fp32 adapter weights, autocast
        model, _, _ = add_adapter(base.to(DTYPES[precision]), lora, False, fast_dropout=True,
                                  autocast=precision != "fp32", fused=fused)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05)  # lora_B starts at zero; give every adapter weight a gradient
        kinds = {type(m).__name__ for m in model.modules()}
        assert ("FusedLoraLinear" in kinds) == fused
        # fused: each SwiGLU MLP runs as one function too (an instance forward replaces the class's)
        mlps = [m for m in model.modules() if hasattr(m, "down_proj")]
        assert mlps and all(("forward" in vars(m)) == fused for m in mlps)
        model.train()
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            total, count = loss_sum(model, batch, True)
        (total / count).backward()
        results.append((total.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (plain, g_plain), (fused, g_fused) = results
    # lora.bias=all trains the base layers' biases too
    assert g_fused.keys() == g_plain.keys() and any(n.endswith("proj.base_layer.bias") for n in g_plain) == (bias == "all")
    # bf16: the same products, rounded at other points (peft rounds the dropped input, the fused layer its product)
    rtol, atol = (1e-5, 1e-6) if precision == "fp32" else (2e-2, 2e-3)
    assert fused == pytest.approx(plain, rel=rtol)
    for name in g_plain:
        assert g_fused[name].dtype == g_plain[name].dtype == torch.float32
        torch.testing.assert_close(g_fused[name], g_plain[name], atol=atol, rtol=rtol * 10)


def test_fused_layers_keep_no_copy_of_a_norm_s_output():
    """The norms keep their inputs; the fused layers that read their outputs keep those too, and remake the outputs."""
    lora = OmegaConf.create({"rank": 4, "alpha": 8, "dropout": 0.1, "target_modules": "all-linear",
                             "use_dora": False, "use_rslora": False, "bias": "none"})
    model, _, _ = add_adapter(_tiny(packed=True), lora, False, fast_dropout=True, fused=True)
    model.train()
    outputs = {}  # storage -> (what made it, the tensor, held so that its memory is not reused)

    def note(name: str, tensor: torch.Tensor) -> None:
        outputs[tensor.data_ptr()] = (name, tensor)

    for name, module in model.named_modules():
        if name.endswith("layernorm"):
            module.register_forward_hook(lambda m, a, out, name=name: note(name, out))
    kept = set()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.add(t.data_ptr()) or t, lambda t: t):
        total, count = loss_sum(model, medata.collate_packed(_examples(4)), True)
    layers = len(model.get_base_model().model.layers)
    assert len(outputs) == 2 * layers
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
    lora = OmegaConf.create({"rank": 4, "alpha": 8, "dropout": 0.1, "target_modules": "all-linear",
                             "use_dora": False, "use_rslora": False, "bias": "none"})
    model, _, _ = add_adapter(_tiny(packed=True), lora, False, fast_dropout=True, fused=True)
    model.train()
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        loss_sum(model, medata.collate_packed(_examples(4)), True)
    tokens = sum(len(e.input_ids) for e in _examples(4))
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

    model = _tiny(packed=True)
    for layer in model.model.layers[::2]:
        layer.mlp.__class__ = DroppingMLP
    lora = OmegaConf.create({"rank": 4, "alpha": 8, "dropout": 0.1, "target_modules": "all-linear",
                             "use_dora": False, "use_rslora": False, "bias": "none"})
    model, _, _ = add_adapter(model, lora, False, fast_dropout=True, fused=True)
    mlps = [layer.mlp for layer in model.get_base_model().model.layers]
    assert [("forward" in vars(m)) for m in mlps] == [not isinstance(m, DroppingMLP) for m in mlps]
    assert any(isinstance(m, DroppingMLP) for m in mlps) and not all(isinstance(m, DroppingMLP) for m in mlps)


def test_pack_respects_the_budget_and_uses_every_example_once():
    lengths = [random.Random(i).randint(1, 512) for i in range(300)]
    bins = medata.pack(lengths, 2048)
    assert sorted(i for b in bins for i in b) == list(range(300))
    assert all(sum(lengths[i] for i in b) <= 2048 for b in bins)
    # best-fit decreasing leaves little room: at most one bin more than a perfect split
    assert len(bins) <= -(-sum(lengths) // 2048) + 1
    sampler = medata.PackedBatches(lengths, 2048, seed=1)
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


def test_fast_and_plain_paths_train_to_the_same_losses(tmp_path):
    """The real entry point with every speed option on, then off: same data, seed and maths."""
    # rows of 512 tokens: two of the sample conversations each (about 220 tokens with the system prompt)
    common = [*TINY, "debug=fast", "lora.dropout=0.0", "precision=fp32", "training.gradient_accumulation_steps=2",
              "training.batch_size=1", "training.max_seq_len=512"]
    runs, allocators = {}, {}
    for name, options in (("fast", ["training.packing=true", "training.chunked_loss=true"]),
                          ("plain", ["training.packing=false", "training.chunked_loss=false", "training.fused_lora=false",
                                     "training.allocator=system"])):
        done = train(tmp_path / name, *common, *options)
        assert done.returncode == 0, done.stderr[-3000:]
        client = mlflow_client(tmp_path / name)
        run = client.search_runs(client.search_experiments()[0].experiment_id)[0]
        runs[name] = run.data.metrics
        allocators[name] = run.data.params["resolved_allocator"]
    # train.py restarted itself under the allocator it was given, or stayed on the system's
    assert allocators == {"fast": AUTO_ALLOCATOR, "plain": "system"}
    # eval before training is the same computation, batched differently: equal to float rounding
    assert runs["fast"]["eval_loss_before"] == pytest.approx(runs["plain"]["eval_loss_before"], rel=1e-5)
    assert runs["fast"]["train_tokens_per_second"] > 0
    # the sample data's conversations all begin with the safety system prompt: packed rows lay it once
    assert runs["fast"]["train_shared_prefix_fraction"] > 0 == runs["plain"]["train_shared_prefix_fraction"]


def test_prepared_data_is_reused_until_an_input_changes(tmp_path):
    cache = tmp_path / "cache"
    # the data cache starts empty; the models are shared (dequantizing the tokenizer's GGUF again takes a minute)
    (ROOT / ".cache" / "models").mkdir(parents=True, exist_ok=True)
    cache.mkdir()
    (cache / "models").symlink_to(ROOT / ".cache" / "models")
    overrides = [f"paths.cache_dir={cache}", *TINY, "debug=fast", "tracking=none"]
    first = train(tmp_path / "a", *overrides)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "reused from" not in first.stdout + first.stderr and len(list((cache / "data").glob("*.pkl"))) == 1
    second = train(tmp_path / "b", *overrides, "lora.rank=4")  # LoRA settings do not shape the data
    assert second.returncode == 0 and "cleaned and tokenized data reused from" in second.stdout + second.stderr

    # what does shape it changes the key, so the next run prepares the data again
    def key(*changes: str) -> str:
        cfg = compose("train", [*overrides, *changes])
        return _data_key(cfg, tokenizer)

    tokenizer = load_tokenizer(resolve_checkpoint(compose("train", TINY).model, str(cache), 42)[1])
    same = key()
    assert key("lora.rank=4", "training.learning_rate=1e-3", "seed=7") == same
    changed = [key("training.max_seq_len=128"), key("training.overlong=drop"), key("safety.phi_redaction.enabled=false"),
               key("data.max_train_samples=3"), key("safety.system_prompt=Be brief.")]
    assert same not in changed and len(set(changed)) == len(changed)


def test_loss_of_a_packed_batch_is_the_sum_over_its_conversations():
    model = _tiny(packed=True)
    examples = _examples(4, seed=3)
    with torch.no_grad():
        packed, n_packed = loss_sum(model, medata.collate_packed(examples), chunked=True)
        alone = [loss_sum(model, medata.collate([e], pad_id=0), chunked=False) for e in examples]
    assert n_packed == sum(n for _, n in alone)
    assert packed.item() == pytest.approx(sum(s.item() for s, _ in alone), rel=1e-5)
