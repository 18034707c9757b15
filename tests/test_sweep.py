"""Sweeps: a tiny sweep's results against a hand computation, restart after a kill, one-line errors."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

import run
from engines import experiment
from mqvae.errors import UserError
from mqvae.io.files import read_lines
from mqvae.evaluation.comparison import aggregate, expand, load_sweep, slugify, write_results

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--set", "train.iters=2", "--set", "train.log_every=1", "--set", "train.eval_every=1",
        "--set", "train.checkpoint_every=1", "--set", "model.hidden_channels=8", "--set", "model.res_channels=4",
        "--set", "model.num_res_blocks=1", "--set", "device=cpu", "--set", "data.batch_size=16"]


@pytest.fixture(autouse=True)
def plain_image_quality(monkeypatch):
    """No pretrained-weight lookup per run (it costs seconds): the networks fail to load, as without network
    access and cache, so FID/IS/LPIPS are null with a reason."""
    from mqvae.evaluation import metrics

    def absent(*args, **kwargs):
        raise OSError("weights absent (test)")

    for network in ("FrechetInceptionDistance", "InceptionScore", "LpipsNetwork"):
        monkeypatch.setattr(metrics, network, absent)


def write_sweep(tmp_path, text=None):
    path = tmp_path / "tiny_sweep.yaml"
    path.write_text(text or f"""
sweep:
  title: "Tiny sweep"
  seeds: [0, 1]
  metrics: [test_mse, perplexity, gradient_gap, fid]
  runs:
    - {{label: "VQ-VAE", config: {ROOT}/configs/digits/vqvae.yaml}}
    - {{label: "MQ-VAE (direct)", config: {ROOT}/configs/digits/mqvae.yaml, set: ["hypergradient.type=direct"]}}
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
    # FID is measured in no run here: its column is left out, with the reason.
    # Every mean table shows the rate first: what a position's codes can hold, and carry (metrics.code_rate).
    assert ("| Method | Rate (bits/position) | Code entropy (bits/position) | MSE (10^-3) ↓ | Perplexity ↑ | "
            "Δgap (10^-5) ↓ |\n") in md
    for label in ("VQ-VAE", "MQ-VAE (direct)"):
        per_seed = [json.loads((out / slugify(label) / f"seed{s}" / "metrics.json").read_text()) for s in (0, 1)]
        assert [m["iterations"] for m in per_seed] == [2, 2]
        assert [m["rate_bits"] for m in per_seed] == [7.0, 7.0]  # 128 codes, one group
        entropy = [math.log2(m["perplexity"]) for m in per_seed]
        cells = ["7.00 ± 0.00", f"{statistics.fmean(entropy):.2f} ± {statistics.stdev(entropy):.2f}"]
        for key, scale in (("test_mse", 1e-3), ("perplexity", 1.0), ("gradient_gap", 1e-5)):
            values = [m[key] for m in per_seed]
            cells.append(f"{statistics.fmean(values) / scale:.2f} ± {statistics.stdev(values) / scale:.2f}")
        assert f"| {label} | " + " | ".join(cells) + " |" in md
        row = next(r for r in results["aggregate"] if r["label"] == label)
        assert row["metrics"]["test_mse"]["mean"] == pytest.approx(statistics.fmean(m["test_mse"] for m in per_seed))
    # seeds really differ, and the method's override reached its runs
    seed0, seed1 = ((out / "vq-vae" / f"seed{s}" / "config.yaml").read_text() for s in (0, 1))
    assert "seed: 0" in seed0 and "seed: 1" in seed1
    assert "type: direct" in (out / "mq-vae-direct" / "seed0" / "config.yaml").read_text()
    # The reason of the runs' null FID (here: torch-fidelity is not installed, or its weights are not cached).
    reason = per_seed[0]["fid_reason"]
    assert reason.startswith("FID Inception") and f"Left out, measured in no run: FID ↓ ({reason})." in md


