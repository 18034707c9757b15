"""Checkpoints: one file per run, written atomically, read back with ``weights_only=True``."""

from __future__ import annotations

import math
import io
import zipfile
from pathlib import Path

import torch

from mqvae.errors import UserError
from mqvae.io.files import atomic_write

REQUIRED_KEYS = ("levels", "optimizers", "schedulers", "streams", "step", "rng")


def save_checkpoint(path: Path, state: dict) -> None:
    # Atomic (mqvae.io.files), so an interrupted or failed save never destroys the previous checkpoint. Serialized in
    # memory first: torch's zip writer turns a failed write (a full disk) into an unrelated RuntimeError.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(Path(path), lambda f: f.write(buffer.getbuffer()))


def non_finite_entries(state, prefix: str = "") -> list[str]:
    """Dotted names of the floating-point tensors in a nested state that hold NaN or inf."""
    if torch.is_tensor(state):
        return [prefix.rstrip(".")] if state.is_floating_point() and not torch.isfinite(state).all() else []
    if isinstance(state, dict):
        return [name for key, value in state.items() for name in non_finite_entries(value, f"{prefix}{key}.")]
    if isinstance(state, (list, tuple)):
        return [name for i, value in enumerate(state) for name in non_finite_entries(value, f"{prefix}{i}.")]
    return []


def load_checkpoint(path: Path, why: str = "--resume") -> dict:
    """The checkpoint at ``path``, with every entry ``LevelEngine.load_state_dict`` reads checked first; ``why``
    (what reads it: ``--resume``, ``prior.run``) starts the messages."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{why}: no checkpoint at {path}")
    damaged = _damaged_record(path)
    if damaged:
        raise UserError(f"{why}: {path} is damaged ({damaged} fails its checksum); it cannot be read")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds (pickle, zip, runtime) for a damaged file
        summary = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{why}: {path} is not a readable checkpoint ({summary})") from None
    try:
        _check_schema(state)
        _check_finite(state)
    except _Invalid as exc:
        raise UserError(f"{why}: {path} is not a valid checkpoint: {exc}") from None
    old_affine = _scale_bias_affine(state["levels"])
    if old_affine:
        raise UserError(f"{why}: {path} holds a learned affine map as scale and bias ('levels.{old_affine}.scale'), "
                        "which predates Huh A.1's parameterization (scale = 1 + affine_lr * s, bias = affine_lr * t) "
                        "that this version trains; it cannot be resumed or loaded")
    return state


def _scale_bias_affine(levels: dict) -> str | None:
    """The dotted name (level.module) of a learned affine map saved as parameters scale and bias, the form before
    Huh A.1's s and t (quantizers/affine.py), or None. Both names, so that a layer called affine with a weight and
    a bias is not taken for one; the EMA map's state (running_*) has neither."""
    for level, tensors in levels.items():
        for key in tensors:
            if key == "affine.scale" or key.endswith(".affine.scale"):
                prefix = key[: -len("scale")]
                if prefix + "bias" in tensors:
                    return f"{level}.{prefix[:-1]}"
    return None


