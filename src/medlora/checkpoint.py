"""What a run writes to keep: the adapter, and checkpoints a run can resume from exactly.

A checkpoint holds the adapter weights, the optimizer and scheduler state, the RNG state and the
step; resuming restores all four and places the data sampler where the step left it
(LoraRecipe.train), so a resumed run sees the same batches as one that never stopped.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file

from medlora.config import MedloraError
from medlora.files import save_folder

log = logging.getLogger(__name__)

STATE = "trainer_state.json"


def save_adapter(model, tokenizer, target: Path) -> Path:
    def save(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)  # carries the chat template the adapter was trained with

    return save_folder(target, save)


def save_checkpoint(model, optimizer, scheduler, target: Path, step: int) -> Path:
    """`model` unwrapped (accelerate's wrapper off), so the folder loads like any peft adapter."""

    def save(folder: Path) -> None:
        model.save_pretrained(folder)
        torch.save(
            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state()},
            folder / "training_state.pt",
        )
        (folder / STATE).write_text(json.dumps({"step": step}))

    save_folder(target, save)
    log.info("checkpoint saved to %s", target)
    return target


def load_checkpoint(folder: str | Path, model, optimizer, scheduler) -> int:
    """Restore a checkpoint into the prepared model, optimizer and scheduler; return its step."""
    folder = Path(folder)
    if not (folder / STATE).is_file():
        raise MedloraError(
            f"training.resume_from={folder} is not a checkpoint (no {STATE}): give a "
            "folder such as outputs/runs/<time>/checkpoints/step_20."
        )
    set_peft_model_state_dict(model, load_file(folder / "adapter_model.safetensors"))
    state = torch.load(folder / "training_state.pt", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    step = json.loads((folder / STATE).read_text())["step"]
    log.info("resumed from %s at step %d", folder, step)
    return step
