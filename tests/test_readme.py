"""README.md and docs/ say only what exists: the config table is conf/'s, and every script, make
target, module and relative link they name is there."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from medlora.config import GROUPS
from medlora.config.schema import settings
from medlora.config.table import block, page, table

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
SPAN = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
PYTHON = re.compile(r"\.venv/bin/python[ \t]+(-m[ \t]+)?(\S+)")
MAKE = re.compile(r"(?:^|[\s;&|(`\"])make[ \t]+([a-z][\w-]*)")
TARGET = re.compile(r"^([A-Za-z][\w-]*)\s*:(?!=)", re.M)


def code(text: str) -> str:
    """The fenced blocks and inline spans of a Markdown page: where commands are written."""
    fenced = FENCE.findall(text)
    prose = FENCE.sub("", text)
    return "\n".join([*fenced, *SPAN.findall(prose)])


def commands(page: Path, pattern: re.Pattern) -> list:
    return sorted(set(pattern.findall(code(page.read_text()))))


def test_readme_config_table_is_generated_from_conf():
    assert block(README.read_text()) == table(ROOT / "conf"), (
        "README's config table is out of date: run `.venv/bin/python -m medlora.config.table --write`"
    )


def test_config_reference_lists_every_setting_of_the_schema():
    text = (ROOT / "docs" / "config.md").read_text()
    assert block(text) == page(), (
        "docs/config.md is out of date: run `.venv/bin/python -m medlora.config.table --write`"
    )
    rows = [line.split("|")[1].strip(" `") for line in block(text).splitlines() if line.startswith("| `")]
    keys = [key for cls in GROUPS.values() for key, _, _, _ in settings(cls)]
    assert rows == keys and len(keys) == len(set(keys)) > 100
    assert "| `lora.rank` | `int` | `32` | the LoRA rank r |" in text
    assert (
        "| `safety.triage.guard.categories` | `dict[str, str]` | `{S11: crisis, S6: allow, S8: allow, S13: allow}` |"
        in text
    )
    undocumented = [key for cls in GROUPS.values() for key, _, _, doc in settings(cls) if not doc.strip()]
    assert not undocumented, f"settings without a one-line doc: {undocumented}"


def test_table_has_a_row_per_config_group():
    folders = {p.name for p in (ROOT / "conf").iterdir() if p.is_dir() and p.name != "hydra"}
    groups = sorted(folders | {"evaluation"})  # a schema group with no folder, which evaluate.yaml names
    rows = [line.split("|")[1].strip(" `") for line in table(ROOT / "conf").splitlines()[2:]]
    assert sorted(rows) == groups
    assert "| `model` | " in table(ROOT / "conf") and "`smollm2_135m` (default)" in table(ROOT / "conf")


def test_table_reads_defaults_and_keys(tmp_path):
    (tmp_path / "train.yaml").write_text("defaults:\n  - a: two\n  - b: null\n  - _self_\nseed: 1\n")
    (tmp_path / "infer.yaml").write_text("defaults:\n  - a: one\n  - c: x\n")
    for group, option, body in [
        ("a", "one", "k: 1\n"),
        ("a", "two", "defaults:\n  - one\nz: 1\ny: 2\n"),
        ("b", "q", "p: 1\n"),
        ("b", "r", "s: 1\n"),
        ("c", "x", "u: {v: 1}\n"),
        ("hydra", "default", "run: {}\n"),
    ]:
        (tmp_path / group).mkdir(exist_ok=True)
        (tmp_path / group / f"{option}.yaml").write_text(body)
    assert table(tmp_path).splitlines()[2:] == [
        "| `a` | `one`, `two` (default) | `z`, `y` |",  # train.yaml's default wins; `defaults` is no setting
        "| `b` | `q`, `r` | `p` |",  # no default: the first option's keys
        "| `c` | `x` (default) | `u` |",  # a group only infer.yaml uses
    ]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_python_commands_name_existing_scripts_and_modules(page):
    missing = [
        f"-m {target}" if module else target
        for module, target in commands(page, PYTHON)
        if not (importlib.util.find_spec(target) if module else (ROOT / target).is_file())
    ]
    assert not missing, f"{page.name} names what does not exist: {missing}"


def test_make_targets_exist():
    targets = set(TARGET.findall((ROOT / "Makefile").read_text()))
    named = {target for page in PAGES for target in commands(page, MAKE)}
    assert {"train", "test", "lint", "format", "ui"} <= named, "README names the two commands, lint and ui"
    assert named <= targets, f"not in the Makefile: {sorted(named - targets)}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_point_at_files(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z][\w+.-]*:", target) or target.startswith("#"):
            continue  # a web address, or an anchor on the same page
        if not (page.parent / target.split("#", 1)[0]).exists():
            broken.append(target)
    assert not broken, f"{page.name} links to missing files: {broken}"
