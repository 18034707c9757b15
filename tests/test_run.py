"""run.py end to end: run folders, bad input, determinism, resume, and every shipped digits config."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import run
from engines.run_folder import RUN_FILES
from helpers import interrupt_at, is_base_config, measured, results

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--set", "model.hidden_channels=8", "--set", "model.res_channels=4", "--set", "model.num_res_blocks=1",
        "--set", "train.log_every=1", "--set", "device=cpu"]


def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "run.py", *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=600)


def assert_one_line_error(result, *needles):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


# -- bad input --------------------------------------------------------------------------------------

def test_misspelt_key_names_the_nearest_key(tmp_path):
    cfg = tmp_path / "bad.yaml"
    text = (ROOT / "configs/digits/base.yaml").read_text().replace("num_codes:", "num_cods:")
    cfg.write_text(text + "levels:\n  - {name: vqvae, problem: VQVAE}\n")
    assert_one_line_error(run_cli(cfg, "--out", tmp_path / "run"), "quantizer.num_cods", "num_codes", str(cfg))


def test_bad_value_names_the_allowed_values(tmp_path, capsys):
    for override, needles in (("levels.0.optimizer=adamm", ["levels.vqvae.optimizer", "did you mean 'adam'?", "adamw",
                                                             "sgd", "register_optimizer"]),
                              ("quantizer.num_codes=0", ["quantizer.num_codes", "minimum"]),
                              ("train.iters=many", ["train.iters", "integer"])):
        assert run.main(["configs/digits/vqvae.yaml", "--set", override, "--out", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and all(needle in err for needle in needles), err


def test_unknown_problem_gets_a_hint_and_the_registered_names(tmp_path):
    result = run_cli("configs/digits/mqvae.yaml", "--set", "levels.codebook.problem=CodeBook", "--out", tmp_path / "run")
    assert_one_line_error(result, "levels.codebook.problem", "did you mean 'Codebook'?", "AutoEncoder", "register_problem")


@pytest.mark.parametrize("name", ["run", "leaves", "datasets", "train", "eval", "configure_systems", "model", "xi"])
def test_a_level_name_betty_would_overwrite_is_one_line(tmp_path, capsys, name):
    # Betty makes each level an attribute of the engine and of the other levels: Betty's Engine (run, leaves,
    # train, eval, configure_systems), the toolkit's engine (datasets) and the level classes (model, xi).
    code = run.main(["configs/digits/vqvae.yaml", *TINY, "--set", f"levels.0.name={name}", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"levels.{name}.name: '{name}' is taken" in err and "choose another name" in err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_a_too_long_output_path_keeps_the_os_reason_on_the_line(tmp_path, capsys):
    import errno
    import os

    assert run.main(["configs/digits/vqvae.yaml", *TINY, "--out", str(tmp_path / ("a" * 5000))]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and os.strerror(errno.ENAMETOOLONG) in err and "..." in err and len(err) < 400, err


@pytest.mark.parametrize("rank, says", [("0", True), ("1", False)])
def test_ctrl_c_is_said_by_rank_0_alone(tmp_path, monkeypatch, capsys, rank, says):
    # torchrun interrupts every rank; one "interrupted" line is enough (the rank is torchrun's RANK variable).
    monkeypatch.setenv("RANK", rank)
    restore = interrupt_at(monkeypatch, 2)
    assert run.main(["configs/digits/vqvae.yaml", *TINY, "--set", "train.iters=4", "--out", str(tmp_path / "run")]) == 130
    restore()
    err = capsys.readouterr().err
    assert (err.startswith("interrupted; continue with --resume") and err.count("\n") == 1) if says else err == ""


def test_missing_data_folder(tmp_path):
    result = run_cli("configs/digits/vqvae.yaml", "--set", "data.name=cifar10", "--set", f"data.root={tmp_path / 'nowhere'}",
                     "--out", tmp_path / "run")
    assert_one_line_error(result, str(tmp_path / "nowhere"), "data.download")


def test_corrupt_checkpoint_on_resume(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoint.pt").write_bytes(b"this is not a checkpoint")
    (run_dir / "log.jsonl").write_text('{"step": 1}\n')
    result = run_cli("configs/digits/vqvae.yaml", "--resume", run_dir)
    assert_one_line_error(result, "checkpoint")
    assert (run_dir / "log.jsonl").read_text() == '{"step": 1}\n'  # nothing already written is lost


# -- a tiny run writes the run folder; runs are deterministic and resumable ----------------------------

def tiny_run(out, *extra):
    return run.main(["configs/digits/vqvae.yaml", *TINY, "--set", "train.iters=6", "--out", str(out), *extra])


def test_run_folder_and_determinism(tmp_path):
    assert tiny_run(tmp_path / "a") == 0
    for name in RUN_FILES:
        if name != "samples.png":  # a prior run's picture (tests/test_prior.py)
            assert (tmp_path / "a" / name).is_file(), name
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    for key in ("test_mse", "perplexity", "active_codes", "iterations", "wall_time_s"):
        assert key in metrics
    assert metrics["iterations"] == 6
    state = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    assert set(state["levels"]) == {"vqvae"}
    assert any(k.startswith("quantizer.") for k in state["levels"]["vqvae"])
    assert yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())["train"]["iters"] == 6
    records = measured(tmp_path / "a")
    # A training record per iteration (log_every 1), and the last iteration evaluated although eval_every (250)
    # does not divide 6.
    assert [r["step"] for r in records if "vqvae.loss" in r] == list(range(1, 7))
    assert [r["step"] for r in records if "test_mse" in r] == [6]

    assert tiny_run(tmp_path / "b") == 0
    other = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert results(metrics) == results(other)


@pytest.mark.parametrize("config", ["vqvae", "mqvae"])
def test_resume_after_interruption_ends_like_an_uninterrupted_run(tmp_path, monkeypatch, config):
    args = [f"configs/digits/{config}.yaml", *TINY, "--set", "train.iters=6", "--set", "train.checkpoint_every=3"]
    assert run.main([*args, "--out", str(tmp_path / "full")]) == 0

    restore = interrupt_at(monkeypatch, 5)
    assert run.main([*args, "--out", str(tmp_path / "cut")]) == 130
    restore()
    assert run.main([*args, "--resume", str(tmp_path / "cut")]) == 0

    full = json.loads((tmp_path / "full" / "metrics.json").read_text())
    resumed = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    assert results(resumed) == results(full)
    # The log reads as one run: the uninterrupted run's records, its final evaluation once.
    assert measured(tmp_path / "cut") == measured(tmp_path / "full")
    assert [r["step"] for r in measured(tmp_path / "cut") if "test_mse" in r] == [6]


# -- every shipped digits config runs end to end ------------------------------------------------------

# The prior's config needs a finished source run: tests/test_prior.py runs it on one.
DIGITS_CONFIGS = sorted(p.stem for p in (ROOT / "configs" / "digits").glob("*.yaml")
                        if p.stem != "prior" and not is_base_config(p))


# The VQ-GAN configs' network at a test's width (the kind reads no res_channels), the discriminator on from iteration 2.
TINY_VQGAN = ["--set", "model.hidden_channels=8", "--set", "model.norm_groups=4",
              "--set", "levels.discriminator.params.disc_start=1", "--set", "train.log_every=1", "--set", "device=cpu"]


@pytest.mark.parametrize("name", DIGITS_CONFIGS)
def test_shipped_digits_config_runs(tmp_path, name):
    out = tmp_path / name
    # (The classifier's ResNet-18 reads none of the VQ-VAE's widths.)
    tiny = TINY_VQGAN if name in ("mqgan", "vqgan") else TINY[-4:] if name.startswith("classify") else TINY
    assert run.main([f"configs/digits/{name}.yaml", *tiny, "--set", "train.iters=3", "--out", str(out)]) == 0
    for file in RUN_FILES:
        if file != "samples.png":  # a prior run's picture (tests/test_prior.py)
            assert (out / file).is_file(), file
    levels = torch.load(out / "checkpoint.pt", weights_only=True)["levels"]
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert set(levels) == {level["name"] for level in cfg["levels"]}
    if any(level["problem"] == "Codebook" for level in cfg["levels"]):  # the encoder-decoder one or two (mqvae_chain)
        assert "codebook" in levels and ("autoencoder" in levels or {"encoder", "decoder"} <= set(levels))


def test_three_levels_moves_beta(tmp_path):
    out = tmp_path / "three"
    assert run.main(["configs/digits/three_levels.yaml", *TINY, "--set", "train.iters=5", "--out", str(out)]) == 0
    params = next(level for level in yaml.safe_load((out / "config.yaml").read_text())["levels"]
                  if level["name"] == "commitment_weight")["params"]
    rho = torch.load(out / "checkpoint.pt", weights_only=True)["levels"]["commitment_weight"]["rho"]
    beta = params["min_beta"] + torch.nn.functional.softplus(rho.double()).item()
    assert abs(beta - params["initial_beta"]) > 1e-4 and beta > params["min_beta"]


@pytest.mark.parametrize("kind", ["mqvae", "direct", "darts", "neumann", "cg", "sama"])
def test_every_hypergradient_type_runs_an_mqvae_iteration(tmp_path, kind):
    out = tmp_path / kind
    assert run.main(["configs/digits/mqvae.yaml", *TINY, "--set", "train.iters=1", "--set", f"hypergradient.type={kind}",
                     "--out", str(out)]) == 0
    assert json.loads((out / "metrics.json").read_text())["iterations"] == 1


def test_a_run_records_what_made_it(tmp_path):
    # The thread count changes a seed's numbers, so it is applied first and recorded with the versions and commit.
    out = tmp_path / "run"
    before = torch.get_num_threads()
    try:
        assert run.main(["configs/digits/vqvae.yaml", *TINY, "--set", "train.iters=2", "--set", "threads=1",
                         "--out", str(out)]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    recorded = json.loads((out / "metrics.json").read_text())["provenance"]
    header = (out / "config.yaml").read_text().splitlines()[1]
    assert header.startswith("# provenance: ")
    started = json.loads(header.removeprefix("# provenance: "))
    for made in (recorded, started):
        assert made["threads"] == 1 and made["torch"] == torch.__version__ and made["betty"] == "0.2.1"
        assert made["device"].startswith("cpu") and made["python"] == platform.python_version()
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
        if head.returncode == 0:  # a git checkout (an unpacked archive records why there is no commit)
            assert made["commit"] == head.stdout.strip() and isinstance(made["dirty"], bool)
        else:
            assert made["commit"] is None and made["commit_reason"]
    assert "provenance" not in yaml.safe_load((out / "config.yaml").read_text())  # a comment, not a config key


def test_list_names_every_registry_with_a_plugins(tmp_path, capsys, monkeypatch):
    import mqvae.data

    plugin = tmp_path / "my_data.py"
    plugin.write_text("from mqvae.data import register_dataset\n"
                      "register_dataset('my_digits_for_list')(lambda root, download, seed: None)\n")
    assert run.main(["--list", "--import", str(plugin)]) == 0
    lines = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    assert {"digits", "fashion_mnist", "my_digits_for_list"} <= set(lines["data.name (data sets)"].split(", "))
    assert {"Codebook", "AutoEncoder", "VQVAE"} <= set(lines["levels.*.problem (problems)"].split(", "))
    assert {"mqvae", "darts", "direct"} <= set(lines["hypergradient.type (hypergradient methods)"].split(", "))
    assert lines["levels.*.optimizer (optimizers)"].split(", ") == ["adam", "adamw", "sgd"]
    assert "warmup_cosine" in lines["levels.*.scheduler (schedulers)"]


def test_print_config_prints_the_resolved_config_and_runs_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run.main([ROOT / "configs/digits/mqvae.yaml", "--print-config", "--set", "train.iters=7"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["iters"] == 7 and printed["hypergradient"]["type"] == "mqvae" and printed["threads"] is None
    assert list(tmp_path.iterdir()) == []  # no run folder
    assert run.main([ROOT / "configs/tables/table1_digits.yaml", "--print-config"]) == 2
    assert "--print-config: prints one experiment's config" in capsys.readouterr().err


# -- a config is read and validated before seconds of imports ----------------------------------------------------

# Started in a subprocess before run.py: any import of these packages (torchmetrics' image-quality networks,
# matplotlib, TensorBoard, torchvision, scipy) fails loudly.
IMPORT_GUARD = """
import importlib.abc, sys
HEAVY = ("torchmetrics", "matplotlib", "tensorboard", "torch.utils.tensorboard", "torchvision", "scipy")
class Guard(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if any(name == heavy or name.startswith(heavy + ".") for heavy in HEAVY):
            raise ImportError(f"heavy import before validation: {name}")
sys.meta_path.insert(0, Guard())
sys.path.insert(0, sys.argv.pop(1))
import run
sys.exit(run.main(sys.argv[1:]))
"""


def test_a_config_is_validated_before_any_heavy_import(tmp_path):
    guard = tmp_path / "guard.py"
    guard.write_text(IMPORT_GUARD)
    base = ROOT / "configs" / "digits" / "base.yaml"
    plugin = tmp_path / "my_level.py"
    plugin.write_text("from problems import AutoEncoder, register_problem\n\n"
                      "@register_problem\nclass MyLevel(AutoEncoder):\n    pass\n")
    cases = {
        "typo": ({"quantizer": {"num_cods": 3}, "levels": [{"name": "vqvae", "problem": "VQVAE"}]}, [],
                 "did you mean 'num_codes'"),
        "level": ({"levels": [{"name": "vqvae", "problem": "VQVA"}]}, [], "did you mean 'VQVAE'"),
        # A plugin's names are validated too: the plugin is imported, its level known, and a misspelt one named.
        "plugin": ({"levels": [{"name": "codebook", "problem": "Codebook", "lower": ["autoencoder"]},
                               {"name": "autoencoder", "problem": "MyLeve"}]}, ["--import", plugin],
                   "did you mean 'MyLevel'"),
        "base": ({"base": "missing.yaml"}, [], "not found"),
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name, (data, extra, needle) in cases.items():
        config = tmp_path / f"{name}.yaml"
        config.write_text(yaml.safe_dump({"base": str(base), **data}))
        result = subprocess.run([sys.executable, guard, ROOT, config, *extra, "--out", tmp_path / name],
                                capture_output=True, text=True, timeout=300, env=env)
        assert result.returncode == 2 and needle in result.stderr, (name, result.stderr)
        assert "heavy import" not in result.stderr, name
    # The guard bites: a valid config gets past validation and into the imports a run needs.
    result = subprocess.run([sys.executable, guard, ROOT, ROOT / "configs/digits/vqvae.yaml", "--set", "train.iters=1",
                             "--set", "device=cpu", "--out", tmp_path / "valid"],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode != 0 and "heavy import before validation" in result.stdout + result.stderr
