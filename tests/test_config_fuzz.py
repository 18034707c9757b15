"""Property tests: however a shipped config is mangled, loading it succeeds or raises a one-line UserError."""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import operator
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mqvae import config as config_module
from mqvae.config import config_from_dict, load_config, read_yaml
from mqvae.errors import UserError
from mqvae.evaluation.comparison import expand, is_sweep_file, load_sweep

ROOT = Path(__file__).resolve().parents[1]
FILES = {str(path.relative_to(ROOT)): read_yaml(path) for path in sorted((ROOT / "configs").rglob("*.yaml"))}
EXPERIMENTS = {name: data for name, data in FILES.items() if "sweep" not in data}
SWEEPS = {name: data for name, data in FILES.items() if "sweep" in data}
# Every key name a config section has, so that a renamed or added key is often a real one in the wrong place.
KEY_NAMES = sorted({f.name for cls in (config_module.Config, config_module.DataConfig, config_module.ModelConfig,
                                       config_module.QuantizerConfig, config_module.LevelConfig,
                                       config_module.HypergradientConfig, config_module.TrainConfig,
                                       config_module.EvalConfig, config_module.PerfConfig) for f in dataclasses.fields(cls)}
              | {"sweep", "runs"})

KEYS = st.one_of(st.sampled_from(KEY_NAMES), st.text(max_size=12), st.integers(-3, 3), st.none(), st.booleans())
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(),
    st.sampled_from([2**63, -2**63, 2**63 - 1, 2**64, 2**32, 10**400, -1, 0, 1, 0.5, float("nan"), float("inf")]),
    st.sampled_from(["nan", "inf", "-inf", "1e400", "1e-4", "", "auto", "vq", "gumbel", "adam", "VQVAE", "codebook",
                     "levels.0", "!!python/object/apply:os.system", "a\nb"]),
    st.text(max_size=20),
)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4),
                      max_leaves=10)
MUTATIONS = ("replace", "retype", "delete", "rename", "add", "nest")
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def places(node, path=()):
    """The path of every value below ``node`` (dict keys and list positions)."""
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in children:
        yield path + (key,)
        yield from places(child, path + (key,))


def retyped(value, draw):
    """The same value as another type: a string, a number, a list, a mapping, a bool."""
    options = [str(value)[:50], [value], {"value": value}, not value]
    if isinstance(value, int) and not isinstance(value, bool):
        options += [-value, value + 0.5 if abs(value) < 2**53 else 0.5]
    if isinstance(value, float) and math.isfinite(value):
        options += [-value, int(value)]
    return draw(st.sampled_from(options))


def mutate(data: dict, draw) -> None:
    """One random change, in place: replace or retype a value, delete, rename or add a key, nest a value deeper."""
    paths = list(places(data))
    operation = draw(st.sampled_from(MUTATIONS))
    if operation == "add" or not paths:
        path = draw(st.sampled_from([()] + paths))
        node = functools.reduce(operator.getitem, path, data)
        if isinstance(node, dict):
            node[draw(KEYS)] = draw(VALUES)
        elif isinstance(node, list):
            node.insert(draw(st.integers(0, len(node))), draw(VALUES))
        return
    path = draw(st.sampled_from(paths))
    parent, key = functools.reduce(operator.getitem, path[:-1], data), path[-1]
    if operation == "replace":
        parent[key] = draw(VALUES)
    elif operation == "retype":
        parent[key] = retyped(parent[key], draw)
    elif operation == "delete":
        del parent[key]
    elif operation == "rename" and isinstance(parent, dict):
        parent[draw(KEYS)] = parent.pop(key)
    elif operation == "nest":
        parent[key] = draw(st.sampled_from([[parent[key]], {"value": parent[key]}, {key: parent[key]}]))


def mutated(data: dict, draw) -> dict:
    data = copy.deepcopy(data)
    for _ in range(draw(st.integers(1, 4))):
        mutate(data, draw)
    return data


def loads_or_fails_in_one_line(load) -> None:
    message = user_error_of(load)
    assert "\n" not in message and len(message) < 1000, message


def user_error_of(load) -> str:
    """The message of the UserError ``load()`` raises, or "" when it succeeds; any other exception fails the test."""
    try:
        load()
    except UserError as exc:
        return str(exc)
    return ""


@FUZZ
@given(st.sampled_from(sorted(EXPERIMENTS)), st.data())
def test_mutated_experiment_configs(name, data):
    config = mutated(EXPERIMENTS[name], data.draw)
    loads_or_fails_in_one_line(lambda: config_from_dict(config, "fuzz.yaml"))


@FUZZ
@given(st.sampled_from(sorted(EXPERIMENTS)), st.data())
def test_random_overrides(name, data):
    paths = [".".join(map(str, path)) for path in places(EXPERIMENTS[name])]
    key = data.draw(st.sampled_from(paths) | st.text(max_size=12) | st.builds("{}.{}".format, st.sampled_from(paths), KEYS))
    value = data.draw(st.builds(lambda v: yaml.safe_dump(v, default_flow_style=True, sort_keys=False).strip(), VALUES) | st.text(max_size=20))
    override = data.draw(st.sampled_from([f"{key}={value}", key, f"{key}=", f"={value}"]))
    loads_or_fails_in_one_line(lambda: config_from_dict(EXPERIMENTS[name], "fuzz.yaml", [override]))


@settings(FUZZ, max_examples=40)
@given(st.sampled_from(sorted(EXPERIMENTS)), st.data())
def test_mutated_experiment_files(name, data):
    config = mutated(EXPERIMENTS[name], data.draw)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder, "fuzz.yaml")
        path.write_text(yaml.safe_dump(config, allow_unicode=True, sort_keys=False), encoding="utf-8")
        loads_or_fails_in_one_line(lambda: load_config(path))


@settings(FUZZ, max_examples=40)
@given(st.sampled_from(sorted(SWEEPS)), st.data())
def test_mutated_sweep_files(name, data):
    sweep = mutated(SWEEPS[name], data.draw)

    def load_as_run_py_does():
        if not is_sweep_file(read_yaml(path)):
            load_config(path)
            return
        for run in expand(load_sweep(path), Path(folder, "runs"))[:3]:
            load_config(run.config, run.overrides)

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder, "fuzz.yaml")
        path.write_text(yaml.safe_dump(sweep, allow_unicode=True, sort_keys=False), encoding="utf-8")
        loads_or_fails_in_one_line(load_as_run_py_does)


# Pieces of YAML syntax, so that random texts reach the parser's corners rather than only its first check.
YAML_PIECES = st.sampled_from(["[", "]", "{", "}", ":", ": ", "- ", ",", "\n", "  ", "&a ", "*a", "<<: ", "!!", "!!int ",
                               "!!bool ", "!!timestamp ", "!!binary ", "!!python/object:os.system ", "? ", "|", ">", "'",
                               '"', "#", "---\n", "...", "%YAML 1.1\n", ".nan", "1e400", "seed", "levels", "\t", "\x00",
                               "9" * 5000, "2020-13-45"])
TEXTS = st.one_of(st.text(max_size=200), st.lists(YAML_PIECES | st.text(max_size=5), max_size=40).map("".join))


@settings(FUZZ, max_examples=300)
@given(st.one_of(st.binary(max_size=200), TEXTS))
def test_random_bytes_and_text(content):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder, "fuzz.yaml")
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        loads_or_fails_in_one_line(lambda: read_yaml(path))
        loads_or_fails_in_one_line(lambda: load_config(path))


def test_the_fuzzed_files_are_all_there():
    assert len(EXPERIMENTS) > 20 and len(SWEEPS) >= 4
