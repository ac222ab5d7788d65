"""The cleaned, tokenized data cache: an exact round trip, no code run from a file swapped into the
cache, and a key that changes with the conversations and with the code that cleans and tokenizes."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save

from medlora import prepare
from medlora.data import Example, load_splits
from medlora.files import sha256_file
from medlora.safety.clean import CleanReport

from helpers import conversation, write_jsonl

PREPARED = prepare.Prepared(
    train_set=[Example([1, 2, 49151], [-100, 2, 49151]), Example([2**31 - 1], [-100])],
    eval_set=[Example([7, 8], [-100, 8])],
    token_stats={"train_conversations": 2, "train_tokens": 4, "eval_tokens": 2, "share": 0.1 + 0.2},
    train_safety=CleanReport(
        conversations_in=3,
        conversations_out=2,
        phi=Counter(PHONE=1, NAME=2),
        conversations_redacted=1,
        content=Counter({"self_harm.method": 1}),
        flagged=[0, 2],
        phi_mode="surrogate",
        surrogate_seed_sha256="ab" * 32,
    ),
    eval_safety=CleanReport(conversations_in=1, conversations_out=1),
)
CONVERSATIONS = (
    [conversation("What is a fever?", "A body temperature above about 38 C.")["messages"]],
    [conversation("Is 37 C normal?", "Yes, about 36.5 to 37.5 C is normal.")["messages"]],
)


def _shape(value):
    """Types all the way down, dict keys in order: equality alone takes 1 == 1.0 and a Counter == its dict."""
    if dataclasses.is_dataclass(value):
        return type(value), [(f.name, _shape(getattr(value, f.name))) for f in dataclasses.fields(value)]
    if isinstance(value, dict):
        return type(value), [(key, _shape(item)) for key, item in value.items()]
    if isinstance(value, list):
        return list, [_shape(item) for item in value]
    return type(value)


def test_the_cache_file_round_trips_every_field_exactly(tmp_path):
    path = tmp_path / "key.safetensors"
    prepare.save_prepared(path, PREPARED)
    loaded = prepare.load_prepared(path)
    assert loaded == PREPARED
    assert _shape(loaded) == _shape(PREPARED)
    assert list(loaded.metrics().items()) == list(PREPARED.metrics().items())
    # data only: int arrays, and JSON in the header
    with safe_open(path, framework="numpy") as f:
        arrays = {name: (str(f.get_tensor(name).dtype), f.get_tensor(name).tolist()) for name in f.keys()}
        metadata = f.metadata()
    assert arrays == {
        "train.input_ids": ("int32", [1, 2, 49151, 2**31 - 1]),
        "train.input_ids.lengths": ("int64", [3, 1]),
        "train.labels": ("int32", [-100, 2, 49151, -100]),
        "train.labels.lengths": ("int64", [3, 1]),
        "eval.input_ids": ("int32", [7, 8]),
        "eval.input_ids.lengths": ("int64", [2]),
        "eval.labels": ("int32", [-100, 8]),
        "eval.labels.lengths": ("int64", [2]),
    }
    assert set(metadata) == {"format", "prepared", "sha256"} and metadata["format"] == "medlora-data-4"
    assert json.loads(metadata["prepared"])["train_safety"]["phi"] == {"PHONE": 1, "NAME": 2}


class _RunsCode:
    """A pickle that touches `marker` when it is loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def _older_layout(path: Path, marker: Path) -> bytes:
    return save({"train.input_ids": load_file(path)["train.input_ids"]}, metadata={"format": "medlora-data-3"})


def _lengths_off_by_one(path: Path, marker: Path) -> bytes:
    """A deliberate edit that recomputes the checksum: the layout itself is checked too."""
    arrays = load_file(path)
    with safe_open(path, framework="numpy") as f:
        metadata = f.metadata()
    arrays["train.input_ids.lengths"] = arrays["train.input_ids.lengths"] + 1
    return save(arrays, metadata={**metadata, "sha256": prepare._digest(arrays, metadata["prepared"])})


# how a file is spoiled, and the reason the warning gives
SPOILED = {
    "a pickle that runs code": (lambda path, marker: pickle.dumps(_RunsCode(marker)), "not a safetensors file"),
    "cut short": (lambda path, marker: path.read_bytes()[:-10], "not a safetensors file"),
    "one bit flipped in a token id": (
        lambda path, marker: path.read_bytes()[:-1] + bytes([path.read_bytes()[-1] ^ 1]),
        "its contents do not match the SHA-256 it was written with",
    ),
    "an older layout": (_older_layout, "format 'medlora-data-3', expected 'medlora-data-4'"),
    "lengths that do not add up": (_lengths_off_by_one, "the lengths of train.input_ids do not add up to its"),
}