def _damaged_record(path: Path) -> str | None:
    """The first record of the checkpoint's zip archive whose CRC-32 does not match (torch.load checks none, so a
    flipped bit in a weight would load silently); None when all match or the file is no zip (torch.load says so)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip()
    except (zipfile.BadZipFile, OSError, ValueError):
        return None


class _Invalid(Exception):
    """What is wrong with a loaded checkpoint, worded to follow 'is not a valid checkpoint: '."""


def _expect(condition: bool, what: str) -> None:
    if not condition:
        raise _Invalid(what)


def _shown(value) -> str:
    # Never the repr of a container or tensor: it may be huge and span lines.
    if torch.is_tensor(value):
        return f"a {value.dtype} tensor"
    if value is None or isinstance(value, (bool, int, float, str)):
        text = repr(value)
        return text if len(text) <= 40 else text[:37] + "..."
    return f"a {type(value).__name__}"


def _named_dicts(value, name: str) -> dict:
    """``value`` checked to map names (str) to dicts, as every per-level section does."""
    _expect(isinstance(value, dict), f"'{name}' is {_shown(value)}, not a dict")
    for key, entry in value.items():
        _expect(isinstance(key, str), f"'{name}' has key {_shown(key)}, not a level name")
        _expect(isinstance(entry, dict), f"'{name}.{key}' is {_shown(entry)}, not a dict")
    return value


# Counters beyond 2^40 are no real run's (a stream's epoch also seeds a 64-bit generator with seed * 100003 + epoch).
COUNT_LIMIT = 2**40


def _count(value, name: str) -> None:
    # bool is an int subclass, but True is no iteration count.
    ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value < COUNT_LIMIT
    _expect(ok, f"'{name}' is {_shown(value)}, not a non-negative integer below 2^40")


def _check_schema(state) -> None:
    _expect(isinstance(state, dict), f"it holds {_shown(state)}, not a dict")
    for key in REQUIRED_KEYS:
        _expect(key in state, f"'{key}' is missing")
    for name, tensors in _named_dicts(state["levels"], "levels").items():
        for key, value in tensors.items():
            _expect(isinstance(key, str), f"'levels.{name}' has key {_shown(key)}, not a parameter name")
            _expect(torch.is_tensor(value), f"'levels.{name}.{key}' is {_shown(value)}, not a tensor")
    for name, optimizer in _named_dicts(state["optimizers"], "optimizers").items():
        for key, kind in (("state", dict), ("param_groups", list)):
            _expect(key in optimizer, f"'optimizers.{name}.{key}' is missing")
            _expect(isinstance(optimizer[key], kind),
                    f"'optimizers.{name}.{key}' is {_shown(optimizer[key])}, not a {kind.__name__}")
        for index, entry in optimizer["state"].items():
            # Adam's bias correction divides by 1 - beta^step: a negative or fractional step makes every update NaN.
            step = entry.get("step") if isinstance(entry, dict) else None
            value = step.item() if torch.is_tensor(step) and step.numel() == 1 else step
            _expect(step is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
                                     and float(value).is_integer()),
                    f"'optimizers.{name}.state.{index}.step' is {_shown(step)}, not a non-negative count")
    _named_dicts(state["schedulers"], "schedulers")
    for name, stream in _named_dicts(state["streams"], "streams").items():
        for key in ("epoch", "position"):
            _expect(key in stream, f"'streams.{name}.{key}' is missing")
            _count(stream[key], f"streams.{name}.{key}")
    _count(state["step"], "step")
    if "progress" in state:  # (absent from checkpoints written before it was saved)
        for name, progress in _named_dicts(state["progress"], "progress").items():
            _check_progress(progress, f"progress.{name}")
    if "train_time" in state:
        seconds = state["train_time"]
        ok = isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and math.isfinite(seconds)
        _expect(ok, f"'train_time' is {_shown(seconds)}, not a finite number of seconds")
    _check_rng(state["rng"])
    if "world_size" in state:  # data-parallel ranks it was trained with (absent: one process)
        _count(state["world_size"], "world_size")
        _expect(state["world_size"] >= 1, "'world_size' is 0, not a number of ranks")


def _check_progress(progress: dict, name: str) -> None:
    for key in ("count", "grads", "last_stats", "hypergradient_terms"):
        _expect(key in progress, f"'{name}.{key}' is missing")
    _count(progress["count"], f"{name}.count")
    _expect(isinstance(progress["last_stats"], dict), f"'{name}.last_stats' is {_shown(progress['last_stats'])}, not a dict")
    for key, value in progress["last_stats"].items():
        _expect(isinstance(key, str) and torch.is_tensor(value),
                f"'{name}.last_stats' has {_shown(key)}: {_shown(value)}, not a name and a tensor")
    _tensor_list(progress["grads"], f"{name}.grads")
    learned = progress.get("learned")  # (absent from checkpoints written before it was saved)
    _expect(learned is None or (isinstance(learned, list) and all(isinstance(key, str) for key in learned)),
            f"'{name}.learned' is {_shown(learned)}, not a list of names")
    terms = progress["hypergradient_terms"]
    if terms is not None:
        _expect(isinstance(terms, dict), f"'{name}.hypergradient_terms' is {_shown(terms)}, not a dict")
        for key in ("direct", "implicit"):
            _expect(key in terms, f"'{name}.hypergradient_terms.{key}' is missing")
            _tensor_list(terms[key], f"{name}.hypergradient_terms.{key}")


def _tensor_list(value, name: str) -> None:
    _expect(isinstance(value, list), f"'{name}' is {_shown(value)}, not a list")
    for i, entry in enumerate(value):
        _expect(entry is None or torch.is_tensor(entry), f"'{name}.{i}' is {_shown(entry)}, not a tensor or None")


def _check_rng(rng) -> None:
    _expect(isinstance(rng, dict), f"'rng' is {_shown(rng)}, not a dict")
    _expect("torch" in rng, "'rng.torch' is missing")
    _expect(torch.is_tensor(rng["torch"]) and rng["torch"].dtype == torch.uint8,
            f"'rng.torch' is {_shown(rng['torch'])}, not a torch.uint8 tensor")
    try:
        # A scratch generator: the check must not move the global RNG.
        torch.Generator().set_state(rng["torch"])
    except RuntimeError as exc:
        raise _Invalid(f"'rng.torch' is not a CPU generator state ({str(exc).splitlines()[0][:120]})") from None
    if "cuda" in rng:
        cuda = rng["cuda"]
        _expect(isinstance(cuda, list), f"'rng.cuda' is {_shown(cuda)}, not a list")
        for i, device_state in enumerate(cuda):
            _expect(torch.is_tensor(device_state) and device_state.dtype == torch.uint8,
                    f"'rng.cuda.{i}' is {_shown(device_state)}, not a torch.uint8 tensor")


def _check_finite(state: dict) -> None:
    # Training from NaN weights or moments only yields NaN; save() never writes such a state.
    bad = non_finite_entries(state)
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise _Invalid(f"'{bad[0]}' holds NaN or infinite values{more}; it cannot be resumed")


def keep_run_settings(loaded: list[dict], built: list[dict]) -> None:
    """After ``optimizer.load_state_dict``: put back in each param group what belongs to this run's mode rather than
    to the training state, as the config built it. ``capturable`` (on under perf.cuda_graphs, on CUDA), and the lr's
    form: under perf.cuda_graphs a device tensor that the level's DeviceSchedule refills, which must stay the tensor
    the optimizer reads (set to the loaded value); in eager mode a number. So a checkpoint resumes in either mode."""
    for group, fresh in zip(loaded, built):
        if "capturable" in fresh:
            group["capturable"] = fresh["capturable"]
        lr = group.get("lr")
        if torch.is_tensor(lr) and lr.numel() == 1:
            lr = float(lr)
        if not (isinstance(lr, (int, float)) and not isinstance(lr, bool) and math.isfinite(lr)):
            continue  # (a damaged value: check_hyperparameters names it)
        if torch.is_tensor(fresh.get("lr")):
            fresh["lr"].fill_(lr)
            group["lr"] = fresh["lr"]
        else:
            group["lr"] = lr


def check_hyperparameters(loaded: list[dict], built: list[dict], where: str) -> None:
    """A loaded optimizer's param_groups against those the config built: each hyperparameter is of the same kind
    (a finite number, a tuple of as many, a flag), so a damaged value stops here and not inside a later step."""
    if len(loaded) != len(built):
        raise UserError(f"--resume: {where} holds {len(loaded)} optimizer parameter groups, the config builds {len(built)}")
    for group, fresh in zip(loaded, built):
        for key, value in fresh.items():
            if key != "params" and not _same_kind(group.get(key), value):
                raise UserError(f"--resume: {where} is not a valid checkpoint: optimizer hyperparameter '{key}' is "
                                f"{_shown(group.get(key))}, expected one like {_shown(value)}")


def _same_kind(value, like) -> bool:
    if isinstance(like, bool) or like is None:
        return type(value) is type(like)
    if isinstance(like, (int, float)):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if isinstance(like, (tuple, list)):
        return isinstance(value, (tuple, list)) and len(value) == len(like) and all(map(_same_kind, value, like))
    if torch.is_tensor(like):
        return torch.is_tensor(value) and value.shape == like.shape
    return type(value) is type(like)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