def test_killed_sweep_finishes_only_the_missing_runs(tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    path = write_sweep(tmp_path)
    original = experiment.run_experiment
    calls = []

    def killed_in_third(cfg, run_dir, resume=False, overwrite=False):
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
                return original(cfg, run_dir, resume, overwrite)
            finally:
                monkeypatch.setattr(LevelEngine, "train_step", step)
        return original(cfg, run_dir, resume, overwrite)

    monkeypatch.setattr(experiment, "run_experiment", killed_in_third)
    assert run.main([str(path), *TINY, "--out", str(out)]) == 130
    assert len(calls) == 3
    third = calls[2][0]
    assert (third / "checkpoint.pt").is_file() and not (third / "metrics.json").exists()
    assert not (out / "results.md").exists()

    calls.clear()
    assert run.main([str(path), *TINY, "--out", str(out)]) == 0
    assert calls == [(third, True), (out / "mq-vae-direct" / "seed1", False)]
    steps = [record["step"] for record in read_lines(third / "log.jsonl")]
    assert steps == [1, 1, 2, 2]  # training + eval record per step, nothing duplicated by the resume
    assert json.loads((third / "metrics.json").read_text())["iterations"] == 2

    calls.clear()
    assert run.main([str(path), *TINY, "--out", str(out)]) == 0
    assert calls == []  # everything finished: only the tables are rewritten
    assert len(json.loads((out / "results.json").read_text())["runs"]) == 4


def test_a_diverged_seed_is_counted_and_the_sweep_goes_on(tmp_path):
    # lr 1e38: Adam's first step moves every weight by ~1e38, so the second iteration's loss is not finite.
    path = write_sweep(tmp_path, f"""
sweep:
  seeds: [0, 1]
  metrics: [test_mse]
  runs:
    - {{label: "VQ-VAE", config: {ROOT}/configs/digits/vqvae.yaml}}
    - {{label: "Blow-up", config: {ROOT}/configs/digits/vqvae.yaml, set: ["levels.0.lr=1.0e38"]}}
""")
    out = tmp_path / "sweep"
    assert run.main([str(path), *TINY, "--out", str(out)]) == 0
    diverged = json.loads((out / "blow-up" / "seed1" / "metrics.json").read_text())
    assert "non-finite" in diverged["diverged"] or "NaN or infinite" in diverged["diverged"]
    results = json.loads((out / "results.json").read_text())
    row = next(r for r in results["aggregate"] if r["label"] == "Blow-up")
    assert row["diverged"] == 2 and row["metrics"]["test_mse"]["n"] == 0
    assert next(r for r in results["aggregate"] if r["label"] == "VQ-VAE")["diverged"] == 0
    md = (out / "results.md").read_text()
    assert "| Blow-up (2 of 2 seeds diverged) | n/a |" in md
    # The per-seed table of the main metric shows each run, a diverged one as such.
    finished = [json.loads((out / "vq-vae" / f"seed{s}" / "metrics.json").read_text())["test_mse"] for s in (0, 1)]
    assert "| Method | seed 0 | seed 1 |" in md
    assert f"| VQ-VAE | {finished[0] * 1e3:.2f} | {finished[1] * 1e3:.2f} |" in md
    assert "| Blow-up | diverged | diverged |" in md


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
    (("  runs:", '  baseline: "VQ-VAE (direct)"\n  runs:'),
     ["sweep.baseline", "'VQ-VAE (direct)' names no run", "'VQ-VAE', 'MQ-VAE (direct)'"]),
])
def test_misspelt_sweep_key_is_a_one_line_error(tmp_path, capsys, monkeypatch, edit, needles):
    monkeypatch.setattr(experiment, "run_experiment", lambda *a, **k: pytest.fail("a bad sweep file started a run"))
    text = write_sweep(tmp_path).read_text().replace(*edit)
    path = write_sweep(tmp_path, text)
    assert run.main([str(path), "--out", str(tmp_path / "out")]) == 2
    stderr = capsys.readouterr().err
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for needle in [str(path), *needles]:
        assert needle in lines[0], lines[0]


