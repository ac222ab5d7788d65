"""What a run writes to keep, and how it continues after a crash, a kill or a preemption.

A checkpoint (checkpoints/step_N) holds the whole training state: the adapter weights, the
optimizer and scheduler, every random generator (Python, NumPy, torch CPU and CUDA), the step (the
sampler's place follows from it), the MLflow run id and the audit trail's head. It is written
beside its final name and renamed, with a manifest of SHA-256 hashes checked when it is loaded: a
corrupt checkpoint is named and passed over for the one before. Nothing in it is unpickled:
tensors load with `weights_only=True`, the rest is JSON or safetensors.

`training.resume=auto` continues the latest valid checkpoint of this run's folder, else of the
latest unfinished run beside it with the same config hash (the same command run again after a
crash), else of `training.resume_from`; the run then goes on in that folder, its audit trail and
its MLflow run.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from peft import set_peft_model_state_dict
from safetensors.torch import load_file

from medlora.config import MedloraError
from medlora.files import folder_hashes, save_folder, sha256_text, write_file

log = logging.getLogger(__name__)

STATE = "trainer_state.json"
MANIFEST = "manifest.json"
TENSORS = "training_state.pt"
RNG = "rng.json"
RUN_STATE = "run_state.json"  # in the run folder: running | stopped | failed | finished


# --------------------------------------------------------------------------------------------
# the adapter


def save_adapter(model, tokenizer, target: Path) -> Path:
    """The adapter folder; one an interrupted earlier attempt left is replaced whole, never mixed."""

    def save(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)  # carries the chat template the adapter was trained with

    return _replace(target, save, needed=_trainable_bytes(model))


def _trainable_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def _replace(target: Path, save, needed: int) -> Path:
    if not target.exists():
        return _saved(target, save, needed)
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}-old-", dir=target.parent))
    os.replace(target, aside / target.name)
    try:
        _saved(target, save, needed)
    except BaseException:
        os.replace(aside / target.name, target)  # the old one stays where it was
        shutil.rmtree(aside, ignore_errors=True)
        raise
    shutil.rmtree(aside, ignore_errors=True)
    return target


def _saved(target: Path, save, needed: int) -> Path:
    """save_folder, with a full disk named: how much the save needed and how much was free."""
    try:
        return save_folder(target, save)
    except OSError as err:
        if err.errno not in (28, 122):  # ENOSPC, EDQUOT
            raise
        free = shutil.disk_usage(target.parent).free
        raise MedloraError(
            f"{target} was not saved: the disk is full ({free / 1e6:.0f} MB free in {target.parent}, "
            f"about {needed / 1e6:.0f} MB needed). Nothing older was changed; free some space "
            "(or point hydra.run.dir elsewhere) and run the same command again to resume."
        ) from err


# --------------------------------------------------------------------------------------------
# checkpoints


def checkpoints(folder: Path) -> list[Path]:
    """The checkpoint folders in `folder`, oldest first (unverified)."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith("step_") and (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step_")))


