"""The config tables of README.md and docs/config.md, made from conf/ and the schema so they
cannot drift apart.

    python -m medlora.config.table            # print both
    python -m medlora.config.table --write    # replace them in README.md and docs/config.md

README's table has a row per config group (a folder of conf/, hydra's own settings aside, and a
schema group an entry config names, such as evaluation): its options with the default marked, and
its keys: the schema's where the group has one, else the top-level keys of the default option (of
the first option where the group has none). The defaults come from the `defaults:` list of
conf/train.yaml, and from conf/infer.yaml and conf/evaluate.yaml for the groups only they use.
docs/config.md lists every setting of every schema: key, type, default, what it does.
tests/test_readme.py checks that both pages hold exactly these tables.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

import yaml

from medlora.config import GROUPS
from medlora.config.schema import Group, settings

ROOT = Path(__file__).resolve().parents[3]
# read in this order: a group's default is the one the first of them names
ENTRY_CONFIGS = ("train.yaml", "infer.yaml", "evaluate.yaml")
NOT_GROUPS = {"hydra"}  # Hydra's own run and sweep settings, not a choice a user makes
LONGEST = 60  # characters of a default shown (the safety texts are longer: their source has them whole)
START = "<!-- config-table:start -->"
END = "<!-- config-table:end -->"


def _read(path: Path) -> dict:
    return yaml.safe_load(path.read_text()) or {}


def defaults(conf_dir: Path) -> dict[str, str | None]:
    """{group: default option} in the order the entry configs list them; None where a group defaults to null."""
    chosen: dict[str, str | None] = {}
    for name in ENTRY_CONFIGS:
        path = conf_dir / name
        if not path.is_file():
            continue
        for item in _read(path).get("defaults") or []:
            if not isinstance(item, dict):
                continue  # `_self_`
            for group, option in item.items():
                if not str(group).startswith("override "):
                    chosen.setdefault(str(group), None if option is None else str(option))
    return chosen


def groups(conf_dir: Path, schemas: dict[str, type[Group]]) -> list[str]:
    """The config groups of `conf_dir`: those the entry configs list first, in their order, then any others."""
    folders = sorted(p.name for p in conf_dir.iterdir() if p.is_dir() and p.name not in NOT_GROUPS)
    listed = [g for g in defaults(conf_dir) if g in folders or g in schemas]
    return listed + [g for g in folders if g not in listed]


def _keys(option: Path) -> list[str]:
    # `defaults` composes other files into this one; it is not a setting of its own
    return [str(k) for k in _read(option) if k != "defaults"]


def row(conf_dir: Path, group: str, default: str | None, schema: type[Group] | None) -> str:
    options = sorted(p.stem for p in (conf_dir / group).glob("*.yaml")) or ([default] if default else [])
    shown = ", ".join(f"`{o}` (default)" if o == default else f"`{o}`" for o in options)
    if schema is not None:
        names = [f.name for f in fields(schema)]
    else:
        source = default if default in options else (options[0] if options else None)
        names = _keys(conf_dir / group / f"{source}.yaml") if source else []
    return f"| `{group}` | {shown} | {', '.join(f'`{k}`' for k in names)} |"


def table(conf_dir: str | Path, schemas: dict[str, type[Group]] | None = None) -> str:
    """The Markdown table of every config group in `conf_dir`, ending in a newline."""
    conf_dir = Path(conf_dir)
    schemas = GROUPS if schemas is None else schemas
    chosen = defaults(conf_dir)
    lines = ["| group | options | keys (the schema's, else the default or first option's) |", "|---|---|---|"]
    lines += [row(conf_dir, g, chosen.get(g), schemas.get(g)) for g in groups(conf_dir, schemas)]
    return "\n".join(lines) + "\n"


def _pipe(text: str) -> str:
    return text.replace("|", "\\|")  # a bare | ends a Markdown table cell, even inside backticks


def _cell(value) -> str:
    if value is None or isinstance(value, bool):
        text = {None: "null", True: "true", False: "false"}[value]
    elif isinstance(value, (list, dict)):
        text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10_000).strip()
    else:
        text = str(value).replace("\n", " ")
        if len(text) > LONGEST:
            text = text[: LONGEST - 3].rstrip() + "..."
    return f"`{_pipe(text)}`" if text else '`""`'


def page(schemas: dict[str, type[Group]] | None = None) -> str:
    """docs/config.md's tables: every setting of every schema group, ending in a newline."""
    parts = []
    for name, cls in (GROUPS if schemas is None else schemas).items():
        parts.append(f"### `{name}`\n\n| key | type | default | what it does |\n|---|---|---|---|\n")
        parts.append(
            "".join(f"| `{k}` | `{_pipe(t)}` | {_cell(d)} | {_pipe(doc)} |\n" for k, t, d, doc in settings(cls))
        )
        parts.append("\n")
    return "".join(parts).removesuffix("\n")


def block(text: str) -> str:
    """What `text` holds between the table's two marker comments (the markers' own lines excluded)."""
    if START not in text or END not in text:
        raise ValueError(f"no {START} ... {END} block")
    return text.split(START, 1)[1].split(END, 1)[0].removeprefix("\n")


def replace_block(text: str, new: str) -> str:
    head, rest = text.split(START, 1)
    return f"{head}{START}\n{new}{END}{rest.split(END, 1)[1]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medlora.config.table", description=__doc__.split("\n")[0])
    parser.add_argument("--conf", default=str(ROOT / "conf"), help="the config folder (default: the project's conf/)")
    parser.add_argument(
        "--write",
        action="store_true",
        help="replace the tables between the marker comments of README.md and docs/config.md",
    )
    args = parser.parse_args(argv)
    pages = {ROOT / "README.md": table(args.conf), ROOT / "docs" / "config.md": page()}
    if not args.write:
        sys.stdout.write("\n".join(pages.values()))
        return 0
    for path, new in pages.items():
        text = path.read_text()
        block(text)  # a page without the markers is an error, not a file to append to
        path.write_text(replace_block(text, new))
    return 0


if __name__ == "__main__":
    sys.exit(main())