def fake_sweep(tmp_path, metrics, per_run: dict, seeds, extra=""):
    """A sweep whose runs' metrics.json are written by hand (no training): per_run[label] = {key: [value per
    seed]}, or per_run[label][dataset] = {key: [...]} when ``extra`` sets datasets. Returns results, results.md."""
    runs = "\n".join(f'    - {{label: "{label}", config: {ROOT}/configs/digits/vqvae.yaml}}' for label in per_run)
    text = f"sweep:\n  seeds: {seeds}\n  metrics: [{', '.join(metrics)}]\n{extra}  runs:\n{runs}\n"
    sweep = load_sweep(write_sweep(tmp_path, text))
    planned = expand(sweep, tmp_path / "sweep")
    for run in planned:
        values = per_run[run.label][run.dataset] if run.dataset else per_run[run.label]
        run.run_dir.mkdir(parents=True)
        (run.run_dir / "metrics.json").write_text(json.dumps({k: v[seeds.index(run.seed)] for k, v in values.items()}))
    results = aggregate(sweep, planned, "test_mse")
    write_results(results, tmp_path / "sweep")
    assert json.loads((tmp_path / "sweep" / "results.json").read_text()) == results
    return results, (tmp_path / "sweep" / "results.md").read_text()


T_975_4 = 2.7764451051977987  # Student t, 0.975 quantile, 4 degrees of freedom (from a table)


def two_sided_p_4(t: float) -> float:
    """The paired t-test's two-sided p-value at 4 degrees of freedom, from the t distribution's closed-form CDF
    for 4 degrees: F(t) = 1/2 + (3/8) a (1 - t^2 / (12 (1 + t^2/4))), a = t / sqrt(1 + t^2/4)."""
    t = abs(t)
    a = t / math.sqrt(1 + t * t / 4)
    return 2 * (1 - (0.5 + 3 / 8 * a * (1 - t * t / (12 * (1 + t * t / 4)))))


