"""One place per setting: its type, default, check and one-line doc.

Each config group is a dataclass here (peft's LoraConfig is the model: fields with defaults, checks
in __post_init__), registered with Hydra's ConfigStore as `<group>/schema`. The YAML options in
conf/<group>/ start from it (`defaults: [schema, _self_]`) and state only what differs, so Hydra
rejects a misspelt key when it composes, and `build` turns the composed node into the dataclass,
whose checks name the key, the value and the fix.

The store gets each field typed `Any`: a value of the wrong type (`lora.rank=2.5`) then reaches its
check and that message, not OmegaConf's bare conversion error at composition, which names no fix.
"""

from __future__ import annotations

import copy
from dataclasses import MISSING, dataclass, field, fields, make_dataclass
from pathlib import Path
from typing import Any, ClassVar

from omegaconf import DictConfig, OmegaConf

ROOT = Path(__file__).resolve().parents[3]


def setting(default, doc: str, check=None, group: type | None = None):
    """A field with its one-line doc and check; a list or mapping default is copied per instance."""
    meta = {"doc": doc, "check": check, "group": group}
    if group is not None:
        return field(default_factory=group, metadata=meta)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Group:
    """A block of the composed config; `key` is where it sits (`safety.triage`)."""

    key: ClassVar[str]

    def __post_init__(self) -> None:
        for f in fields(self):
            check = f.metadata.get("check")
            if check is not None:
                check(f"{self.key}.{f.name}", getattr(self, f.name))
        self.check()

    def check(self) -> None:
        """Rules that join two or more settings (a group's own rules run after each field's)."""


def build(cls: type[Group], node):
    """The `cls` a composed node describes, checked as it is made. Keys the node lacks keep their
    defaults (a config saved by an older version); keys the schema lacks are left out."""
    values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})
    given = {}
    for f in fields(cls):
        if f.name in values:
            nested = f.metadata.get("group")
            given[f.name] = build(nested, values[f.name]) if nested else values[f.name]
    return cls(**given)


def store_node(cls: type[Group]) -> type:
    specs = []
    for f in fields(cls):
        nested = f.metadata.get("group")
        if nested is not None:
            node = store_node(nested)
            specs.append((f.name, node, field(default_factory=node)))
        elif f.default_factory is not MISSING:
            specs.append((f.name, Any, field(default_factory=f.default_factory)))
        else:
            specs.append((f.name, Any, field(default=f.default)))
    return make_dataclass(cls.__name__, specs)


def settings(cls: type[Group]):
    """(dotted key, type, default, doc) of every setting of `cls`, nested groups flattened."""
    hints = {f.name: f.type for f in fields(cls)}
    for f in fields(cls):
        nested = f.metadata.get("group")
        if nested is not None:
            yield from settings(nested)
            continue
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        yield f"{cls.key}.{f.name}", str(hints[f.name]), default, f.metadata["doc"]
