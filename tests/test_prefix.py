"""A step's shared prefix (medlora.prefix): run once per optimizer step, same loss and gradients."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from medlora import data as medata
from medlora.adapters import add_adapter
from medlora.loss import loss_sum
from medlora.prefix import common_prefix, run_prefix
from test_speed import _examples, _tiny, _with_prefix

LORA = {"rank": 4, "alpha": 8, "target_modules": "all-linear", "use_dora": False, "use_rslora": False, "bias": "none"}


def test_a_window_leaves_out_the_prefix_its_conversations_share():
    a = medata.Example([1, 2, 3, 4, 5, 6], [-100, -100, -100, -100, 5, 6])
    b = medata.Example([1, 2, 3, 7, 8], [-100, -100, -100, -100, 8])
    c = medata.Example([1, 2, 3, 9, 9, 9], [-100, -100, -100, -100, -100, 9])
    rows = [medata.collate_packed([a, b], share_prefix=True), medata.collate_packed([c], share_prefix=True)]
    # a row of one conversation gives up to one token before its first label (c: 4), a packed row
    # what its conversations share (3)
    assert common_prefix(rows) == 3 and common_prefix(rows[1:]) == 4
    assert common_prefix([rows[0], medata.collate_packed([medata.Example([1, 5, 3, 4], [-100] * 3 + [4])])]) == 1
    assert common_prefix([medata.collate([a, b], pad_id=0)]) == 0  # padded batches keep their rows

    model = _tiny(packed=True)
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
    assert [medata.supervised_tokens(r) for r in stripped] == [medata.supervised_tokens(r) for r in rows] == [3, 1]
    assert [medata.real_tokens(r) for r in stripped] == [11, 6] and [medata.shared_tokens(r) for r in stripped] == [6, 3]
    # one conversation in the whole window: nothing to share
    assert run_prefix(model, rows[1:]) == (None, rows[1:])


def _window(examples: list[medata.Example], share: bool) -> list[dict]:
    """Three rows: two conversations, one, and two (a longer shared start than the window's)."""
    rows = [examples[:2], examples[2:3], examples[3:5]]
    return [medata.collate_packed(row, share_prefix=share) for row in rows]


def _adapted(dropout: float, checkpointing: bool):
    """tiny_random with fused LoRA layers, every adapter weight nonzero (lora_B starts at zero), in training mode."""
    model, _, _ = add_adapter(_tiny(packed=True), OmegaConf.create({**LORA, "dropout": dropout}), checkpointing,
                              fast_dropout=True, fused=True)
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    return model.train()


def _step(model, window: list[dict], step_prefix: bool) -> tuple[float, dict]:
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
def test_a_step_prefix_keeps_the_loss_and_gradients(path, monkeypatch):
    """Rows that leave out the step's prefix, against the same conversations packed whole: the
    same loss, and the same gradients (what every conversation sends through the prefix, summed)."""
    if path == "sdpa":
        monkeypatch.setattr("medlora.model._plain_causal", lambda kwargs: False)
    model = _adapted(dropout=0.0, checkpointing=False)
    examples = _with_prefix(_examples(5, seed=3), list(range(200, 230)))
    examples[4] = medata.Example(examples[3].input_ids[:33] + examples[4].input_ids[30:],
                                 [medata.IGNORE] * 33 + examples[4].labels[30:])
    step_window = _window(examples, share=True)
    assert [row.get("shared_prefix") for row in step_window] == [30, None, 33]
    assert common_prefix(step_window) == 30
    whole, g_whole = _step(model, _window(examples, share=False), step_prefix=False)
    shared, g_shared = _step(model, step_window, step_prefix=True)
    assert shared == pytest.approx(whole, rel=1e-6)
    for name in g_whole:
        torch.testing.assert_close(g_shared[name], g_whole[name], atol=5e-6, rtol=1e-4)


def test_gradient_checkpointing_recomputes_a_step_prefix_exactly():
    """Checkpointing reruns the prefix's layers in its backward pass, and the rows' layers in theirs."""
    examples = _with_prefix(_examples(5, seed=4), list(range(300, 320)))
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = _adapted(dropout=0.1, checkpointing=checkpointing)
        torch.manual_seed(1)  # the same dropout masks, which checkpointing draws again as they were
        results.append(_step(model, _window(examples, share=True), step_prefix=True))
    (plain, g_plain), (checkpointed, g_checkpointed) = results
    assert checkpointed == plain
    for name in g_plain:
        torch.testing.assert_close(g_checkpointed[name], g_plain[name], atol=1e-6, rtol=1e-5)