def test_paired_differences_match_a_hand_computed_t_interval(tmp_path):
    # Method minus baseline per seed, by hand: MSE -0.5, -0.3, -0.4, +0.1, -0.2 (x1e-3; lower is better, so the
    # method is better in 4 of 5 seeds), perplexity +2, +1, +3, +2, +2 (higher is better: 5 of 5), Δgap +1, +2,
    # +1, +2, +1 (x1e-5; lower is better: 0 of 5). FID is null with a reason in every run.
    base = {"test_mse": [1e-3, 2e-3, 3e-3, 4e-3, 5e-3], "perplexity": [10.0, 12.0, 11.0, 13.0, 10.0],
            "gradient_gap": [3e-5, 3e-5, 4e-5, 4e-5, 5e-5], "fid": [None] * 5,
            "fid_reason": ["weights absent (test)"] * 5}
    method = {"test_mse": [0.5e-3, 1.7e-3, 2.6e-3, 4.1e-3, 4.8e-3], "perplexity": [12.0, 13.0, 14.0, 15.0, 12.0],
              "gradient_gap": [4e-5, 5e-5, 5e-5, 6e-5, 6e-5], "fid": [None] * 5,
              "fid_reason": ["weights absent (test)"] * 5}
    results, md = fake_sweep(tmp_path, ["test_mse", "perplexity", "gradient_gap", "fid"],
                             {"VQ-VAE": base, "MQ-VAE": method}, [0, 1, 2, 3, 4])
    assert results["baseline"] == "VQ-VAE"
    assert [row["label"] for row in results["paired"]] == ["MQ-VAE"]
    cells = results["paired"][0]["metrics"]

    def by_hand(differences):
        mean = sum(differences) / 5
        sd = math.sqrt(sum((d - mean) ** 2 for d in differences) / 4)
        half = T_975_4 * sd / math.sqrt(5)
        return mean, [mean - half, mean + half], two_sided_p_4(mean / (sd / math.sqrt(5)))

    tests = {"test_mse": ([-0.5e-3, -0.3e-3, -0.4e-3, 0.1e-3, -0.2e-3], 4),
             "perplexity": ([2.0, 1.0, 3.0, 2.0, 2.0], 5), "gradient_gap": ([1e-5, 2e-5, 1e-5, 2e-5, 1e-5], 0)}
    p = {metric: by_hand(differences)[2] for metric, (differences, _) in tests.items()}
    # Holm over the 3 tests (FID has none): the smallest p times 3, the next times 2, the largest times 1, each
    # at least the one before: perplexity 0.0032 -> 0.0096, Δgap 0.0047 -> 0.0094 -> 0.0096, MSE 0.065.
    order = sorted(p, key=p.get)
    holm, running = {}, 0.0
    for rank, metric in enumerate(order):
        running = max(running, min(1.0, (3 - rank) * p[metric]))
        holm[metric] = running
    assert order == ["perplexity", "gradient_gap", "test_mse"] and holm["gradient_gap"] == holm["perplexity"]
    for metric, (differences, better) in tests.items():
        mean, ci95, _ = by_hand(differences)
        cell = cells[metric]
        assert cell["n"] == 5 and cell["better_seeds"] == better, metric
        assert cell["significant"] is (holm[metric] < 0.05), metric
        assert cell["mean"] == pytest.approx(mean, rel=1e-9)
        assert cell["ci95"] == pytest.approx(ci95, rel=1e-9), metric
        assert cell["p"] == pytest.approx(p[metric], rel=1e-9) and cell["p_holm"] == pytest.approx(holm[metric], rel=1e-9)
    assert results["tests"] == 3 and results["correction"] == "holm"
    assert cells["fid"] == {"mean": None, "ci95": None, "n": 0, "better_seeds": None, "significant": None, "p": None,
                            "reason": "weights absent (test)"}
    assert results["better"] == {"test_mse": "lower", "perplexity": "higher", "gradient_gap": "lower", "fid": "lower"}

    # the md table, in the columns' display factors (MSE x1e-3, Δgap x1e-5), below the mean ± std table
    mse, mse_ci, _ = by_hand([-0.5, -0.3, -0.4, 0.1, -0.2])
    ppl, ppl_ci, _ = by_hand([2.0, 1.0, 3.0, 2.0, 2.0])
    gap, gap_ci, _ = by_hand([1.0, 2.0, 1.0, 2.0, 1.0])
    row = (f"| MQ-VAE | {mse:+.2f} [{mse_ci[0]:+.2f}, {mse_ci[1]:+.2f}]; 4/5 better; p {holm['test_mse']:.2g} (Holm) | "
           f"{ppl:+.2f} [{ppl_ci[0]:+.2f}, {ppl_ci[1]:+.2f}]; 5/5 better; p {holm['perplexity']:.2g} (Holm) | "
           f"{gap:+.2f} [{gap_ci[0]:+.2f}, {gap_ci[1]:+.2f}]; 0/5 better; p {holm['gradient_gap']:.2g} (Holm) |")
    assert row == "| MQ-VAE | -0.26 [-0.55, +0.03]; 4/5 better; p 0.065 (Holm) | +2.00 [+1.12, +2.88]; 5/5 better; " \
                  "p 0.0096 (Holm) | +1.40 [+0.72, +2.08]; 0/5 better; p 0.0096 (Holm) |"
    assert row in md
    assert md.index("| VQ-VAE | ") < md.index("Paired difference from VQ-VAE") < md.index(row)
    assert "- MSE (10^-3) ↓: no method differs significantly from VQ-VAE." in md
    assert "- Perplexity ↑: significantly better than VQ-VAE: MQ-VAE." in md
    assert "- Δgap (10^-5) ↓: significantly worse than VQ-VAE: MQ-VAE." in md
    assert "Holm-corrected over the sweep's 3 paired tests" in md
    assert "FID ↓: not measured" not in md and "Left out, measured in no run: FID ↓ (weights absent (test))." in md


