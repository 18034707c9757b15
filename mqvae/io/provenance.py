"""What made a run: the versions, the device, the thread count, the code's commit and the start time.

The thread count is part of it because it changes the numbers: float sums run in another order with another number
of intra-op threads, so one seed's trajectory differs (README, Reproducing a number). ``config.yaml``'s header and
``metrics.json`` record it. The code's folder is given by the caller (``run.py`` gives its own; library code never
locates the repository).
"""

from __future__ import annotations

import datetime
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import torch

_CODE: Path | None = None


def set_code_folder(folder: Path | None) -> None:
    """The folder whose git commit runs record (``run.py``'s); None: runs record no commit."""
    global _CODE
    _CODE = None if folder is None else Path(folder)


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(_CODE), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def code_commit() -> dict:
    """``commit`` and ``dirty`` (tracked files changed since it) of the code folder, or null with the reason."""
    if _CODE is None:
        return {"commit": None, "commit_reason": "no code folder was given (the toolkit used as a library)"}
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "commit_reason": f"{_CODE} is not a git checkout, or git is not installed"}
    return {"commit": commit, "dirty": bool(_git("status", "--porcelain", "--untracked-files=no"))}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


def provenance(device: torch.device) -> dict:
    """This process's provenance, read now (after ``threads`` was applied)."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "betty": _version("betty-ml"),
        "device": device_name(device),
        "threads": torch.get_num_threads(),
        **code_commit(),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
