"""The README's config table, made from conf/ so the two cannot drift apart.

    python -m medlora.config_table            # print the table
    python -m medlora.config_table --write    # replace the table in README.md

One row per config group (a folder of conf/, hydra's own settings aside): its options, the
default marked, and the top-level keys of the default option (of the first option where the
group has none). The defaults come from the `defaults:` list of conf/train.yaml, and from
conf/infer.yaml and conf/evaluate.yaml for the groups only they use. tests/test_readme.py checks
that README.md holds exactly this table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
# read in this order: a group's default is the one the first of them names
ENTRY_CONFIGS = ("train.yaml", "infer.yaml", "evaluate.yaml")
NOT_GROUPS = {"hydra"}  # Hydra's own run and sweep settings, not a choice a user makes
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


def groups(conf_dir: Path) -> list[str]:
    """The config groups of `conf_dir`: those the entry configs list first, in their order, then any others."""
    folders = sorted(p.name for p in conf_dir.iterdir() if p.is_dir() and p.name not in NOT_GROUPS)
    listed = [g for g in defaults(conf_dir) if g in folders]
    return listed + [g for g in folders if g not in listed]


def _keys(option: Path) -> list[str]:
    # `defaults` composes other files into this one; it is not a setting of its own
    return [str(k) for k in _read(option) if k != "defaults"]


def row(conf_dir: Path, group: str, default: str | None) -> str:
    options = sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))
    shown = ", ".join(f"`{o}` (default)" if o == default else f"`{o}`" for o in options)
    source = default if default in options else (options[0] if options else None)
    keys = ", ".join(f"`{k}`" for k in _keys(conf_dir / group / f"{source}.yaml")) if source else ""
    return f"| `{group}` | {shown} | {keys} |"


def table(conf_dir: str | Path) -> str:
    """The Markdown table of every config group in `conf_dir`, ending in a newline."""
    conf_dir = Path(conf_dir)
    chosen = defaults(conf_dir)
    lines = ["| group | options | top-level keys (of the default, else the first option) |", "|---|---|---|"]
    lines += [row(conf_dir, g, chosen.get(g)) for g in groups(conf_dir)]
    return "\n".join(lines) + "\n"


def block(text: str) -> str:
    """What `text` holds between the table's two marker comments (the markers' own lines excluded)."""
    if START not in text or END not in text:
        raise ValueError(f"no {START} ... {END} block")
    return text.split(START, 1)[1].split(END, 1)[0].removeprefix("\n")


def replace_block(text: str, new: str) -> str:
    head, rest = text.split(START, 1)
    return f"{head}{START}\n{new}{END}{rest.split(END, 1)[1]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medlora.config_table", description=__doc__.split("\n")[0])
    parser.add_argument("--conf", default=str(ROOT / "conf"), help="the config folder (default: the project's conf/)")
    parser.add_argument(
        "--write",
        nargs="?",
        const=str(ROOT / "README.md"),
        metavar="README",
        help="replace the table between the marker comments of this file (default: README.md)",
    )
    args = parser.parse_args(argv)
    new = table(args.conf)
    if args.write is None:
        sys.stdout.write(new)
        return 0
    readme = Path(args.write)
    text = readme.read_text()
    block(text)  # a README without the markers is an error, not a file to append to
    readme.write_text(replace_block(text, new))
    return 0


if __name__ == "__main__":
    sys.exit(main())