def test_each_reason_for_a_missing_value_is_named_below_the_table(tmp_path):
    # One row lacks the Fig. 6 ratio because no level took a hypergradient, another because two levels did: a single
    # footnote would give the second row the first row's reason.
    runs = {"VQ-VAE": {"test_mse": [1e-3, 2e-3], "implicit_ratio": [None] * 2, "implicit_ratio_reason": ["none took one"] * 2},
            "MQ-VAE": {"test_mse": [1e-3, 2e-3], "implicit_ratio": [1e-3, 2e-3]},
            "MQ-VAE-ddagger": {"test_mse": [1e-3, 2e-3], "implicit_ratio": [None] * 2, "implicit_ratio_reason": ["two took one"] * 2}}
    _, md = fake_sweep(tmp_path, ["test_mse", "implicit_ratio"], runs, [0, 1])
    rows = {line.split(" | ")[0]: line for line in md.splitlines() if line.startswith("| ") and "±" in line}
    assert rows["| VQ-VAE"].endswith("| n/a [implicit_ratio] |") and rows["| MQ-VAE-ddagger"].endswith("| n/a [implicit_ratio, 2] |")
    assert "[implicit_ratio] not measured: none took one" in md and "[implicit_ratio, 2] not measured: two took one" in md


def test_named_baseline_and_better_counts_in_each_direction(tmp_path):
    per_run = {"A": {"accuracy": [0.90, 0.80, 0.85], "cross_entropy": [0.3, 0.5, 0.4]},
               "B": {"accuracy": [0.80, 0.85, 0.70], "cross_entropy": [0.4, 0.4, 0.5]},
               "C": {"accuracy": [0.95, 0.90, 0.90], "cross_entropy": [0.2, 0.3, 0.35]}}
    results, md = fake_sweep(tmp_path, ["accuracy", "cross_entropy"], per_run, [0, 1, 2], extra='  baseline: "B"\n')
    assert results["baseline"] == "B" and [row["label"] for row in results["paired"]] == ["A", "C"]
    a, c = (row["metrics"] for row in results["paired"])
    # A - B: accuracy +0.10, -0.05, +0.15 (higher is better: 2 of 3); cross entropy -0.1, +0.1, -0.1 (lower: 2 of 3)
    assert a["accuracy"]["mean"] == pytest.approx(0.2 / 3) and a["accuracy"]["better_seeds"] == 2
    assert a["cross_entropy"]["mean"] == pytest.approx(-0.1 / 3) and a["cross_entropy"]["better_seeds"] == 2
    # C - B: accuracy +0.15, +0.05, +0.20 (3 of 3); cross entropy -0.2, -0.1, -0.15 (3 of 3)
    assert c["accuracy"]["better_seeds"] == 3 and c["cross_entropy"]["better_seeds"] == 3
    assert "| A | +6.67 " in md  # accuracy in percent


def test_unknown_baseline_is_one_line_listing_the_runs(tmp_path):
    text = write_sweep(tmp_path).read_text().replace("  runs:", '  baseline: "VQVAE"\n  runs:')
    with pytest.raises(UserError) as error:
        load_sweep(write_sweep(tmp_path, text))
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{tmp_path / 'tiny_sweep.yaml'}: sweep.baseline: 'VQVAE'")
    assert "did you mean 'VQ-VAE'?" in message and "(runs: 'VQ-VAE', 'MQ-VAE (direct)')" in message, message


def test_default_baseline_is_the_first_run(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path))
    assert sweep.baseline == "VQ-VAE"
    per_run = {"B": {"test_mse": [2e-3]}, "A": {"test_mse": [1e-3]}}
    results, md = fake_sweep(tmp_path, ["test_mse"], per_run, [0])
    assert results["baseline"] == "B" and [row["label"] for row in results["paired"]] == ["A"]
    # one seed: a difference, but no interval and nothing called significant
    assert results["paired"][0]["metrics"]["test_mse"] == {"mean": pytest.approx(-1e-3), "ci95": None, "n": 1,
                                                         "better_seeds": 1, "significant": None, "p": None}
    assert "| A | -1.00 CI n/a (1 seed); 1/1 better |" in md
    assert "- MSE (10^-3) ↓: no interval (fewer than 2 seeds with a value), so nothing is significant." in md


