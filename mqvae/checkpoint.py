"""Checkpoints: one file per run, written atomically, read back with ``weights_only=True``."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import UserError

REQUIRED_KEYS = ("levels", "optimizers", "schedulers", "streams", "step", "rng")


def save_checkpoint(path: Path, state: dict) -> None:
    # Write then rename, so an interrupted save never destroys the previous checkpoint.
    tmp = Path(path).with_suffix(".pt.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--resume: no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds (pickle, zip, runtime) for a damaged file
        summary = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        raise UserError(f"--resume: {path} is not a readable checkpoint ({summary})") from None
    if not isinstance(state, dict) or any(key not in state for key in REQUIRED_KEYS):
        raise UserError(f"--resume: {path} is not an MQ-VAE toolkit checkpoint (expected keys: {', '.join(REQUIRED_KEYS)})")
    return state


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
