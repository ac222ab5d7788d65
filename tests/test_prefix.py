"""The shared prefix: laid once per packed row (medlora.batching.collate_packed, read by sdpa_varlen) or run
once per optimizer step (medlora.fast.prefix), with the same logits, loss and gradients as unshared."""

from __future__ import annotations

import pytest
import torch

from medlora import batching
from medlora import data as medata
from medlora.fast.prefix import common_prefix, run_prefix
from medlora.loss import loss_sum

from helpers.speed import adapted, random_examples, tiny


def _with_prefix(examples: list[medata.Example], prefix: list[int]) -> list[medata.Example]:
    """The examples behind one unlabelled prefix, as the safety system prompt stands before each conversation."""
    return [medata.Example(prefix + e.input_ids, [medata.IGNORE] * len(prefix) + e.labels) for e in examples]


def test_a_shared_prefix_is_laid_once_per_row():
    a = medata.Example([1, 2, 3, 4, 5, 6], [-100, -100, -100, -100, 5, 6])
    b = medata.Example([1, 2, 3, 7, 8], [-100, -100, -100, -100, 8])
    c = medata.Example([1, 2, 9, 9], [-100, -100, -100, 9])
    batch = batching.collate_packed([a, b], share_prefix=True)
    assert batch["shared_prefix"] == 3
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 3, 4]]
    assert batch["labels"].tolist() == [[-100, -100, -100, -100, 5, 6, -100, 8]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 6, 8]
    assert (batching.real_tokens(batch), batching.shared_tokens(batch), batching.supervised_tokens(batch)) == (11, 3, 3)
    # the prefix ends before the first label of every conversation, and one token before it, so
    # each later conversation keeps an unlabelled first token: c has a label at position 3
    assert batching.shared_prefix([a, b, c]) == 2
    assert batching.shared_prefix([a, medata.Example([1, 2, 3, 4, 5], [-100, 2, -100, -100, 5])]) == 0
    assert batching.shared_prefix([a, medata.Example([5, 2, 3, 4], [-100, -100, -100, 4])]) == 0
    # off, a single conversation, or nothing in common: the plain packed row, no shared_prefix key
    for examples, share in (([a, b], False), ([a], True), ([a, medata.Example([5, 5], [-100, 5])], True)):
        assert batching.collate_packed(examples, share_prefix=share).keys() == batching.collate_packed([a, b]).keys()
        assert "shared_prefix" not in batching.collate_packed(examples, share_prefix=share)
    assert batching.shared_tokens(batching.collate([a, b], pad_id=0)) == 0


@pytest.mark.parametrize("path", ["cpu-function", "sdpa"])
def test_a_shared_prefix_gives_each_conversation_its_logits_alone(path, monkeypatch):
    """Logits of a row with the prefix laid once, per conversation, against that conversation alone:
    through the CPU flash function, and through sdpa per conversation (GPUs, attention dropout)."""
    if path == "sdpa":
        monkeypatch.setattr("medlora.fast.attention._plain_causal", lambda kwargs: False)
    model = tiny(packed=True)
    examples = _with_prefix(random_examples(4, seed=5), [7, 3, 9, 11, 500, 12, 13, 14, 15])
    batch = batching.collate_packed(examples, share_prefix=True)
    assert batch["shared_prefix"] == 9
    with torch.no_grad():
        row = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
        bounds = batch["cu_seq_lens_q"].tolist()
        for i, e in enumerate(examples):
            alone = model(input_ids=torch.tensor([e.input_ids])).logits[0]
            mine = row[bounds[i] : bounds[i + 1]]
            if i:
                mine = torch.cat([row[:9], mine])  # the prefix's logits are the first conversation's
            torch.testing.assert_close(mine, alone, atol=2e-5, rtol=1e-4)