def test_differences_are_paired_within_each_data_set(tmp_path):
    per_run = {"A": {"d1": {"test_mse": [1e-3, 2e-3]}, "d2": {"test_mse": [5e-3, 6e-3]}},
               "B": {"d1": {"test_mse": [2e-3, 4e-3]}, "d2": {"test_mse": [5e-3, 5e-3]}}}
    results, md = fake_sweep(tmp_path, ["test_mse"], per_run, [0, 1], extra="  datasets: [d1, d2]\n")
    by_dataset = {row["dataset"]: row["metrics"]["test_mse"] for row in results["paired"]}
    assert by_dataset["d1"]["mean"] == pytest.approx(1.5e-3) and by_dataset["d1"]["better_seeds"] == 0
    assert by_dataset["d2"]["mean"] == pytest.approx(-0.5e-3) and by_dataset["d2"]["better_seeds"] == 1
    assert md.index("## d1") < md.index("| B | +1.50 ") < md.index("## d2") < md.index("| B | -0.50 ")


@pytest.mark.parametrize("correction", ["holm", "none"])
def test_comparisons_pair_each_method_with_its_own_baseline(tmp_path, correction):
    # An ablation table compares one change at a time: here C - B and B - A, not everything against A.
    per_run = {"A": {"test_mse": [4e-3, 5e-3, 6e-3]}, "B": {"test_mse": [3e-3, 3e-3, 4.5e-3]},
               "C": {"test_mse": [3e-3, 4e-3, 5e-3]}}
    extra = ('  comparisons:\n    - {method: "C", baseline: "B"}\n    - {method: "B", baseline: "A"}\n'
             f'    - {{method: "C", baseline: "A"}}\n  correction: {correction}\n')
    results, md = fake_sweep(tmp_path, ["test_mse"], per_run, [0, 1, 2], extra=extra)
    assert results["comparisons"] == [["C", "B"], ["B", "A"], ["C", "A"]]
    assert [(row["label"], row["baseline"]) for row in results["paired"]] == [("C", "B"), ("B", "A"), ("C", "A")]
    c_b, b_a, c_a = (row["metrics"]["test_mse"] for row in results["paired"])
    # C - B: 0, +1, +0.5 (x1e-3): better in no seed; B - A: -1, -2, -1.5 (sd 0.5, so the interval is
    # -1.5 ± 4.303 * 0.5 / sqrt(3) = [-2.74, -0.26]); C - A: -1, -1, -1 (no spread)
    assert c_b["mean"] == pytest.approx(0.5e-3) and c_b["better_seeds"] == 0 and c_b["significant"] is False
    assert b_a["mean"] == pytest.approx(-1.5e-3) and b_a["better_seeds"] == 3
    assert b_a["ci95"] == pytest.approx([-2.742e-3, -0.258e-3], abs=1e-6)
    assert c_a["mean"] == pytest.approx(-1e-3) and c_a["ci95"] == pytest.approx([-1e-3, -1e-3])
    # one table per baseline, in the order the comparisons first name them
    assert md.index("Paired difference from B") < md.index("| C | +0.50 ") < md.index("Paired difference from A")
    assert md.index("Paired difference from A") < md.index("| B | -1.50 ") < md.index("| C | -1.00 ")
    assert "- MSE (10^-3) ↓: no method differs significantly from B." in md
    # Paired t-tests at 2 degrees of freedom, p = 1 - |t| / sqrt(2 + t^2): C - B t = 1.73, p 0.225; B - A t = 5.20,
    # p 0.0351; C - A no spread, p 0. Alone, B's interval excludes 0; Holm over the 3 tests multiplies B's p by 2
    # (0.070): only C is significantly better than A.
    assert b_a["p"] == pytest.approx(1 - 5.196152 / math.sqrt(2 + 27), rel=1e-5) and c_a["p"] == 0
    if correction == "holm":
        assert b_a["p_holm"] == pytest.approx(2 * b_a["p"]) and b_a["significant"] is False and c_a["significant"]
        assert "- MSE (10^-3) ↓: significantly better than A: C." in md
    else:
        assert "p_holm" not in b_a and b_a["significant"] is True
        assert "- MSE (10^-3) ↓: significantly better than A: B, C." in md
        assert "each test alone, no correction for their number" in md


