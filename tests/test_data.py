"""Data: formats, validation messages, the assistant-only label mask, length-grouped batches."""

from __future__ import annotations

import pytest

from medlora import batching, data
from medlora.config import MedloraError

from helpers import conversation, write_jsonl

SYSTEM = "Be careful."


def test_label_mask_token_by_token(tokenizer):
    messages = [
        {"role": "user", "content": "What is HbA1c?"},
        {"role": "assistant", "content": "An average of blood sugar over about three months."},
        {"role": "user", "content": "Is 5.4% normal?"},
        {"role": "assistant", "content": "Yes, below 5.7% is in the normal range."},
    ]
    ids, labels = data.tokenize_conversation(tokenizer, data.with_system_prompt(messages, SYSTEM))

    def piece(text: str, learn: bool) -> tuple[list[int], list[int]]:
        toks = tokenizer(text, add_special_tokens=False)["input_ids"]
        return toks, toks if learn else [data.IGNORE] * len(toks)

    # the SmolLM2 (ChatML) template, cut where supervision starts and stops
    pieces = [
        piece(
            f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\nWhat is HbA1c?<|im_end|>\n"
            "<|im_start|>assistant\n",
            False,
        ),
        piece("An average of blood sugar over about three months.<|im_end|>", True),
        piece("\n<|im_start|>user\nIs 5.4% normal?<|im_end|>\n<|im_start|>assistant\n", False),
        piece("Yes, below 5.7% is in the normal range.<|im_end|>", True),
        piece("\n", False),
    ]
    assert ids == [t for toks, _ in pieces for t in toks]
    assert labels == [lab for _, labs in pieces for lab in labs]
    assert tokenizer.decode([t for t in labels if t != data.IGNORE]) == (
        "An average of blood sugar over about three months.<|im_end|>Yes, below 5.7% is in the normal range.<|im_end|>"
    )


def test_system_prompt_added_only_when_missing():
    user = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert data.with_system_prompt(user, SYSTEM)[0] == {"role": "system", "content": SYSTEM}
    own = [{"role": "system", "content": "mine"}, *user]
    assert data.with_system_prompt(own, SYSTEM) == own
    assert data.with_system_prompt(user, None) == user


def test_three_record_formats(tmp_path):
    path = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            conversation("q1", "a1"),
            {"instruction": "Explain LDL.", "input": "Value: 160 mg/dL", "output": "That is high."},
            {"prompt": "What is a CBC?", "completion": "A blood count."},
        ],
    )
    convs = data.load_conversations(path)
    assert convs[1] == [
        {"role": "user", "content": "Explain LDL.\n\nValue: 160 mg/dL"},
        {"role": "assistant", "content": "That is high."},
    ]
    assert convs[2][1] == {"role": "assistant", "content": "A blood count."}


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"messages": [{"role": "user", "content": "hi"}', "bad.jsonl:2: not valid JSON"),
        (
            '{"messages": [{"role": "doctor", "content": "hi"}, {"role": "assistant", "content": "a"}]}',
            "bad.jsonl:2: message 0 has unknown role 'doctor'",
        ),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "bad.jsonl:2: the conversation has no assistant turn"),
        ('{"question": "hi", "answer": "a"}', "bad.jsonl:2: unknown record format"),
        ("[1, 2]", "bad.jsonl:2: expected a JSON object"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [conversation("q", "a"), line])
    with pytest.raises(MedloraError, match=message.replace("(", r"\(")):
        data.load_conversations(path)


def test_empty_file_is_an_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(MedloraError, match="has no conversations"):
        data.load_conversations(path)


def test_overlong_truncate_and_drop(tokenizer):
    long = [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "word " * 200}]]
    kept, stats = data.tokenize_dataset(long, tokenizer, SYSTEM, max_seq_len=64, overlong="truncate")
    assert (stats.truncated, stats.dropped, len(kept[0].input_ids)) == (1, 0, 64)
    kept, stats = data.tokenize_dataset(long, tokenizer, SYSTEM, max_seq_len=64, overlong="drop")
    assert (stats.truncated, stats.dropped, kept) == (0, 1, [])


def test_length_grouped_batches_cover_every_example_once_per_epoch():
    lengths = [(i * 37) % 101 for i in range(230)]
    sampler = batching.LengthGroupedBatches(lengths, batch_size=4, seed=0)
    first, second = list(sampler), list(sampler)
    for epoch in (first, second):
        assert sorted(i for batch in epoch for i in batch) == list(range(230))
        assert len(epoch) == len(sampler) == 58
    assert first != second  # a new order each epoch
    # grouping: batches hold similar lengths, so padding is far below a random order's
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in first) / len(first)
    assert spread < 10


def test_collate_pads_right_and_masks_padding():
    batch = batching.collate([data.Example([5, 6, 7], [-100, 6, 7]), data.Example([8], [8])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_non_utf8_file_is_named(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"prompt": "fièvre", "completion": "a"}\n'.encode("latin-1"))
    with pytest.raises(MedloraError, match="latin1.jsonl is not UTF-8 text"):
        data.load_conversations(path)