def test_a_window_leaves_out_the_prefix_its_conversations_share():
    a = medata.Example([1, 2, 3, 4, 5, 6], [-100, -100, -100, -100, 5, 6])
    b = medata.Example([1, 2, 3, 7, 8], [-100, -100, -100, -100, 8])
    c = medata.Example([1, 2, 3, 9, 9, 9], [-100, -100, -100, -100, -100, 9])
    rows = [batching.collate_packed([a, b], share_prefix=True), batching.collate_packed([c], share_prefix=True)]
    # a row of one conversation gives up to one token before its first label (c: 4), a packed row
    # what its conversations share (3)
    assert common_prefix(rows) == 3 and common_prefix(rows[1:]) == 4
    assert common_prefix([rows[0], batching.collate_packed([medata.Example([1, 5, 3, 4], [-100] * 3 + [4])])]) == 1
    assert common_prefix([batching.collate([a, b], pad_id=0)]) == 0  # padded batches keep their rows

    model = tiny(packed=True)
    with torch.no_grad():
        prefix, stripped = run_prefix(model, rows)
    assert prefix.length == 3 and len(prefix.leaves) == model.config.num_hidden_layers
    first, second = stripped
    assert first["input_ids"].tolist() == [[4, 5, 6, 7, 8]]
    assert first["position_ids"].tolist() == [[3, 4, 5, 3, 4]]
    assert first["labels"].tolist() == [[-100, 5, 6, -100, 8]]
    assert first["cu_seq_lens_q"].tolist() == [0, 3, 5] and first["max_length_q"] == 3
    assert "shared_prefix" not in first and second["input_ids"].tolist() == [[9, 9, 9]]
    # the same supervised tokens; real tokens count the prefix in every conversation, computed or not
    assert [batching.supervised_tokens(r) for r in stripped] == [batching.supervised_tokens(r) for r in rows] == [3, 1]
    assert [batching.real_tokens(r) for r in stripped] == [11, 6] and [batching.shared_tokens(r) for r in stripped] == [
        6,
        3,
    ]
    # one conversation in the whole window: nothing to share
    assert run_prefix(model, rows[1:]) == (None, rows[1:])


def _window(examples: list[medata.Example], share: bool) -> list[dict]:
    """Three rows: two conversations, one, and two (a longer shared start than the window's)."""
    rows = [examples[:2], examples[2:3], examples[3:5]]
    return [batching.collate_packed(row, share_prefix=share) for row in rows]


def _trained(dropout: float, checkpointing: bool):
    """tiny_random with fused LoRA layers, every adapter weight nonzero (lora_B starts at zero), in training
    mode: the same weights at each call."""
    base = tiny(packed=True)
    torch.manual_seed(0)  # after loading: the first load of a fresh cache draws the random checkpoint
    model, _ = adapted(base, dropout=dropout, checkpointing=checkpointing, fused_lora=True, fast_dropout=True)
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    return model.train()


def _step(model, window: list[dict], step_prefix: bool) -> tuple[float, dict]:
    """What LoraRecipe's step does with `window` (without the optimizer): (summed loss, gradients)."""
    model.zero_grad()
    prefix, rows = run_prefix(model, window) if step_prefix else (None, window)
    total = 0.0
    for row in rows:
        loss, _ = loss_sum(model, row, True)
        loss.backward()
        total += loss.item()
    if prefix is not None:
        prefix.backward()
    return total, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("path", ["cpu-function", "sdpa"])
@pytest.mark.parametrize("scope", ["row", "step"])
def test_a_shared_prefix_keeps_the_loss_and_gradients(scope, path, monkeypatch):
    """Rows with the prefix laid once (row), or left out and run once for the window (step), against
    the same conversations packed whole: the same loss, and the same gradients (what every
    conversation sends through the prefix, summed)."""
    if path == "sdpa":
        monkeypatch.setattr("medlora.fast.attention._plain_causal", lambda kwargs: False)
    model = _trained(dropout=0.0, checkpointing=False)
    examples = _with_prefix(random_examples(5, seed=3), list(range(200, 230)))
    examples[4] = medata.Example(
        examples[3].input_ids[:33] + examples[4].input_ids[30:], [medata.IGNORE] * 33 + examples[4].labels[30:]
    )
    shared = _window(examples, share=True)
    assert [row.get("shared_prefix") for row in shared] == [30, None, 33]
    assert common_prefix(shared) == 30
    whole, g_whole = _step(model, _window(examples, share=False), step_prefix=False)
    total, g_shared = _step(model, shared, step_prefix=scope == "step")
    assert total == pytest.approx(whole, rel=1e-6)
    for name in g_whole:
        # the prefix's gradient is summed over its readers in another order than the whole rows' is:
        # fp32 rounding, seen up to 1.5e-6 on elements near zero with this install's torch
        torch.testing.assert_close(g_shared[name], g_whole[name], atol=5e-6, rtol=1e-4)


@pytest.mark.parametrize("scope", ["row", "step"])
def test_gradient_checkpointing_recomputes_a_shared_prefix_exactly(scope):
    """Checkpointing reruns each layer's forward, shared prefix and all, in the backward pass: the
    prefix's layers in its own backward pass too (step)."""
    examples = _with_prefix(random_examples(5, seed=4), list(range(300, 320)))
    results = []
    for checkpointing in (False, True):
        model = _trained(dropout=0.1, checkpointing=checkpointing)
        assert model.get_base_model().is_gradient_checkpointing == checkpointing
        torch.manual_seed(1)  # the same dropout masks, which checkpointing draws again as they were
        results.append(_step(model, _window(examples, share=True), step_prefix=scope == "step"))
    (plain, g_plain), (checkpointed, g_checkpointed) = results
    assert checkpointed == plain
    for name in g_plain:
        torch.testing.assert_close(g_checkpointed[name], g_plain[name], atol=1e-6, rtol=1e-5)
