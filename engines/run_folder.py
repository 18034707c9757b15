"""What a run folder holds and who may write it: one run per folder, its resolved config and that config's hash.

- A new run refuses a folder that holds another run unless asked to replace it (``--overwrite``).
- ``config.yaml`` is the resolved config (every key, defaults filled in); its first line is the sha256 of
  that mapping, which ``metrics.json`` repeats as ``config_sha256``, and its second what made the run
  (``mqvae.io.provenance``: versions, device, threads, commit, start time).
- ``--resume`` continues the run from its own ``config.yaml``; only ``RESUMABLE_KEYS`` may change.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import yaml

from mqvae.config import Config, config_from_dict, read_config, read_yaml, to_dict
from mqvae.errors import UserError
from mqvae.io.files import write_text
from mqvae.io.tracking import EVENT_FILES

RUN_FILES = ("config.yaml", "log.jsonl", "checkpoint.pt", "metrics.json", "recon.png", "samples.png", "curves.png",
             "codebook.png", "report.md")
# Extending a run, its logging, evaluation and checkpoint intervals, its TensorBoard logging, the device, where its
# batches are gathered, what the final evaluation measures and how its ranks talk leave what was trained valid.
RESUMABLE_KEYS = ("train.iters", "train.log_every", "train.eval_every", "train.checkpoint_every", "logging.tensorboard",
                  "device", "data.on_device", "threads", "eval.image_quality", "eval.download_weights", "distributed.backend", "distributed.timeout_s")


def check_folder(run_dir: Path) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir}: is a file, not a run folder; name a folder with --out")


def run_files(run_dir: Path) -> list[str]:
    """The run files ``run_dir`` holds: RUN_FILES, and TensorBoard's event files (a new name per writer)."""
    events = sorted(path.name for path in run_dir.glob(EVENT_FILES)) if run_dir.is_dir() else []
    return [name for name in RUN_FILES if (run_dir / name).exists()] + events


def claim(run_dir: Path, overwrite: bool) -> None:
    """Make ``run_dir`` ready for a new run: refuse one that holds another run, or clear it when ``overwrite``."""
    present = run_files(run_dir)
    if present and not overwrite:
        raise UserError(f"{run_dir}: holds another run ({', '.join(present)}); continue it with --resume {run_dir}, "
                        "replace it with --overwrite, or name another folder with --out")
    for name in present:
        (run_dir / name).unlink()


def config_sha256(cfg: Config) -> str:
    canonical = json.dumps(to_dict(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def write_config(run_dir: Path, cfg: Config, provenance: dict | None = None) -> None:
    header = f"# config_sha256: {config_sha256(cfg)} (sha256 of this mapping as canonical JSON)\n"
    if provenance is not None:  # what made the run (mqvae.io.provenance), a comment: not part of the config
        header += f"# provenance: {json.dumps(provenance)}\n"
    write_text(run_dir / "config.yaml", header + yaml.safe_dump(to_dict(cfg), sort_keys=False))


def saved_config(run_dir: Path) -> dict | None:
    """The resolved config a run folder was started with, or None when it has none that reads back."""
    try:
        data = read_yaml(run_dir / "config.yaml")
    except UserError:
        return None
    return data


def resume_config(run_dir: Path, overrides: list[str] = (), config_path: Path | None = None,
                  imports: list[str] = ()) -> Config:
    """The config of a run being resumed: the folder's own (whose ``imports`` are imported again), with ``--set``
    (or an explicitly named config file) allowed to change only ``RESUMABLE_KEYS``."""
    where = str(run_dir / "config.yaml")
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"--resume: {run_dir} holds no config.yaml, so it is not a run folder to resume")
    saved = config_from_dict(read_yaml(run_dir / "config.yaml"), where)
    if config_path is not None:
        cfg = config_from_dict(read_config(config_path), str(config_path), overrides, imports)
    else:
        cfg = config_from_dict(to_dict(saved), where, overrides, imports)
    changed = [key for key in differing_keys(to_dict(saved), to_dict(cfg)) if key not in RESUMABLE_KEYS]
    if changed:
        shown = ", ".join(changed[:10]) + (f" and {len(changed) - 10} more" if len(changed) > 10 else "")
        raise UserError(f"--resume: {run_dir} was trained with other values of {shown}; on resume only "
                        f"{', '.join(RESUMABLE_KEYS)} may change (start a new run with --out for the others)")
    return cfg


def differing_keys(old, new, prefix: str = "") -> list[str]:
    """Dotted paths where two resolved configs differ (levels are addressed by their name)."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = list(old) + [k for k in new if k not in old]
        return [path for k in keys for path in differing_keys(old.get(k), new.get(k), f"{prefix}{k}.")]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new) and prefix == "levels.":
        return [path for a, b in zip(old, new) for path in differing_keys(a, b, f"{prefix}{a.get('name')}.")]
    return [] if old == new else [prefix.rstrip(".")]
