"""A user's module outside the repository, registering a level with params, a hypergradient method and a data set:
it trains through ``run.py --import``, resumes with ``run.py --resume RUN_DIR`` alone, and runs in a sweep. The
module is the README's own example ("Plugins"), so the README's example is what is tested.

Every run is a subprocess started from a working folder outside the repository, as a user's would be."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from test_readme_examples import code_blocks, sections

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "seed": 0, "device": "cpu",
    "model": {"kind": "vqvae", "hidden_channels": 8, "res_channels": 4, "num_res_blocks": 1, "downsample": 2},
    "quantizer": {"num_codes": 16, "dim": 4, "beta": 0.25},
    "data": {"batch_size": 16},
    "train": {"iters": 6, "log_every": 1, "checkpoint_every": 3},
}


def plugin_section() -> str:
    return sections()["Plugins: your own module, outside the repository"]


@pytest.fixture
def plugin(tmp_path) -> Path:
    """The README's plugin module, written where no repository is: tmp/elsewhere/my_plugin.py."""
    (python,) = code_blocks(plugin_section(), "python")
    path = tmp_path / "elsewhere" / "my_plugin.py"
    path.parent.mkdir()
    path.write_text(python)
    return path


def write_config(folder: Path, **changes) -> Path:
    """The README's YAML block merged into a tiny config (its base: the shipped digits base)."""
    (block,) = code_blocks(plugin_section(), "yaml")
    data = {**TINY, **yaml.safe_load(block)}
    # The README's config sits in the repository's root, where its base path is relative to: here it is elsewhere.
    data["base"] = str(ROOT / data["base"])
    for key, value in changes.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    path = folder / "my_config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run_cli(*args, cwd: Path, timeout=300, **popen):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)  # the plugin is found through --import alone
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout, **popen)


def log_records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]


def uses_the_plugin(run_dir: Path) -> None:
    """What only the plugin can have done: its data set, its level (params included) and its method."""
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["data"]["name"] == "digits_inverted"
    assert saved["hypergradient"]["type"] == "half_eq13"
    lower = next(level for level in saved["levels"] if level["name"] == "autoencoder")
    assert lower["problem"] == "SmoothAutoEncoder" and lower["params"] == {"tv_weight": 0.02}
    training = [r for r in log_records(run_dir) if "autoencoder.loss" in r]
    assert training and all("autoencoder.total_variation" in r for r in training)


def test_a_plugin_trains_through_import_and_is_recorded(tmp_path, plugin):
    work = tmp_path / "work"
    work.mkdir()
    config = write_config(work)
    result = run_cli(config, "--import", plugin, "--out", "run", cwd=work)
    assert result.returncode == 0, result.stderr
    run_dir = work / "run"
    uses_the_plugin(run_dir)
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["imports"] == [str(plugin.resolve())]
    assert json.loads((run_dir / "metrics.json").read_text())["iterations"] == 6

    # Without the module the same config is refused at load, naming what is registered.
    result = run_cli(config, "--out", "other", cwd=work)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "data.name: 'digits_inverted' is not a registered data set" in result.stderr
    assert not (work / "other").exists()


def test_a_plugin_run_killed_after_a_checkpoint_resumes_with_resume_alone(tmp_path, plugin):
    work, elsewhere = tmp_path / "work", tmp_path / "another_folder"
    work.mkdir()
    elsewhere.mkdir()
    config = write_config(work, train={"iters": 400, "checkpoint_every": 20, "log_every": 10})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.Popen([sys.executable, str(ROOT / "run.py"), str(config), "--import", str(plugin), "--out", "run"],
                            cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_dir = work / "run"
    deadline = time.monotonic() + 120
    while not (run_dir / "checkpoint.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (run_dir / "checkpoint.pt").exists() and not (run_dir / "metrics.json").exists()

    # From another working folder, with no --import: config.yaml's imports bring the module back.
    result = run_cli("--resume", run_dir, cwd=elsewhere)
    assert result.returncode == 0, result.stderr
    assert json.loads((run_dir / "metrics.json").read_text())["iterations"] == 400
    uses_the_plugin(run_dir)
    steps = [r["step"] for r in log_records(run_dir) if "autoencoder.loss" in r]
    assert steps == list(range(10, 401, 10))  # one run: nothing lost, nothing twice


@pytest.mark.parametrize("how", ["--import", "imports:"])
def test_a_plugin_runs_inside_a_sweep(tmp_path, plugin, how):
    work = tmp_path / "work"
    work.mkdir()
    config = write_config(work, train={"iters": 3, "checkpoint_every": 0},
                          **({"imports": [str(plugin)]} if how == "imports:" else {}))
    sweep = work / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"sweep": {
        "name": "plugin_sweep", "seeds": [5],
        "runs": [{"label": "smooth", "config": str(config)},
                 {"label": "smooth direct", "config": str(config), "set": ["hypergradient.type=direct"]}]}}))
    extra = ["--import", plugin] if how == "--import" else []
    result = run_cli(sweep, *extra, "--seeds", "3,4", "--out", "sweep", cwd=work)
    assert result.returncode == 0, result.stderr
    results = json.loads((work / "sweep" / "results.json").read_text())
    assert sorted((r["label"], r["seed"]) for r in results["runs"]) == [
        ("smooth", 3), ("smooth", 4), ("smooth direct", 3), ("smooth direct", 4)]
    for seed in (3, 4):
        run_dir = work / "sweep" / "smooth" / f"seed{seed}"
        uses_the_plugin(run_dir)
        assert yaml.safe_load((run_dir / "config.yaml").read_text())["imports"] == [str(plugin.resolve())]


def exits(folder: Path, name: str, code: str) -> Path:
    path = folder / f"{name}.py"
    path.write_text(f"import sys\nsys.exit({code})\n")
    return path


def test_a_module_that_cannot_be_imported_is_one_line(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("import torch\n\nvalue = 1 / 0\n")
    for entry, needles in [(broken, ["broken.py", "ZeroDivisionError", "broken.py:3"]),
                           ("no_such_module_xyz", ["no_such_module_xyz", "ModuleNotFoundError", "PYTHONPATH"]),
                           (tmp_path / "missing.py", ["missing.py", "no such file"]),
                           # sys.exit at import: 0 would end the run "successfully" with nothing written or said
                           (exits(tmp_path, "quits", "0"), ["quits.py", "sys.exit(0)", "quits.py:2"]),
                           (exits(tmp_path, "complains", "'no GPU here'"), ["complains.py", "sys.exit('no GPU here')"])]:
        result = run_cli(ROOT / "configs/digits/vqvae.yaml", "--import", entry, "--out", "run", cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
        assert all(needle in result.stderr for needle in needles), result.stderr
        assert not (tmp_path / "run").exists()


def test_bad_seeds_are_one_line(tmp_path):
    sweep = ROOT / "configs/tables/table3_ablation_digits.yaml"
    for seeds, needle in [("0,x", "non-negative integers"), ("1,1", "distinct"), ("", "non-negative integers")]:
        result = run_cli(sweep, "--seeds", seeds, "--out", "s", cwd=tmp_path)
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and needle in result.stderr, result.stderr
    result = run_cli(ROOT / "configs/digits/vqvae.yaml", "--seeds", "0,1", "--out", "r", cwd=tmp_path)
    assert result.returncode == 2 and "--seeds" in result.stderr and "sweep" in result.stderr
