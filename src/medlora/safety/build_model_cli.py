"""`python -m medlora.safety build-model` (`make safety-model`): train the triage model and ship it.

    python -m medlora.safety build-model [--out DIR] [train.py overrides ...]

Runs `python train.py experiment=safety_triage` with the overrides (a tracked MLflow run like any
other, in outputs/safety_triage/<time>/), then puts its calibrated adapter where
`safety.triage.model` reads it: src/medlora/safety/triage_adapter/ unless --out names another
folder. The folder is replaced whole or not at all. Deterministic with its seed on one machine:
the same data, config and CPU kind give the same weights.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from medlora.safety.settings import ROOT
from medlora.safety.triage_model import MANIFEST, WEIGHTS, TriageModelError, read_manifest

SHIPPED = ROOT / "src" / "medlora" / "safety" / "triage_adapter"
PROG = "python -m medlora.safety build-model"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Train the triage model (train.py experiment=safety_triage) and ship its adapter."
    )
    parser.add_argument("--out", default=str(SHIPPED), help=f"where the adapter goes (default {SHIPPED})")
    parser.add_argument("overrides", nargs="*", help="train.py overrides, e.g. training.num_epochs=1")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    out = Path(args.out).expanduser().resolve()
    if not out.parent.is_dir():
        print(f"error: --out {out}: folder {out.parent} does not exist: create it or choose another.", file=sys.stderr)
        return 2
    given = [o.split("=", 1)[1] for o in args.overrides if o.startswith("hydra.run.dir=")]
    run_dir = (
        Path(given[-1])
        if given
        else (ROOT / "outputs" / "safety_triage" / datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S"))
    )
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        "experiment=safety_triage",
        *([] if given else [f"hydra.run.dir={run_dir}"]),
        *args.overrides,
    ]
    print(f"{PROG}: {' '.join(command[1:])}", flush=True)
    done = subprocess.run(command, cwd=ROOT)
    if done.returncode != 0:
        print(
            f"error: training the triage model failed (exit {done.returncode}); nothing was shipped, "
            f"{out} is unchanged.",
            file=sys.stderr,
        )
        return done.returncode
    adapter = run_dir / "adapter"
    try:
        manifest = read_manifest(adapter)
    except TriageModelError as err:
        print(f"error: the run left no calibrated triage adapter ({err}); nothing was shipped.", file=sys.stderr)
        return 2
    manifest["build"] = {
        "command": f"{PROG} {' '.join(args.overrides)}".strip(),
        "run_dir": str(run_dir),
        "overrides": args.overrides,
    }
    _ship(adapter, out, manifest)
    figures = manifest["validation"]["figures"]["rules_or_model"]
    size = sum(p.stat().st_size for p in out.iterdir()) / 1e6
    print(
        f"triage adapter shipped to {out} ({size:.1f} MB); validation, rules or model: "
        + ", ".join(
            f"{k} {figures[k]:.3f}" for k in ("emergency_recall", "crisis_caught", "harmful_declined", "benign_flagged")
        )
    )
    return 0


def _ship(adapter: Path, out: Path, manifest: dict) -> None:
    """Copy the adapter's files into a temporary sibling of `out`, then swap it in."""
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    old = out.with_name(f".{out.name}-old")
    try:
        for name in ("adapter_config.json", WEIGHTS):
            shutil.copyfile(adapter / name, staging / name)  # plain modes: the files go into git
        config = json.loads((staging / "adapter_config.json").read_text())
        # the run's base was a machine-local cache folder; triage.json names the model config instead
        config["base_model_name_or_path"] = str(manifest["model"]["base_model"])
        (staging / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        staging.chmod(0o755)
        shutil.rmtree(old, ignore_errors=True)
        if out.exists():
            os.replace(out, old)
        os.replace(staging, out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if old.exists() and not out.exists():
            os.replace(old, out)
        raise