@pytest.mark.parametrize("case", list(SPOILED))
def test_a_spoiled_cache_file_is_named_and_built_again_never_run(cfg_train, tokenizer, tmp_path, caplog, case):
    cfg = cfg_train(f"paths.cache_dir={tmp_path}/cache", "model=tiny_random", "safety=none")
    built = prepare.prepare_data(cfg, tokenizer, *CONVERSATIONS)
    path = prepare.cache_path(cfg, tokenizer, *CONVERSATIONS)
    spoil, reason = SPOILED[case]
    marker = tmp_path / "pickle-ran"
    payload = spoil(path, marker)
    if case == "a pickle that runs code":
        pickle.loads(payload)  # the control: unpickling it does run code
        assert marker.exists()
        marker.unlink()
    path.write_bytes(payload)
    with caplog.at_level(logging.INFO, logger="medlora.prepare"):
        again = prepare.prepare_data(cfg, tokenizer, *CONVERSATIONS)
    assert not marker.exists()
    assert again == built
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith(f"cached data {path} cannot be used (")
    assert reason in warnings[0] and warnings[0].endswith("): cleaning and tokenizing again")
    assert not any("reused from" in r.getMessage() for r in caplog.records)
    assert prepare.load_prepared(path) == built  # written again, whole


def _prepare_from_files(cfg, tokenizer, caplog) -> tuple[prepare.Prepared, bool]:
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="medlora.prepare"):
        prepared = prepare.prepare_data(cfg, tokenizer, *load_splits(cfg.data, cfg.seed))
    return prepared, any("reused from" in r.getMessage() for r in caplog.records)


def test_a_data_file_edited_in_place_is_cleaned_again(cfg_train, tokenizer, tmp_path, caplog):
    rows = [
        conversation("Call me on 617-555-0143: what is a fever?", "A body temperature above about 38 C."),
        conversation("How long does a cold last?", "Usually 7 to 10 days."),
    ]
    train_file = write_jsonl(tmp_path / "train.jsonl", rows)
    eval_file = write_jsonl(tmp_path / "eval.jsonl", rows[1:])
    cfg = cfg_train(
        f"paths.cache_dir={tmp_path}/cache",
        "model=tiny_random",
        "data=jsonl",
        f"data.train_file={train_file}",
        f"data.eval_file={eval_file}",
    )
    first, reused = _prepare_from_files(cfg, tokenizer, caplog)
    assert not reused and first.train_safety.phi["PHONE"] == 1
    second, reused = _prepare_from_files(cfg, tokenizer, caplog)
    assert reused and second == first

    # one byte changed where it is, the size and modification time as they were
    before = train_file.stat()
    with open(train_file, "r+b") as f:
        f.seek(train_file.read_bytes().index(b"38 C"))
        f.write(b"39")
    os.utime(train_file, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = train_file.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)

    third, reused = _prepare_from_files(cfg, tokenizer, caplog)
    assert not reused
    assert "38 C" in tokenizer.decode(first.train_set[0].input_ids)
    text = tokenizer.decode(third.train_set[0].input_ids)
    assert "39 C" in text and "617-555-0143" not in text  # cleaned again, the phone number redacted again
    assert third.train_safety == first.train_safety and third.eval_set == first.eval_set
    assert len(list((tmp_path / "cache" / "data").glob("*.safetensors"))) == 2


# the modules whose source shapes the prepared data: everything clean_conversations imports in medlora.safety
SHAPING = [
    "prepare",
    "data",
    "safety/clean",
    "safety/content",
    "safety/text",
    "safety/phi",
    "safety/phi_ner",
    "safety/phi_surrogate",
]


def test_the_key_holds_the_source_of_the_code_that_cleans_and_tokenizes():
    package = Path(prepare.__file__).parent
    found = prepare.code_versions()
    assert {name: digest for name, digest in found.items() if name.startswith("medlora.")} == {
        "medlora." + name.replace("/", "."): sha256_file(package / f"{name}.py") for name in SHAPING
    }
    assert [name for name in found if not name.startswith("medlora.")] == list(prepare.LIBRARIES)


def test_an_edit_to_the_cleaning_code_changes_the_key(tmp_path, cfg_train, tokenizer, monkeypatch):
    shutil.copytree(
        Path(prepare.__file__).parent,
        tmp_path / "medlora",
        ignore=shutil.ignore_patterns("__pycache__", "triage_adapter"),
    )

    def versions() -> dict:
        script = "import json; from medlora.prepare import code_versions; print(json.dumps(code_versions()))"
        found = subprocess.run(
            [sys.executable, "-c", script],
            env={**os.environ, "PYTHONPATH": str(tmp_path)},
            capture_output=True,
            text=True,
            check=True,
        )
        return json.loads(found.stdout)

    before = versions()
    with open(tmp_path / "medlora" / "safety" / "text.py", "a") as f:
        f.write("# one comment more\n")
    after = versions()
    assert [name for name in before if before[name] != after[name]] == ["medlora.safety.text"]

    cfg = cfg_train("model=tiny_random")
    key = prepare.data_key(cfg, tokenizer, *CONVERSATIONS)
    monkeypatch.setattr(prepare, "code_versions", lambda: before)
    assert prepare.data_key(cfg, tokenizer, *CONVERSATIONS) == key  # the copy is this code
    monkeypatch.setattr(prepare, "code_versions", lambda: after)
    assert prepare.data_key(cfg, tokenizer, *CONVERSATIONS) != key
