"""Experiment configuration: YAML -> typed dataclasses, validated once at load.

Every key of a config file is a field below; the field name is also the
attribute the code reads and the key the logs write (one concept, one name).
Validation happens here and only here, so the rest of the toolkit can trust
its inputs. Any problem is a ``UserError`` whose one-line message names the
file, the key and what is allowed.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .errors import UserError


def spec(default=dataclasses.MISSING, *, choices=None, min=None, max=None, above=None, factory=None):
    """A dataclass field with its allowed values: ``choices``, ``min``/``max`` (inclusive), ``above`` (exclusive)."""
    meta = {"choices": choices, "min": min, "max": max, "above": above}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    name: str = "digits"
    root: str = "data"
    download: bool = False
    batch_size: int = spec(64, min=1)
    num_workers: int = spec(0, min=0)
    # Fraction of the training split held out for levels with ``data: holdout``.
    holdout_fraction: float = spec(0.1, above=0.0, max=0.9)


@dataclass
class ModelConfig:
    # ``vqvae``: van den Oord et al.'s backbone for reconstruction;
    # ``resnet18``: torchvision ResNet-18 quantized after layer2 for classification (Huh §5.1).
    kind: str = spec("vqvae", choices=["vqvae", "resnet18"])
    hidden_channels: int = spec(64, min=1)
    res_channels: int = spec(32, min=1)
    num_res_blocks: int = spec(2, min=0)
    # Number of stride-2 convolutions in the encoder (and transposed ones in the decoder).
    downsample: int = spec(2, min=1, max=5)
    norm: str = spec("none", choices=["none", "batch"])


@dataclass
class QuantizerConfig:
    kind: str = spec("vq", choices=["vq", "gumbel"])
    num_codes: int = spec(128, min=1)
    dim: int = spec(32, min=1)
    # MQ-VAE Eq. 6: L = L_task + beta * L_commit + codebook_weight * L_codebook (both terms are MSEs).
    # Huh et al.'s Eq. 8-10, L_task + alpha * [(1 - b) * d(z_e, sg[z_q]) + b * d(sg[z_e], z_q)] (their b
    # weights the codebook side), is beta = alpha * (1 - b), codebook_weight = alpha * b; e.g. their
    # ResNet-18 alpha = 5, b = 0.98 -> beta = 0.1, codebook_weight = 4.9. (With their d = ½‖·‖² summed
    # over D instead of an MSE, multiply both by D/2.)
    beta: float = spec(0.25, min=0.0)
    codebook_weight: float = spec(1.0, min=0.0)
    # Huh et al.'s synchronized update (Eq. 21): the codebook also receives sync_nu * dL_task/dz_q.
    sync_nu: float = spec(0.0, min=0.0)
    # Huh et al.'s affine re-parameterization (§4.1): none, learned scale/bias, or running statistics.
    affine: str = spec("none", choices=["none", "learned", "ema"])
    affine_lr: float = spec(1.0, above=0.0)
    affine_groups: int = spec(1, min=1)
    # Momentum m of the running-statistics variant, Huh Eq. 38-45 (new = m * batch + (1 - m) * old).
    affine_momentum: float = spec(0.1, min=0.0, max=1.0)
    # Dead-code (LRU) replacement: a code idle for replace_freq iterations is re-seeded (0 = off).
    replace_freq: int = spec(0, min=0)
    # k-means init of the codes from encoder outputs before training (Huh §3.2; MQ-VAE §5.1 uses it for every
    # model, and every shipped config but Gumbel-VQ's sets it). Off here so that a Gumbel-VQ config, whose
    # codes are not found by distance, needs no key to turn it off.
    kmeans_init: bool = False
    kmeans_iters: int = spec(10, min=0)
    # l2-normalized inputs and codes, cosine search, losses on the normalized vectors (Yu et al.; Huh Table 3).
    l2: bool = False
    # Grouped latents: each D-vector is split into `groups` sub-vectors of dim/groups, each quantized against
    # its own slice of num_codes/groups codes (num_codes counts all codes; indices are global).
    groups: int = spec(1, min=1)
    # Nearest-neighbour search: distance entries per chunk, and the matmul precision (Huh A.1).
    # Most distance entries the nearest-code search holds at once; null = the device's default (search.py).
    search_chunk: Optional[int] = spec(None, min=1)
    search_precision: str = spec("fp32", choices=["fp32", "fp16", "bf16"])
    # Gumbel-VQ (Karpathy): softmax temperature and weight of the KL-to-uniform term.
    gumbel_temperature: float = spec(1.0, above=0.0)
    gumbel_kl_weight: float = spec(5e-4, min=0.0)


@dataclass
class LevelConfig:
    name: str = spec(dataclasses.MISSING)
    # Name of a registered Problem class (problems.PROBLEMS), e.g. Codebook, AutoEncoder, VQVAE.
    problem: str = spec(dataclasses.MISSING)
    optimizer: str = spec("adam", choices=["adam", "adamw", "sgd"])
    lr: float = spec(1e-3, above=0.0)
    weight_decay: float = spec(0.0, min=0.0)
    momentum: float = spec(0.0, min=0.0, max=1.0)
    scheduler: str = spec("constant", choices=["constant", "cosine", "warmup_cosine"])
    warmup_ratio: float = spec(0.1, min=0.0, max=1.0)
    grad_clip: float = spec(0.0, min=0.0)
    # Names of the levels directly below this one (Betty's u2l edges; l2u is their reverse).
    lower: list[str] = spec(factory=list)
    # Which batches the level trains on: its own draw from the training split, the batch of the
    # level below it (MQ-VAE uses one data set for both levels, §4.1), or a held-out split.
    data: str = spec("auto", choices=["auto", "train", "shared", "holdout"])


@dataclass
class HypergradientConfig:
    # mqvae: Eq. 13 as written; direct: no implicit term; the rest are Betty's own methods.
    type: str = spec("mqvae", choices=["mqvae", "direct", "darts", "neumann", "cg", "sama"])
    # Eq. 10's xi; null means the lower level's learning rate (the paper's choice). 0 = alternated optimization.
    xi: Optional[float] = spec(None, min=0.0)
    # Finite-difference radius: eps = alpha / ||v|| (Eq. 13, as in DARTS).
    alpha: float = spec(0.01, above=0.0)
    # Algorithm 1 lines 3-5: undo the tentative lower step and redo it with the updated codebook.
    roll_back: bool = False


@dataclass
class TrainConfig:
    iters: int = spec(1000, min=1)
    log_every: int = spec(10, min=1)
    # Evaluate on the test set every eval_every iterations (0 = only at the end).
    eval_every: int = spec(0, min=0)
    checkpoint_every: int = spec(0, min=0)


@dataclass
class PerfConfig:
    channels_last: bool = True
    cudnn_benchmark: bool = True
    bf16: bool = False
    compile: bool = False


@dataclass
class Config:
    seed: int = spec(0, min=0)
    device: str = spec("auto", choices=["auto", "cpu", "cuda"])
    data: DataConfig = spec(factory=DataConfig)
    model: ModelConfig = spec(factory=ModelConfig)
    quantizer: QuantizerConfig = spec(factory=QuantizerConfig)
    levels: list[LevelConfig] = spec(factory=list)
    hypergradient: HypergradientConfig = spec(factory=HypergradientConfig)
    train: TrainConfig = spec(factory=TrainConfig)
    perf: PerfConfig = spec(factory=PerfConfig)

    def level(self, name: str) -> LevelConfig:
        return next(level for level in self.levels if level.name == name)


# ---------------------------------------------------------------------------------------------
# Building dataclasses from plain data, with one-line errors.


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _convert(value, tp, where: str, path: str):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(value, args[0], where, path)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise UserError(f"{where}: {path}: expected a list, got {value!r}")
        return [_convert(v, item_tp, where, f"{path}.{i}") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"{where}: {path}: expected a mapping of {_type_name(tp)} keys, got {value!r}")
        return build(tp, value, where, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"{where}: {path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{where}: {path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # PyYAML reads 1e-4 (no dot) as a string (YAML 1.1); accept what any reader would call a number.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{where}: {path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise UserError(f"{where}: {path}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config field type {tp!r} at {path}")


def _check_range(value, meta: dict, where: str, path: str) -> None:
    if value is None:
        return
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise UserError(f"{where}: {path}: {value!r} is not allowed; choose one of {', '.join(map(str, choices))}")
    low, high, above = meta.get("min"), meta.get("max"), meta.get("above")
    if low is not None and value < low:
        raise UserError(f"{where}: {path}: {value!r} is below the minimum {low}")
    if high is not None and value > high:
        raise UserError(f"{where}: {path}: {value!r} is above the maximum {high}")
    if above is not None and value <= above:
        raise UserError(f"{where}: {path}: {value!r} must be greater than {above}")


def build(cls, data: dict, where: str, prefix: str = ""):
    """Make ``cls`` from a mapping, rejecting unknown keys (with the nearest valid one) and bad values."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            path = f"{prefix}.{key}" if prefix else str(key)
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise UserError(f"{where}: {path}: unknown key; {hint}(valid keys: {', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        path = f"{prefix}.{name}" if prefix else name
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise UserError(f"{where}: {path}: required key is missing")
            continue
        value = _convert(data[name], hints[name], where, path)
        _check_range(value, f.metadata, where, path)
        kwargs[name] = value
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _validate(cfg: Config, where: str) -> None:
    """Checks that span several keys."""
    names = [level.name for level in cfg.levels]
    if not names:
        raise UserError(f"{where}: levels: at least one level is required")
    if len(set(names)) != len(names):
        raise UserError(f"{where}: levels: level names must be unique, got {names}")
    for i, level in enumerate(cfg.levels):
        for lower in level.lower:
            if lower not in names or lower == level.name:
                raise UserError(f"{where}: levels.{i}.lower: '{lower}' is not another level (levels: {', '.join(names)})")
    if cfg.hypergradient.roll_back and cfg.hypergradient.xi == 0:
        raise UserError(f"{where}: hypergradient.roll_back: needs xi > 0 (with xi = 0 there is no tentative lower step to roll back)")
    if cfg.quantizer.dim % cfg.quantizer.groups:
        raise UserError(f"{where}: quantizer.groups: {cfg.quantizer.groups} does not divide quantizer.dim = {cfg.quantizer.dim}")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], value parsed as YAML)."""
    if "=" not in text:
        raise UserError(f"--set {text}: expected KEY=VALUE, e.g. --set train.iters=100")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw)


def _apply_override(data: dict, keys: list[str], value, where: str) -> None:
    node = data
    for i, key in enumerate(keys[:-1]):
        if isinstance(node, list):
            node = _list_item(node, key, where, keys[: i + 1])
        else:
            node = node.setdefault(key, {})
    last = keys[-1]
    if isinstance(node, list):
        index = _list_index(node, last, where, keys)
        node[index] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise UserError(f"{where}: --set {'.'.join(keys)}: '{'.'.join(keys[:-1])}' is not a section")


def _list_index(items: list, key: str, where: str, keys: list[str]) -> int:
    """Levels are addressed by position (``levels.0.lr``) or by name (``levels.codebook.lr``)."""
    if key.isdigit() and int(key) < len(items):
        return int(key)
    for i, item in enumerate(items):
        if isinstance(item, dict) and item.get("name") == key:
            return i
    raise UserError(f"{where}: --set {'.'.join(keys)}: no list item '{key}'")


def _list_item(items: list, key: str, where: str, keys: list[str]):
    return items[_list_index(items, key, where, keys)]


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}: not valid YAML{line}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of config keys at the top level")
    return data


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read a YAML experiment file, apply ``--set`` overrides, validate, and return the typed config."""
    data = read_yaml(path)
    return config_from_dict(data, str(path), overrides)


def config_from_dict(data: dict, where: str, overrides: list[str] = ()) -> Config:
    data = copy.deepcopy(data)
    for text in overrides:
        keys, value = parse_override(text)
        _apply_override(data, keys, value, where)
    cfg = build(Config, data, where)
    _validate(cfg, where)
    return cfg
