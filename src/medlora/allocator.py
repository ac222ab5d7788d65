"""`training.allocator`: the C allocator the training process runs on, chosen before it starts.

Every activation of a micro-batch is allocated in the forward pass and freed in the backward, in
a different order and among temporaries of many sizes. glibc's malloc leaves that memory
fragmented and hands pages back to the kernel only to fault them in again; mimalloc keeps a
lower peak and trains faster (bench/train_throughput.py --settings medlora,medlora-glibc;
bench/results/train_throughput.md). An allocator replaces malloc only from a process's start, so
`python train.py` reads the key first and, where the allocator is not loaded yet, starts itself
again with it in LD_PRELOAD, as torch's own CPU launcher
(`python -m torch.backends.xeon.run_cpu --enable-tcmalloc`) does.

Light on purpose (the standard library, and Hydra's compose for relaunch_for): it runs before
torch is imported.
"""

from __future__ import annotations

import ctypes.util
import importlib.metadata
import os
import sys
from pathlib import Path

ALLOCATORS = ("auto", "mimalloc", "tcmalloc", "jemalloc", "system")
# the library file names as they appear in /proc/self/maps
_MARKS = {"mimalloc": "libmimalloc", "tcmalloc": "libtcmalloc", "jemalloc": "libjemalloc"}
_INSTALL = {
    "mimalloc": "`.venv/bin/pip install cmeel-mimalloc` (a dependency of medlora on Linux)",
    "tcmalloc": "the system package libtcmalloc-minimal4 (Debian, Ubuntu) or gperftools",
    "jemalloc": "the system package libjemalloc2 (Debian, Ubuntu) or jemalloc",
}
# mimalloc returns freed pages to the kernel after a second by default; a training step reuses
# them at once, and faulting them in again costs tokens/s. Its arenas ask for transparent huge
# pages, which count a whole 2 MiB page as resident once any of it is touched: more RSS at the
# same speed. Both measured with bench/train_throughput.py (bench/results/train_throughput.md).
_SETTINGS = {"mimalloc": {"MIMALLOC_PURGE_DELAY": "-1", "MIMALLOC_ALLOW_THP": "0"}}
# ldconfig names of each allocator's system library, in the order tried
_SYSTEM_NAMES = {"mimalloc": ("mimalloc",), "tcmalloc": ("tcmalloc_minimal", "tcmalloc"), "jemalloc": ("jemalloc",)}
_MARKER = "MEDLORA_RELAUNCHED_UNDER"


def library(name: str) -> str | None:
    """The shared library of allocator `name`, or None where it is not installed."""
    if name == "mimalloc":
        try:
            files = importlib.metadata.files("cmeel-mimalloc") or []
        except importlib.metadata.PackageNotFoundError:
            files = []
        found = [f.locate() for f in files if f.name.startswith("libmimalloc.so.") and f.name.count(".") == 2]
        if found:
            return str(found[0])
    # a system library: ldconfig's name, which the dynamic loader finds by itself
    return next(filter(None, map(ctypes.util.find_library, _SYSTEM_NAMES[name])), None)


def in_use() -> str:
    """The allocator this process runs on: one of _MARKS, or system."""
    maps = Path("/proc/self/maps")
    text = maps.read_text() if maps.is_file() else ""
    return next((name for name, mark in _MARKS.items() if mark in text), "system")


def choose(requested: str) -> tuple[str, str | None]:
    """(allocator, its library) for `requested`; auto is mimalloc where installed, else system.

    Raises ValueError naming the fix when a named allocator is missing or the name is unknown.
    """
    if requested not in ALLOCATORS:
        raise ValueError(f"training.allocator={requested!r} is invalid: use one of {', '.join(ALLOCATORS)}.")
    if requested == "system":
        return "system", None
    if requested == "auto":
        found = library("mimalloc") if sys.platform.startswith("linux") else None
        return ("mimalloc", found) if found else ("system", None)
    found = library(requested) if sys.platform.startswith("linux") else None
    if not found:
        raise ValueError(
            f"training.allocator={requested}: its library is not installed here. Install "
            f"{_INSTALL[requested]}, or use training.allocator=auto (mimalloc where installed, "
            "else the system allocator)."
        )
    return requested, found


def relaunch_for(config_dir: Path, config_name: str) -> None:
    """Compose the entry config with this command's overrides and restart under its training.allocator.

    Runs before Hydra and before torch is imported, so the whole run (every job of a sweep too)
    has one allocator and the restart costs little. Sweep values are left out; a command line
    that does not compose is left to Hydra, which reports it.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args = [a for a in sys.argv[1:] if not a.startswith("-")]
    try:
        parsed = OverridesParser.create().parse_overrides(args)
        overrides = [
            a for a, o in zip(args, parsed) if not o.is_sweep_override() and not o.key_or_group.startswith("hydra")
        ]
        with initialize_config_dir(str(config_dir), version_base="1.3"):
            requested = compose(config_name, overrides=overrides).training.allocator
    except Exception:  # noqa: BLE001 - Hydra's own run reports a bad command line
        return
    relaunch_under(requested)


def preload_env(requested: str, env: dict[str, str]) -> dict[str, str]:
    """`env` for a process that starts on allocator `requested` (ValueError where it is not installed)."""
    return _with_preload(*choose(requested), env)


def _with_preload(name: str, path: str | None, env: dict[str, str]) -> dict[str, str]:
    if path is None:
        return env
    env = {**env, "LD_PRELOAD": " ".join(filter(None, [path, env.get("LD_PRELOAD")]))}
    return {**_SETTINGS.get(name, {}), **env}


def relaunch_under(requested: str) -> None:
    """Start this command again with the allocator preloaded, unless it already runs on it."""
    try:
        name, path = choose(requested)
    except ValueError:
        return  # the run's config check reports it, with the rest of the config
    # the marker stops a loop where the loader could not preload the library after all
    if name == "system" or in_use() == name or os.environ.get(_MARKER) == name:
        return
    env = {**_with_preload(name, path, dict(os.environ)), _MARKER: name}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
