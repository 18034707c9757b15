"""Sweeps: a tiny sweep's results against a hand computation, restart after a kill, one-line errors."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

import run
from engines import experiment
from mqvae.sweep import load_sweep, slugify

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--set", "train.iters=2", "--set", "train.log_every=1", "--set", "train.eval_every=1",
        "--set", "train.checkpoint_every=1", "--set", "model.hidden_channels=8", "--set", "model.res_channels=4",
        "--set", "model.num_res_blocks=1", "--set", "device=cpu", "--set", "data.batch_size=16"]


@pytest.fixture(autouse=True)
def plain_image_quality(monkeypatch):
    """No pretrained-weight lookup per run (it costs seconds); FID/IS/LPIPS are null with a reason."""
    from mqvae import evaluation
    from mqvae.metrics import ImageQuality

    def absent(device):
        quality = ImageQuality.__new__(ImageQuality)
        quality.device, quality._fid, quality._is, quality._lpips = device, None, None, None
        quality.reasons = {name: "weights absent (test)" for name in ("fid", "is", "lpips")}
        quality._lpips_sum, quality._num_pairs = 0.0, 0
        return quality

    monkeypatch.setattr(evaluation, "make_image_quality", absent)


def write_sweep(tmp_path, text=None):
    path = tmp_path / "tiny_sweep.yaml"
    path.write_text(text or f"""
sweep:
  title: "Tiny sweep"
  seeds: [0, 1]
  metrics: [test_mse, perplexity, gradient_gap, fid]
  runs:
    - {{label: "VQ-VAE", config: {ROOT}/configs/digits/vqvae.yaml}}
    - {{label: "MQ-VAE (direct)", config: configs/digits/mqvae.yaml, set: ["hypergradient.type=direct"]}}
""")
    return path


def test_tiny_sweep_writes_results_matching_the_runs(tmp_path):
    out = tmp_path / "sweep"
    assert run.main([str(write_sweep(tmp_path)), *TINY, "--out", str(out)]) == 0
    for name in ("results.md", "results.json", "results.png"):
        assert (out / name).is_file(), name
    md = (out / "results.md").read_text()
    results = json.loads((out / "results.json").read_text())
    assert len(results["runs"]) == 4
    assert "| Method | MSE (10^-3) ↓ | Perplexity ↑ | Δgap (10^-5) ↓ | FID ↓ |" in md
    for label in ("VQ-VAE", "MQ-VAE (direct)"):
        per_seed = [json.loads((out / slugify(label) / f"seed{s}" / "metrics.json").read_text()) for s in (0, 1)]
        assert [m["iterations"] for m in per_seed] == [2, 2]
        cells = []
        for key, scale in (("test_mse", 1e-3), ("perplexity", 1.0), ("gradient_gap", 1e-5)):
            values = [m[key] for m in per_seed]
            cells.append(f"{statistics.fmean(values) / scale:.2f} ± {statistics.stdev(values) / scale:.2f}")
        assert f"| {label} | " + " | ".join(cells) + " | n/a [fid] |" in md
        row = next(r for r in results["aggregate"] if r["label"] == label)
        assert row["metrics"]["test_mse"]["mean"] == pytest.approx(statistics.fmean(m["test_mse"] for m in per_seed))
    # seeds really differ, and the method's override reached its runs
    seed0, seed1 = ((out / "vq-vae" / f"seed{s}" / "config.yaml").read_text() for s in (0, 1))
    assert "seed: 0" in seed0 and "seed: 1" in seed1
    assert "type: direct" in (out / "mq-vae-direct" / "seed0" / "config.yaml").read_text()
    assert "[fid] not measured: weights absent (test)" in md


def test_killed_sweep_finishes_only_the_missing_runs(tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    path = write_sweep(tmp_path)
    original = experiment.run_experiment
    calls = []

    def killed_in_third(cfg, run_dir, resume=False):
        calls.append((Path(run_dir), resume))
        if len(calls) == 3:
            from engines.engine import LevelEngine

            step = LevelEngine.train_step

            def interrupt(self):
                if self.global_step == 2:  # after the step-1 checkpoint
                    raise KeyboardInterrupt
                step(self)

            monkeypatch.setattr(LevelEngine, "train_step", interrupt)
            try:
                return original(cfg, run_dir, resume)
            finally:
                monkeypatch.setattr(LevelEngine, "train_step", step)
        return original(cfg, run_dir, resume)

    monkeypatch.setattr(experiment, "run_experiment", killed_in_third)
    assert run.main([str(path), *TINY, "--out", str(out)]) == 130
    assert len(calls) == 3
    third = calls[2][0]
    assert (third / "checkpoint.pt").is_file() and not (third / "metrics.json").exists()
    assert not (out / "results.md").exists()

    calls.clear()
    assert run.main([str(path), *TINY, "--out", str(out)]) == 0
    assert calls == [(third, True), (out / "mq-vae-direct" / "seed1", False)]
    steps = [json.loads(line)["step"] for line in (third / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 1, 2, 2]  # training + eval record per step, nothing duplicated by the resume
    assert json.loads((third / "metrics.json").read_text())["iterations"] == 2

    calls.clear()
    assert run.main([str(path), *TINY, "--out", str(out)]) == 0
    assert calls == []  # everything finished: only the tables are rewritten
    assert len(json.loads((out / "results.json").read_text())["runs"]) == 4


def test_sweep_error_from_the_command_line_is_one_line(tmp_path):
    path = write_sweep(tmp_path, write_sweep(tmp_path).read_text().replace("runs:", "rnus:"))
    result = subprocess.run([sys.executable, "run.py", str(path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "sweep.rnus" in result.stderr, result.stderr


@pytest.mark.parametrize("edit, needles", [
    (("seeds:", "seed:"), ["sweep.seed", "did you mean 'seeds'"]),
    (("label:", "lable:"), ["sweep.runs.0.lable", "did you mean 'label'"]),
    (("metrics: [test_mse,", "metrics: [test_mes,"), ["sweep.metrics.0", "test_mse"]),
    (("configs/digits/mqvae.yaml", "configs/digits/nope.yaml"), ["sweep.runs.1.config", "nope.yaml"]),
])
def test_misspelt_sweep_key_is_a_one_line_error(tmp_path, capsys, edit, needles):
    text = write_sweep(tmp_path).read_text().replace(*edit)
    path = write_sweep(tmp_path, text)
    assert run.main([str(path), "--out", str(tmp_path / "out")]) == 2
    stderr = capsys.readouterr().err
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for needle in [str(path), *needles]:
        assert needle in lines[0], lines[0]


def test_bad_override_of_one_run_fails_before_anything_runs(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(experiment, "run_experiment", lambda *a, **k: calls.append(a))
    text = write_sweep(tmp_path).read_text().replace("hypergradient.type=direct", "hypergradient.type=drect")
    assert run.main([str(write_sweep(tmp_path, text)), *TINY, "--out", str(tmp_path / "out")]) == 2
    assert calls == []


def test_shipped_sweeps_load():
    for path in sorted((ROOT / "configs" / "tables").glob("*.yaml")):
        sweep = load_sweep(path)
        assert sweep.runs and sweep.seeds and sweep.metrics
