"""Config loading: typed, validated once, one-line errors; overrides; device choice; run folder names."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import torch

import run
from engines.experiment import resolve_device
from mqvae.config import config_from_dict, load_config, read_yaml
from mqvae.errors import UserError
from mqvae.evaluation.comparison import load_sweep

from helpers import is_base_config

ROOT = Path(__file__).resolve().parents[1]
LEVEL = [{"name": "vqvae", "problem": "VQVAE"}]


def test_shipped_configs_load():
    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        if is_base_config(path):
            continue  # tests/test_config_base.py
        if "sweep" in read_yaml(path) or "prior" in read_yaml(path):
            continue  # a prior's config needs its finished source run (tests/test_prior.py makes one)
        cfg = load_config(path)
        assert cfg.levels


def shipped_experiments():
    """Every experiment the repository ships: each config file, and each run of each sweep file, with the
    overrides a sweep row applies itself."""
    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        if is_base_config(path):
            continue
        if "sweep" not in read_yaml(path):
            if "prior" not in read_yaml(path):  # a prior's config needs its finished source run
                yield str(path.relative_to(ROOT)), load_config(path), []
            continue
        sweep = load_sweep(path)
        for run in sweep.runs:
            if "prior" in read_yaml(ROOT / run.config):
                continue
            yield f"{path.relative_to(ROOT)}: {run.label}", load_config(ROOT / run.config, sweep.set + run.set), run.set


def test_shipped_experiments_use_kmeans_init_and_alternated_ones_keep_beta():
    # MQ-VAE §5.1: "All models were initialized using the K-means clustering algorithm" (Gumbel-VQ picks codes
    # from logits, so k-means has nothing to fit there; a hyper-net codebook's codes are an MLP's outputs, which
    # k-means cannot set: MQ-GAN, App. G). Alternated optimization is Algorithm 1 with xi = 0, whose
    # L is Eq. 6 with the shared beta; §4.4's beta = 0 diverges on digits and is a labelled sweep row only.
    experiments = list(shipped_experiments())
    assert len(experiments) > 30
    for name, cfg, overrides in experiments:
        assert cfg.quantizer.kmeans_init == (cfg.quantizer.kind != "gumbel" and not cfg.quantizer.codebook_mlp), name
        if cfg.hypergradient.xi == 0:
            assert (cfg.quantizer.beta == 0) == ("quantizer.beta=0" in overrides), name
            assert cfg.quantizer.beta == 0 or "§4.4" not in name, name
    assert sum(cfg.hypergradient.xi == 0 and cfg.quantizer.beta > 0 for _, cfg, _ in experiments) >= 3
    assert sum(cfg.hypergradient.xi == 0 and cfg.quantizer.beta == 0 for _, cfg, _ in experiments) >= 2


@pytest.mark.parametrize("data, needles", [
    ({"quantizer": {"num_cods": 3}}, ["quantizer.num_cods", "did you mean 'num_codes'"]),
    ({"levels": [{"name": "a", "problem": "VQVAE", "lr": -1}]}, ["levels.a.lr", "greater than 0"]),
    ({"device": "tpu"}, ["device", "auto, cpu, cuda"]),
    ({"train": {"iters": 1.5}}, ["train.iters", "integer"]),
    ({"hypergradient": {"xi": 0.0, "roll_back": True}}, ["roll_back", "xi > 0"]),
    ({"levels": [{"name": "a", "problem": "VQVAE", "grad_accumulation": 0}]}, ["levels.a.grad_accumulation", "below the minimum 1"]),
    ({"levels": [{"name": "a", "problem": "Codebook", "lower": ["b"]},
                 {"name": "b", "problem": "AutoEncoder", "grad_accumulation": 4}], "hypergradient": {"roll_back": True}},
     ["levels.b.grad_accumulation", "roll-back", "not defined with gradient accumulation"]),
    # Huh Table 10's inner codebook steps are alternated optimization's (xi: null is the default), on equal parts.
    ({"hypergradient": {"inner_steps": 2}}, ["hypergradient.inner_steps: 2", "needs xi: 0"]),
    ({"hypergradient": {"xi": 0.01, "inner_steps": 2}}, ["hypergradient.inner_steps: 2", "needs xi: 0"]),
    ({"hypergradient": {"xi": 0.0, "inner_steps": 3}}, ["hypergradient.inner_steps: 3", "data.batch_size = 64"]),
    ({"hypergradient": {"xi": 0.0, "inner_steps": 0}}, ["hypergradient.inner_steps", "minimum 1"]),
    ({"levels": [{"name": "a", "problem": "Codebook", "lower": ["b"], "grad_accumulation": 2},
                 {"name": "b", "problem": "AutoEncoder"}], "hypergradient": {"xi": 0.0, "inner_steps": 2}},
     ["hypergradient.inner_steps: 2", "levels.a.grad_accumulation", "not defined"]),
    ({"levels": [{"name": "a", "problem": "VQVAE", "lower": ["b"]}]}, ["levels.a.lower", "'b'"]),
    ({"eval": {"image_quality": "always"}}, ["eval.image_quality", "auto, off"]),
    ({"eval": {"image_quality": True}}, ["eval.image_quality", "expected a string"]),
    ({"eval": {"download_weights": "yes please"}}, ["eval.download_weights", "true or false"]),
])
def test_errors_are_one_line_and_name_the_key(data, needles):
    with pytest.raises(UserError) as info:
        config_from_dict({"levels": LEVEL, **data}, "x.yaml")
    message = str(info.value)
    assert "\n" not in message and message.startswith("x.yaml: ")
    for needle in needles:
        assert needle in message


def test_eval_defaults_measure_from_the_cache_only_and_an_unquoted_off_is_the_choice(tmp_path):
    cfg = config_from_dict({"levels": LEVEL}, "x.yaml")
    assert (cfg.eval.image_quality, cfg.eval.download_weights) == ("auto", False)
    # YAML 1.1 reads an unquoted off as false, in a file and in --set alike.
    (tmp_path / "off.yaml").write_text("levels: [{name: a, problem: VQVAE}]\neval:\n  image_quality: off\n")
    assert load_config(tmp_path / "off.yaml").eval.image_quality == "off"
    assert load_config(ROOT / "configs/digits/mqvae.yaml", ["eval.image_quality=off"]).eval.image_quality == "off"


def test_overrides_reach_any_key_and_levels_by_name():
    cfg = load_config(ROOT / "configs/digits/mqvae.yaml",
                      ["train.iters=7", "levels.codebook.lr=0.5", "levels.1.optimizer=sgd", "hypergradient.xi=0.01"])
    levels = {level.name: level for level in cfg.levels}
    assert cfg.train.iters == 7 and levels["codebook"].lr == 0.5
    assert levels["autoencoder"].optimizer == "sgd" and cfg.hypergradient.xi == 0.01
    with pytest.raises(UserError, match="unknown key"):
        load_config(ROOT / "configs/digits/mqvae.yaml", ["train.iterz=7"])


def test_device_auto_picks_cuda_when_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto").type == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto").type == "cpu"
    with pytest.raises(UserError, match="no CUDA device"):
        resolve_device("cuda")


def test_default_run_folder_follows_the_config_name():
    assert run.default_run_dir(Path("configs/digits/mqvae.yaml")) == Path("runs/digits/mqvae")
    assert run.default_run_dir(Path("/elsewhere/my_exp.yaml")) == Path("runs/my_exp")


# -- hardening: every bad config is one short UserError line ------------------------------------------------------

DIGITS = ROOT / "configs/digits/mqvae.yaml"
# The "billion laughs" alias bomb: nine aliases of nine aliases ... of nine strings, 10^9 strings in 342 bytes.
BILLION_LAUGHS = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{name}: &{name} [{','.join(['*' + below] * 9)}]\n" for below, name in zip("abcdefgh", "bcdefghi"))


def one_line_error(load, *needles) -> str:
    """The message of the UserError ``load()`` raises: one line of reasonable length holding every needle."""
    with pytest.raises(UserError) as info:
        load()
    message = str(info.value)
    assert "\n" not in message and len(message) < 600, message
    for needle in needles:
        assert needle in message, message
    return message


def write(tmp_path, text, name="x.yaml") -> Path:
    path = tmp_path / name
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    return path


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), "nan", "inf", "-Infinity", 10**400],
                         ids=["nan", "inf", "-inf", "'nan'", "'inf'", "'-Infinity'", "10^400"])
@pytest.mark.parametrize("key", ["quantizer.beta", "hypergradient.xi", "levels.0.lr"])
def test_float_keys_reject_nan_and_inf(key, value):
    # NaN passed every range check (its comparisons are all false); inf passed the minimum.
    section, name = key.rsplit(".", 1)
    data = {"levels": [{"name": "vqvae", "problem": "VQVAE"}]}
    target = data["levels"][0] if section == "levels.0" else data.setdefault(section, {})
    target[name] = value
    shown = key.replace("levels.0", "levels.vqvae")  # a level is named by its name
    one_line_error(lambda: config_from_dict(data, "x.yaml"), f"x.yaml: {shown}: ", "not a finite number")


def test_yaml_nan_and_inf_are_rejected_in_files(tmp_path):
    for text in (".nan", ".inf", "-.inf", ".NaN"):
        path = write(tmp_path, f"levels: [{{name: vqvae, problem: VQVAE}}]\nquantizer: {{beta: {text}}}\n")
        one_line_error(lambda: load_config(path), "quantizer.beta", "not a finite number")


@pytest.mark.parametrize("key, value", [("train.iters", 2**63), ("data.num_workers", -2**63), ("quantizer.num_codes", 2**64),
                                        ("train.iters", 10**5000)], ids=["2^63", "-2^63", "2^64", "10^5000"])
def test_integer_keys_stay_within_64_bits(key, value):
    section, name = key.split(".")
    data = {"levels": LEVEL, section: {name: value}}
    message = one_line_error(lambda: config_from_dict(data, "x.yaml"), f"x.yaml: {key}: ", "2^63")
    assert len(message) < 200  # a 5000-digit integer is told by its size (repr() would refuse it)
    assert config_from_dict({"levels": LEVEL, "train": {"iters": 2**63 - 1}}, "x.yaml").train.iters == 2**63 - 1


def test_seed_is_a_32_bit_number_and_every_stream_seed_derived_from_it_fits_torch():
    from engines.build import derived_seed
    from mqvae.data.loader import _EPOCH_STRIDE, BatchStream

    largest = 2**32 - 1
    assert config_from_dict({"levels": LEVEL, "seed": largest}, "x.yaml").seed == largest
    one_line_error(lambda: config_from_dict({"levels": LEVEL, "seed": largest + 1}, "x.yaml"), "seed", str(largest))
    # A batch stream seeds torch with seed * _EPOCH_STRIDE + epoch (below 2^64); other streams with a 40-bit hash.
    assert derived_seed(largest, "codebook") < 2**40
    assert max(largest, 2**40 - 1) * _EPOCH_STRIDE + 10**6 < 2**64
    stream = BatchStream(torch.utils.data.TensorDataset(torch.arange(4.0)), 2, seed=2**40 - 1)
    assert len(list(stream)) == 2


def test_a_key_given_twice_names_the_key_and_its_lines(tmp_path):
    path = write(tmp_path, "levels: [{name: vqvae, problem: VQVAE}]\ntrain:\n  iters: 5\n  log_every: 1\n  iters: 6\n")
    one_line_error(lambda: load_config(path), str(path), "line 5", "'iters'", "first at line 3")
    # Keys merged in with `<<` are there to be overridden.
    merged = write(tmp_path, "levels: [{name: vqvae, problem: VQVAE}]\ndata: {<<: {batch_size: 3}, batch_size: 4}\n",
                   "merged.yaml")
    assert load_config(merged).data.batch_size == 4


def test_a_file_that_is_not_utf8_is_one_line_naming_it(tmp_path):
    path = write(tmp_path, b"seed: 0\ndata: {name: \xff\xfe}\n")
    one_line_error(lambda: load_config(path), str(path), "UTF-8")


@pytest.mark.parametrize("depth", [50, 300, 600, 10000])
def test_deeply_nested_yaml_is_one_line(tmp_path, depth):
    # 10000 nested '[' made PyYAML's composer hit RecursionError; shallower ones must not make later code hit it.
    path = write(tmp_path, "levels: " + "[" * depth + "]" * depth + "\n")
    one_line_error(lambda: load_config(path), str(path))


def test_an_alias_bomb_is_refused_quickly_with_a_short_line(tmp_path):
    path = write(tmp_path, BILLION_LAUGHS)
    assert len(BILLION_LAUGHS) < 400
    started = time.perf_counter()
    one_line_error(lambda: read_yaml(path), str(path), "aliases")
    one_line_error(lambda: load_config(path), str(path), "aliases")
    assert time.perf_counter() - started < 2


def test_quoted_values_are_cut_without_building_their_whole_repr():
    bomb = ["lol"] * 9
    for _ in range(6):  # 9^7 strings: a 40 MB repr
        bomb = [bomb] * 9
    for data in ({"levels": bomb}, {"levels": LEVEL, "data": {"name": bomb}}, {"levels": LEVEL, "device": "x" * 10**6},
                 {"levels": LEVEL, "data": {"x" * 10**6: 1}}, {"levels": LEVEL, 10**5000: 1}):
        started = time.perf_counter()
        message = one_line_error(lambda: config_from_dict(data, "x.yaml"), "x.yaml: ")
        assert len(message) < 400 and time.perf_counter() - started < 1


@pytest.mark.parametrize("override, needles", [
    ("train.iters=[1", ["--set train.iters", "not valid YAML"]),
    ('seed=!!python/object/apply:os.system ["echo hi"]', ["--set seed", "python/object/apply"]),
    ("seed.a.b=1", ["--set seed.a.b", "'seed' is 0, not a section"]),
    ("levels.0.problem.x=1", ["--set levels.0.problem.x", "not a section"]),
    ("=1", ["--set =1", "key is empty"]),
    ("train..iters=1", ["key is empty"]),
    (".seed=1", ["key is empty"]),
    ("levels.7.lr=1", ["--set levels.7.lr", "no list item '7'"]),
    ("levels.nosuch.lr=1", ["no list item 'nosuch'"]),
    ("levels.²=1", ["no list item '²'"]),
    ("levels." + "9" * 5000 + ".lr=1", ["no list item"]),
], ids=lambda value: value[:40] if isinstance(value, str) else None)
def test_bad_overrides_are_one_line(monkeypatch, override, needles):
    import os

    ran = []
    monkeypatch.setattr(os, "system", lambda command: ran.append(command))
    one_line_error(lambda: load_config(DIGITS, [override]), *needles)
    assert not ran  # safe loading: a YAML tag never runs anything


@pytest.mark.parametrize("lowers, cycle", [
    ({"a": ["b"], "b": ["a"]}, "'a' -> 'b' -> 'a'"),
    ({"a": ["b"], "b": ["c"], "c": ["a"]}, "'a' -> 'b' -> 'c' -> 'a'"),
    ({"top": ["a"], "a": ["b"], "b": ["a"]}, "'a' -> 'b' -> 'a'"),
])
def test_a_cycle_of_levels_is_an_error_naming_it(lowers, cycle):
    # A cycle used to train nothing and exit 0.
    levels = [{"name": name, "problem": "VQVAE", "lower": below} for name, below in lowers.items()]
    one_line_error(lambda: config_from_dict({"levels": levels}, "x.yaml"), "x.yaml: levels.", ".lower: ", cycle)


def test_acyclic_level_graphs_load():
    # A diamond shares a lower level and has no cycle.
    levels = [{"name": name, "problem": "VQVAE", "lower": below}
              for name, below in {"top": ["left", "right"], "left": ["bottom"], "right": ["bottom"], "bottom": []}.items()]
    assert [level.name for level in config_from_dict({"levels": levels}, "x.yaml").levels] == ["top", "left", "right", "bottom"]


def test_data_names_are_the_registered_ones_with_a_hint():
    with pytest.raises(UserError) as error:
        load_config(ROOT / "configs/digits/vqvae.yaml", ["data.name=DIGITS"])
    message = str(error.value)
    assert "data.name" in message and "did you mean 'digits'?" in message and "mnist" in message

    from mqvae.data import DATASETS, register_dataset

    @register_dataset("my_digits")
    def _mine(root, download, seed):  # never loaded: registration alone makes the name valid
        raise AssertionError

    try:
        assert load_config(ROOT / "configs/digits/vqvae.yaml", ["data.name=my_digits"]).data.name == "my_digits"
    finally:
        del DATASETS["my_digits"]


def test_a_folder_named_as_config_says_so(tmp_path):
    with pytest.raises(UserError, match="is a folder, not a config file"):
        load_config(tmp_path)


def test_a_config_path_that_cannot_be_read_says_why(tmp_path, capsys):
    # Through the command line: a symbolic link loop, a device, a missing file each get their own reason.
    import errno
    import os

    (tmp_path / "a.yaml").symlink_to(tmp_path / "b.yaml")
    (tmp_path / "b.yaml").symlink_to(tmp_path / "a.yaml")
    for path, reason in ((tmp_path / "a.yaml", os.strerror(errno.ELOOP)), ("/dev/null", "is not a regular file"),
                         (tmp_path / "missing.yaml", "config file not found")):
        assert run.main([str(path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"error: {path}: ") and reason in err, err


# A config's comment may state its optimizer groups, one line per level:
#   # optimizer groups of level NAME: LR (PART, PART), LR (PART), ...
# with PART a prefix of the model's parameter names (encoder, quantizer.codebook, ...).
GROUPS_COMMENT = re.compile(r"^# optimizer groups of level (\w+): (.+)$", re.MULTILINE)
GROUP = re.compile(r"([0-9.]+e[-+]?[0-9]+) \(([^)]*)\)")
STATED = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if GROUPS_COMMENT.search(p.read_text()))


def test_configs_that_state_their_optimizer_groups_exist():
    assert {"affine.yaml", "vqvae_codebook_lr.yaml", "fashion_mnist_vqvae_codebook_lr.yaml"} <= {p.name for p in STATED}


@pytest.mark.parametrize("path", STATED, ids=lambda p: str(p.relative_to(ROOT)))
def test_optimizer_groups_are_what_the_configs_comments_say(tmp_path, path):
    from engines.experiment import build_engine
    from fake_datasets import write_mnist

    cfg = load_config(path)
    overrides = ["device=cpu"]
    if cfg.data.name != "digits":  # the paper's data sets, on small stand-ins
        write_mnist(tmp_path / "data", 8, 8, kind="FashionMNIST", layout="debian")
        overrides += [f"data.root={tmp_path / 'data'}", "data.batch_size=4", "model.hidden_channels=8",
                      "model.res_channels=4", "quantizer.num_codes=16", "quantizer.dim=8"]
    engine = build_engine(load_config(path, overrides), tmp_path / "run")
    names = {id(p): name for name, p in engine.model.named_parameters()}
    for level, text in GROUPS_COMMENT.findall(path.read_text()):
        stated = [(float(lr), [part.strip() for part in parts.split(",")]) for lr, parts in GROUP.findall(text)]
        groups = getattr(engine, level).optimizer.param_groups
        assert len(groups) == len(stated), (level, text)
        for group, (lr, parts) in zip(groups, stated):
            assert group.get("initial_lr", group["lr"]) == pytest.approx(lr), (level, text)  # before any schedule
            got = {names[id(p)] for p in group["params"]}
            want = {name for name in names.values() if any(name.startswith(part + ".") or name == part for part in parts)}
            assert got == want, (level, parts)