def save_checkpoint(model, optimizer, scheduler, target: Path, state: dict) -> Path:
    """`model` unwrapped (accelerate's wrapper off), so the folder loads like any peft adapter."""

    def save(folder: Path) -> None:
        model.save_pretrained(folder)
        tensors = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            tensors["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(tensors, folder / TENSORS)
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        version, inner, gauss_next = random.getstate()
        (folder / RNG).write_text(
            json.dumps(
                {
                    "python": [version, list(inner), gauss_next],
                    "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
                }
            )
        )
        (folder / STATE).write_text(json.dumps(state, indent=1))
        (folder / MANIFEST).write_text(json.dumps(folder_hashes(folder), indent=1))  # last: it covers the rest

    target.parent.mkdir(parents=True, exist_ok=True)
    # a resumed run passes the steps of checkpoints a corrupt one stood in front of: those are replaced
    _replace(target, save, needed=3 * _trainable_bytes(model))  # the weights and AdamW's two moments
    log.info("checkpoint saved to %s", target)
    return target


class Checkpoints:
    """A run's checkpoints folder: when the next one is due, writing it, and keeping the right ones."""

    def __init__(self, folder: Path, every_steps: int, every_minutes: float, keep_last: int):
        self.folder, self.every_steps, self.every_minutes, self.keep_last = (
            folder,
            every_steps,
            every_minutes,
            keep_last,
        )
        self.last_save = time.monotonic()

    @classmethod
    def of(cls, run_dir: Path, training) -> Checkpoints:
        return cls(run_dir / "checkpoints", training.save_every, training.save_every_minutes, training.keep_checkpoints)

    def due(self, step: int) -> bool:
        """Every `every_steps` steps or `every_minutes` of training, whichever comes first."""
        by_steps = bool(self.every_steps) and step % self.every_steps == 0
        return by_steps or (bool(self.every_minutes) and time.monotonic() - self.last_save >= 60 * self.every_minutes)

    def save(self, model, optimizer, scheduler, state: dict) -> Path:
        saved = save_checkpoint(model, optimizer, scheduler, self.folder / f"step_{state['step']}", state)
        self.last_save = time.monotonic()
        prune(self.folder, self.keep_last)
        return saved


def problem(folder: Path) -> str | None:
    """What is wrong with a checkpoint folder, or None when every file matches its manifest."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as err:
        return f"its {MANIFEST} cannot be read ({err})"
    found = folder_hashes(folder)
    for name, digest in manifest.items():
        if name not in found:
            return f"{name} is missing"
        if found[name] != digest:
            return f"{name} does not match its SHA-256 in {MANIFEST}"
    return None


def latest_valid(folder: Path, at_most: int | None = None) -> Path | None:
    """The newest checkpoint in `folder` that passes its manifest; the corrupt ones on the way are named."""
    for candidate in reversed(checkpoints(folder)):
        if at_most is not None and int(candidate.name.removeprefix("step_")) > at_most:
            continue
        wrong = problem(candidate)
        if wrong is None:
            return candidate
        log.warning("checkpoint %s is corrupt (%s): trying the one before it", candidate, wrong)
    return None


def read_state(folder: Path) -> dict:
    return json.loads((folder / STATE).read_text())


def load_checkpoint(folder: Path, model, optimizer, scheduler) -> dict:
    """Restore a verified checkpoint into the prepared model, optimizer and scheduler; return its state."""
    set_peft_model_state_dict(model, load_file(folder / "adapter_model.safetensors"))
    tensors = torch.load(folder / TENSORS, weights_only=True)  # tensors and plain containers: no code runs
    optimizer.load_state_dict(tensors["optimizer"])
    scheduler.load_state_dict(tensors["scheduler"])
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(tensors["cuda"])
    rng = json.loads((folder / RNG).read_text())
    version, inner, gauss_next = rng["python"]
    random.setstate((version, tuple(inner), gauss_next))
    kind, keys, pos, has_gauss, gauss = rng["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    state = read_state(folder)
    log.info("resumed from %s at step %d", folder, state["step"])
    return state


def prune(folder: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` checkpoints and the one with the best eval loss; remove the rest."""
    found = checkpoints(folder)
    keep = set(found[-keep_last:]) if keep_last > 0 else set()
    scored = [(read_state(c).get("eval_loss"), c) for c in found]
    scored = [(loss, c) for loss, c in scored if loss is not None]
    if scored:
        keep.add(min(scored, key=lambda pair: pair[0])[1])
    for old in found:
        if old not in keep:
            shutil.rmtree(old, ignore_errors=True)
    for stale in folder.glob(".step_*"):  # what a killed save left beside its final name
        shutil.rmtree(stale, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# where a run continues


@dataclass
class Resume:
    """A checkpoint to continue from and the run folder it belongs to, where the run goes on; None
    for a finished run's checkpoint, which a new run starts from in its own folder and MLflow run."""

    checkpoint: Path
    run_dir: Path | None
    state: dict


def mark(run_dir: Path, outcome: BaseException | str | None, step: int) -> None:
    """Record how the run stands: running, or how it ended (None: finished, a Stopped: stopped, else failed).
    An error before training began (no run state yet) records nothing: no run to resume there."""
    if isinstance(outcome, str):
        status = outcome
    else:
        status = "finished" if outcome is None else "stopped" if isinstance(outcome, Stopped) else "failed"
        if outcome is not None and not (run_dir / RUN_STATE).is_file():
            return
    if not run_dir.is_dir():
        return
    try:
        write_file(run_dir / RUN_STATE, json.dumps({"status": status, "step": step}))
    except MedloraError as err:
        if status == "running":
            raise
        log.warning("%s", err)  # the error that ended the run is the one to see


def finished(run_dir: Path) -> bool:
    try:
        return json.loads((run_dir / RUN_STATE).read_text()).get("status") == "finished"
    except (OSError, ValueError):
        return False


def config_hash(cfg: DictConfig) -> str:
    """Names the training setup: where a run writes, what it tracks to and how it resumes change nothing it learns."""
    setup = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in ("paths", "tracking")}
    for key in ("resume", "resume_from"):
        setup.get("training", {}).pop(key, None)
    return sha256_text(json.dumps(setup, sort_keys=True))


def resume_point(training, tracking_uri, info, config_hash: str) -> tuple[Resume | None, Path]:
    """(where this run continues from, the folder it runs in) for the recipe; see find_resume."""
    t = training
    resume = find_resume(
        t.resume, t.resume_from, info.output_dir, config_hash, tracking_uri, look_beside=not info.sweep_dir
    )
    run_dir = (resume.run_dir if resume else None) or info.output_dir
    if run_dir != info.output_dir:
        log.info("this run continues in %s (this process's log: %s)", run_dir, info.output_dir)
    return resume, run_dir


def find_resume(
    mode: str, resume_from: str | None, run_dir: Path, config_hash: str, tracking_uri, look_beside: bool = True
) -> Resume | None:
    """Where this run continues from, or None to start fresh (see the module docstring). A sweep's
    job looks only in its own folder: its siblings are other jobs."""
    if resume_from:
        return _named(resume_from, tracking_uri)
    if mode == "never":
        return None
    own = _resumable(run_dir)
    if own is not None or not look_beside or not run_dir.parent.is_dir():
        return own
    beside = sorted(
        (p for p in run_dir.parent.iterdir() if p.is_dir() and p != run_dir and not finished(p)),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for other in beside:
        newest = checkpoints(other / "checkpoints")
        # the config first: verifying a checkpoint reads all of it
        try:
            if not newest or read_state(newest[-1]).get("config_hash") != config_hash:
                continue
        except (OSError, ValueError):
            continue  # a checkpoint whose state cannot be read is no match; _resumable names it for its own run
        found = _resumable(other)
        if found is not None and found.state.get("config_hash") == config_hash:
            log.warning(
                "resuming the unfinished run %s from %s (same config); training.resume=never starts fresh",
                other,
                found.checkpoint.name,
            )
            return found
    return None


def _resumable(run_dir: Path) -> Resume | None:
    if finished(run_dir):
        return None
    checkpoint = latest_valid(run_dir / "checkpoints")
    return None if checkpoint is None else Resume(checkpoint, run_dir, read_state(checkpoint))


def _run_folder_of(run_id: str, tracking_uri) -> str | None:
    """The run folder an MLflow run recorded (its medlora.run_dir tag)."""
    try:
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=tracking_uri).get_run(run_id).data.tags.get("medlora.run_dir")
    except Exception:  # noqa: BLE001 - no such run, or no server: the caller names the fix
        return None


def _named(resume_from: str, tracking_uri) -> Resume:
    if resume_from.startswith("runs:/"):
        run_id = resume_from.removeprefix("runs:/").strip("/").split("/")[0]
        folder = _run_folder_of(run_id, tracking_uri)
        if folder is None:
            raise MedloraError(
                f"training.resume_from={resume_from}: MLflow has no run folder for run {run_id} (or the server is "
                "out of reach): give the run's folder instead, e.g. training.resume_from=outputs/runs/<time>."
            )
        path = Path(folder)
    else:
        path = Path(resume_from)
    if (path / MANIFEST).is_file() or path.name.startswith("step_"):
        run_dir, at_most = path.parent.parent, int(path.name.removeprefix("step_")) if path.name[5:].isdigit() else None
        checkpoint = latest_valid(path.parent, at_most)
    else:
        run_dir, checkpoint = path, latest_valid(path / "checkpoints")
    if checkpoint is None:
        raise MedloraError(
            f"training.resume_from={resume_from} holds no valid checkpoint: give a run folder with a checkpoints/ "
            "folder, or a checkpoint such as outputs/runs/<time>/checkpoints/step_20."
        )
    state = read_state(checkpoint)
    if finished(run_dir):  # its results stay as they are
        log.info("%s finished: this run starts from its %s in a folder of its own", run_dir, checkpoint.name)
        return Resume(checkpoint, None, {**state, "run_id": None})
    return Resume(checkpoint, run_dir, state)


# --------------------------------------------------------------------------------------------
# stopping at a step boundary


class Stopped(Exception):
    """SIGTERM or SIGINT arrived; the run saved a checkpoint at the step boundary and stops."""

    def __init__(self, signum: int, step: int, checkpoint: Path):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        super().__init__(
            f"stopped by {name} at step {step}; checkpoint {checkpoint}. Run the same command again to "
            "resume (training.resume=auto), or training.resume=never to start over."
        )


class StopSignals:
    """The first SIGTERM / SIGINT asks for a stop at the next step boundary; a second Ctrl-C stops at once."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread (a launcher's worker): the default behaviour stays
                pass
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum
        log.warning(
            "%s received: saving a checkpoint after this step, then stopping (Ctrl-C again stops at once)",
            signal.Signals(signum).name,
        )