@pytest.mark.parametrize("pair, needle", [
    ('{method: "C", baseline: "Z"}', "sweep.comparisons.0.baseline: 'Z' names no run"),
    ('{method: "c", baseline: "A"}', "sweep.comparisons.0.method: 'c' names no run; did you mean 'C'?"),
    ('{method: "A", baseline: "A"}', "sweep.comparisons.0: 'A' is compared with itself"),
    ('{method: "A"}', "sweep.comparisons.0"),
])
def test_a_bad_comparison_is_one_line(tmp_path, pair, needle):
    runs = "\n".join(f'    - {{label: "{label}", config: {ROOT}/configs/digits/vqvae.yaml}}' for label in "ABC")
    path = write_sweep(tmp_path, f"sweep:\n  comparisons:\n    - {pair}\n  runs:\n{runs}\n")
    with pytest.raises(UserError) as error:
        load_sweep(path)
    assert "\n" not in str(error.value) and needle in str(error.value), str(error.value)


def test_bad_override_of_one_run_fails_before_anything_runs(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(experiment, "run_experiment", lambda *a, **k: calls.append(a))
    text = write_sweep(tmp_path).read_text().replace("hypergradient.type=direct", "hypergradient.type=drect")
    assert run.main([str(write_sweep(tmp_path, text)), *TINY, "--out", str(tmp_path / "out")]) == 2
    assert calls == []


def test_a_shipped_sweep_runs_from_another_working_folder(tmp_path, monkeypatch):
    # A researcher keeps runs in a scratch folder: the shipped sweep's configs are found from the sweep file.
    from mqvae.evaluation import evaluate as evaluation

    monkeypatch.setattr(evaluation, "make_image_quality", lambda device, download_weights: None)
    monkeypatch.chdir(tmp_path)
    sweep = ROOT / "configs" / "tables" / "table1_digits.yaml"
    assert run.main([str(sweep), *TINY, "--set", "train.eval_every=0", "--set", "train.checkpoint_every=0",
                     "--seeds", "0", "--out", "scratch"]) == 0
    results = json.loads((tmp_path / "scratch" / "results.json").read_text())
    assert len(results["runs"]) == 9 and all(r["metrics"]["iterations"] == 2 for r in results["runs"])


def test_shipped_sweeps_load():
    for path in sorted((ROOT / "configs" / "tables").glob("*.yaml")):
        sweep = load_sweep(path)
        assert sweep.runs and sweep.seeds and sweep.metrics


def test_huge_values_read_as_powers_of_ten():
    # A collapsed run's gradient gap reaches 1e18 in the column's unit: 20 digits of fixed-point say nothing, and
    # "1.70e+18" is a program's notation.
    from mqvae.evaluation.comparison import format_cell, format_paired_cell

    assert format_cell({"mean": 1.7e13, "std": 1.2e13}, 1e-5) == "1.70×10^18 ± 1.20×10^18"
    assert format_cell({"mean": 1.5e-3, "std": 4e-4}, 1e-3) == "1.50 ± 0.40"
    assert format_cell({"mean": -3.2e-9, "std": 999999e-5}, 1e-5) == "-0.00 ± 999999.00"  # below 10^6: fixed
    cell = {"mean": 2.0e13, "ci95": [-1.0e14, 1.4e14], "better_seeds": 0, "n": 2}
    assert format_paired_cell(cell, 1e-5) == "+2.00×10^18 [-1.00×10^19, +1.40×10^19]; 0/2 better"
