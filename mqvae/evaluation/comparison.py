"""Sweeps: one YAML file lists methods x seeds (x data sets); the results are one table.

Pure functions only (no training here; ``engines.sweep`` runs the runs):
``load_sweep`` validates a sweep file, ``expand`` turns it into the list of runs (config, overrides, run
folder), ``aggregate`` reads the runs' metrics.json into per-method mean ± std over seeds, and
``write_results`` writes results.json, results.md and results.png into the sweep folder.

A sweep file::

    sweep:
      title: "Table 3 ablation on digits"
      seeds: [0, 1, 2]
      metrics: [test_mse, perplexity, gradient_gap, fid, is, lpips]
      runs:
        - {label: "VQ-VAE", config: configs/digits/vqvae.yaml}
        - {label: "MQ-VAE (direct)", config: configs/digits/mqvae.yaml, set: ["hypergradient.type=direct"]}

A run's ``set`` values may name the run's seed as ``{seed}`` (e.g. a prior per seed of a sweep of source runs,
``prior.run=runs/fig3_sources_digits/vq-vae/seed{seed}``).

Optional keys: ``name`` (the sweep folder under runs/, default the file name), ``datasets`` (a list of
``data.name`` values; each run is repeated on each), ``main_metric`` (the bar chart's metric, default
the first of ``metrics``), ``set`` (overrides applied to every run, before each run's own ``set``),
``baseline`` (the label of the run the others are compared with, default the first run), ``comparisons``
(the pairs to compare instead, each ``{method: LABEL, baseline: LABEL}``: comparisons that change one thing at a
time, e.g. MQ-VAE against VQ-VAE with the same codebook optimizer).

Below the mean ± std table, results.md and results.json give each compared method's paired difference from
its baseline per metric: method minus baseline seed by seed (and data set by data set), its mean over the
seeds, the 95% t-interval of that mean, mean ± t(0.975, n - 1) · sd / sqrt(n) (undefined for one seed), and
in how many seeds the method did better in the metric's direction (``BETTER``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Optional


from mqvae.config import build, did_you_mean, quote, quote_key, read_yaml, spec
from mqvae.errors import UserError
from mqvae.io.files import read_lines, save_figure, write_json, write_text
from mqvae.method.tasks import task_of

# metric key -> (column header in the papers' layout, factor the column is reported in). MQ-VAE Tables 1/3:
# "LPIPS (10^-1)", "MSE (10^-3)", "Δgap (10^-5)"; Table 2: accuracy and F1 in percent.
COLUMNS = {
    "fid": ("FID ↓", 1.0),
    "is": ("IS ↑", 1.0),
    "lpips": ("LPIPS (10^-1) ↓", 1e-1),
    "test_mse": ("MSE (10^-3) ↓", 1e-3),
    "accuracy": ("Accuracy (%) ↑", 1e-2),
    "f1": ("F1 Score (%) ↑", 1e-2),
    "cross_entropy": ("CE Loss ↓", 1.0),
    "perplexity": ("Perplexity ↑", 1.0),
    "active_codes": ("Active codes", 1.0),
    "gradient_gap": ("Δgap (10^-5) ↓", 1e-5),
    "test_nll_bits": ("Prior NLL (bits/code) ↓", 1.0),
    "wall_time_s": ("Train time (s)", 1.0),
    "iterations": ("Iterations", 1.0),
    "implicit_ratio": ("‖implicit‖/‖direct‖ (10^-3)", 1e-3),  # Fig. 6; Eq. 13 gives about xi, darts about 1
    "rate_bits": ("Rate (bits/position)", 1.0),
    "entropy_bits": ("Code entropy (bits/position)", 1.0),
}

# Shown in every mean table, before the sweep's metrics, and never tested: what a position's codes can hold and
# what they carry (metrics.code_rate), so that rows whose code layouts differ (grouped codes, another codebook size)
# are not compared silently. Perplexity and active codes count the whole codebook; metrics.json has them per group.
RATE_COLUMNS = ["rate_bits", "entropy_bits"]

# Which way a metric improves (the ↓ / ↑ of its header); it decides "better in k of n seeds" and whether a
# significant difference is better or worse. Train time and iterations are costs, not results: no side.
BETTER = {
    "fid": "lower", "lpips": "lower", "test_mse": "lower", "cross_entropy": "lower", "gradient_gap": "lower",
    "test_nll_bits": "lower",
    "is": "higher", "accuracy": "higher", "f1": "higher", "perplexity": "higher", "active_codes": "higher",
}


@dataclass
class SweepRun:
    label: str = spec(dataclasses.MISSING)
    config: str = spec(dataclasses.MISSING)
    # --set style overrides of this method, e.g. ["hypergradient.type=direct"]; ``{seed}`` in a value stands for
    # the run's seed, e.g. ["prior.run=runs/fig3_sources_digits/vq-vae/seed{seed}"] (a prior per source seed)
    set: list[str] = spec(factory=list)


@dataclass
class SweepComparison:
    method: str = spec(dataclasses.MISSING)
    baseline: str = spec(dataclasses.MISSING)


@dataclass
class Sweep:
    runs: list[SweepRun] = spec(dataclasses.MISSING)
    title: str = ""
    name: str = ""
    seeds: list[int] = spec(factory=lambda: [0])
    metrics: list[str] = spec(factory=lambda: ["test_mse", "perplexity", "gradient_gap"])
    main_metric: str = ""
    datasets: list[str] = spec(factory=list)
    # --set style overrides applied to every run (before each run's own ``set``)
    set: list[str] = spec(factory=list)
    # label of the run every other run's paired difference is taken from; default the first run
    baseline: str = ""
    # the (method, baseline) pairs whose paired differences are reported; default every run against ``baseline``
    comparisons: list[SweepComparison] = spec(factory=list)
    # How "significant" accounts for testing every comparison x metric of the sweep at once: holm (Holm's
    # step-down correction of the paired t-tests' p-values, over the metrics that have a better side) or none
    # (each 95% interval alone).
    correction: str = spec("holm", choices=["holm", "none"])


@dataclass
class PlannedRun:
    """One (method, data set, seed) of a sweep: what run_experiment gets."""

    label: str
    slug: str
    dataset: Optional[str]
    seed: int
    config: Path
    overrides: list[str]
    run_dir: Path


def slugify(label: str) -> str:
    """'VQ-VAE + alt' -> 'vq-vae-alt' (the run's folder name)."""
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-") or "run"


def is_sweep_file(data: dict) -> bool:
    return isinstance(data, dict) and "sweep" in data


def _resolve_config(text: str, sweep_path: Path) -> Optional[Path]:
    """A run's config path, relative to the sweep file's folder (an absolute path is itself), so that a sweep
    runs the same from any working folder; None when no file is there."""
    candidate = sweep_path.parent / text
    return candidate if candidate.is_file() else None


def parse_seeds(text: str) -> list[int]:
    """``--seeds 0,1,2`` -> [0, 1, 2]."""
    parts = [part.strip() for part in text.split(",")]
    if not all(part.isdecimal() for part in parts):
        raise UserError(f"--seeds {quote_key(text)}: expected non-negative integers separated by commas, e.g. --seeds 0,1,2")
    return [int(part) for part in parts]


def load_sweep(path: str | Path, seeds: Optional[list[int]] = None) -> Sweep:
    """Read and validate a sweep file; every problem is a one-line UserError naming the file and key.
    ``seeds`` (``--seeds``) replaces the file's ``sweep.seeds`` and is checked as they are."""
    path = Path(path)
    data = read_yaml(path)
    where = str(path) if seeds is None else f"{path} with --seeds"
    for key in data:
        if key != "sweep":
            hint = did_you_mean(str(key), ["sweep"])
            raise UserError(f"{where}: {quote_key(key)}: unknown top-level key in a sweep file; {hint}(a sweep file holds only 'sweep')")
    body = data["sweep"]
    if not isinstance(body, dict):
        raise UserError(f"{where}: sweep: expected a mapping of sweep keys (title, seeds, metrics, runs, ...), got {quote(body)}")
    if seeds is not None:
        body = {**body, "seeds": seeds}
    sweep = build(Sweep, body, where, "sweep")
    if not sweep.runs:
        raise UserError(f"{where}: sweep.runs: at least one run is required")
    if not sweep.seeds:
        raise UserError(f"{where}: sweep.seeds: at least one seed is required")
    if len(set(sweep.seeds)) != len(sweep.seeds) or any(s < 0 for s in sweep.seeds):
        raise UserError(f"{where}: sweep.seeds: seeds must be distinct non-negative integers, got {quote(sweep.seeds)}")
    for i, metric in enumerate(sweep.metrics + ([sweep.main_metric] if sweep.main_metric else [])):
        if metric not in COLUMNS:
            hint = did_you_mean(metric, COLUMNS)
            key = f"sweep.metrics.{i}" if i < len(sweep.metrics) else "sweep.main_metric"
            raise UserError(f"{where}: {key}: unknown metric {quote(metric)}; {hint}(known: {', '.join(COLUMNS)})")
    if not sweep.metrics:
        raise UserError(f"{where}: sweep.metrics: at least one metric is required")
    slugs = {}
    for i, run in enumerate(sweep.runs):
        slug = slugify(run.label)
        if slug in slugs:
            raise UserError(f"{where}: sweep.runs.{i}.label: {quote(run.label)} gives the same folder name {quote(slug)} as "
                            f"{quote(slugs[slug])}; labels must differ")
        slugs[slug] = run.label
        resolved = _resolve_config(run.config, path)
        if resolved is None:
            raise UserError(f"{where}: sweep.runs.{i}.config: file {quote(run.config)} not found in "
                            f"{quote(str(path.parent))} (a run's config is read relative to the sweep file's folder)")
        run.config = str(resolved)
    labels = [run.label for run in sweep.runs]
    if sweep.baseline and sweep.baseline not in labels:
        hint = did_you_mean(sweep.baseline, labels)
        raise UserError(f"{where}: sweep.baseline: {quote(sweep.baseline)} names no run; {hint}"
                        f"(runs: {', '.join(quote(label) for label in labels[:20])})")
    for i, pair in enumerate(sweep.comparisons):
        for key in ("method", "baseline"):
            label = getattr(pair, key)
            if label not in labels:
                raise UserError(f"{where}: sweep.comparisons.{i}.{key}: {quote(label)} names no run; "
                                f"{did_you_mean(label, labels)}(runs: {', '.join(quote(x) for x in labels[:20])})")
        if pair.method == pair.baseline:
            raise UserError(f"{where}: sweep.comparisons.{i}: {quote(pair.method)} is compared with itself")
    sweep.name = sweep.name or path.stem
    sweep.main_metric = sweep.main_metric or sweep.metrics[0]
    sweep.baseline = sweep.baseline or labels[0]
    if not sweep.comparisons:
        sweep.comparisons = [SweepComparison(label, sweep.baseline) for label in labels if label != sweep.baseline]
    return sweep


def expand(sweep: Sweep, sweep_dir: Path, overrides: list[str] = ()) -> list[PlannedRun]:
    """Every (data set, method, seed) as a run. Override order: the sweep's ``set``, the method's ``set``, the seed, the data set,
    then the command line's ``--set`` (which therefore applies to every run)."""
    planned = []
    for dataset in sweep.datasets or [None]:
        for run in sweep.runs:
            for seed in sweep.seeds:
                folder = Path(sweep_dir, *([dataset] if dataset else []), slugify(run.label), f"seed{seed}")
                extra = [f"data.name={dataset}"] if dataset else []
                own = [text.replace("{seed}", str(seed)) for text in run.set]
                planned.append(PlannedRun(run.label, slugify(run.label), dataset, seed, Path(run.config),
                                          [*sweep.set, *own, f"seed={seed}", *extra, *overrides], folder))
    return planned


# -- results --------------------------------------------------------------------------------------

def read_metrics(run: PlannedRun) -> Optional[dict]:
    """The run's metrics.json, or None when it has none that reads back as a mapping (a torn file from a
    foreign writer counts as missing: the sweep then trains the run again)."""
    path = run.run_dir / "metrics.json"
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return metrics if isinstance(metrics, dict) else None


def _number(value) -> Optional[float]:
    """A metric's value as a float; None when the metric is null, missing or not finite."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def summarize(values: list) -> dict:
    """Mean and sample standard deviation (n - 1; None for one seed, which has no spread) of the non-null values."""
    numbers = [v for v in map(_number, values) if v is not None]
    if not numbers:
        return {"mean": None, "std": None, "n": 0}
    std = statistics.stdev(numbers) if len(numbers) > 1 else None
    return {"mean": statistics.fmean(numbers), "std": std, "n": len(numbers)}


def _gain(difference: float, better: str) -> float:
    """A method-minus-baseline difference signed so that positive means the method did better."""
    return difference if better == "higher" else -difference


def paired_difference(method: list, baseline: list, better: Optional[str]) -> dict:
    """Method minus baseline over the seeds where both have a value (``method[i]`` and ``baseline[i]`` are
    the same seed): mean, 95% t-interval (None below 2 seeds: one difference has no spread), whether the
    interval excludes 0 (``significant``, before any correction for many tests: ``correct``), the paired t-test's
    two-sided p-value, and in how many seeds the method did better (None for a metric without a side)."""
    pairs = [(_number(m), _number(b)) for m, b in zip(method, baseline)]
    differences = [m - b for m, b in pairs if m is not None and b is not None]
    n = len(differences)
    if n == 0:
        return {"mean": None, "ci95": None, "n": 0, "better_seeds": None, "significant": None, "p": None}
    mean = statistics.fmean(differences)
    ci95 = p = None
    if n > 1:
        from scipy.stats import t as student_t  # (half a second of imports, not paid by a run that makes no table)

        error = statistics.stdev(differences) / math.sqrt(n)
        half = float(student_t.ppf(0.975, n - 1)) * error
        ci95 = [mean - half, mean + half]
        # (No spread: the same difference in every seed, certain unless it is 0.)
        p = 2 * float(student_t.sf(abs(mean) / error, n - 1)) if error > 0 else float(mean == 0)
    better_seeds = sum(_gain(d, better) > 0 for d in differences) if better else None
    significant = None if ci95 is None else (ci95[0] > 0 or ci95[1] < 0)
    return {"mean": mean, "ci95": ci95, "n": n, "better_seeds": better_seeds, "significant": significant, "p": p}


def correct(paired: list[dict], better: dict, method: str) -> int:
    """Holm's step-down correction over every tested cell (comparison x metric with a better side) of a sweep:
    each such cell gets ``p_holm`` and is ``significant`` when p_holm < 0.05, which holds the chance of any false
    "significant" in the whole table at 5 %. Cells of metrics without a side (costs such as the wall time, and
    diagnostics such as the Fig. 6 ratio) keep their own 95 % interval. Returns the number of tests corrected."""
    if method == "none":
        return 0
    cells = [row["metrics"][m] for row in paired for m in row["metrics"]
             if better.get(m) is not None and row["metrics"][m]["p"] is not None]
    running = 0.0
    for rank, cell in enumerate(sorted(cells, key=lambda c: c["p"])):
        running = max(running, min(1.0, (len(cells) - rank) * cell["p"]))  # adjusted p-values never decrease
        cell["p_holm"] = running
        cell["significant"] = running < 0.05
    return len(cells)


def paired_table(sweep: Sweep, runs: list[dict], table: list[dict]) -> list[dict]:
    """Per (data set, comparison): every metric's paired_difference of the method from its baseline on the same
    data set, seed by seed. A metric with no pair keeps the reason it was not measured."""
    values = {(run["dataset"], run["label"], run["seed"]): run["metrics"] or {} for run in runs}
    rows = {(row["dataset"], row["label"]): row for row in table}
    paired = []
    for dataset in dict.fromkeys(row["dataset"] for row in table):
        for pair in sweep.comparisons:
            cells = {}
            for metric in sweep.metrics:
                method = [values[(dataset, pair.method, seed)].get(metric) for seed in sweep.seeds]
                baseline = [values[(dataset, pair.baseline, seed)].get(metric) for seed in sweep.seeds]
                cell = paired_difference(method, baseline, BETTER.get(metric))
                reason = (rows[(dataset, pair.method)]["metrics"][metric].get("reason")
                          or rows[(dataset, pair.baseline)]["metrics"][metric].get("reason"))
                if cell["n"] == 0 and reason:
                    cell["reason"] = reason
                cells[metric] = cell
            paired.append({"label": pair.method, "baseline": pair.baseline, "dataset": dataset, "metrics": cells})
    return paired


def curve_key(configs) -> Optional[str]:
    """The test metric of the sweep's curves: that of its runs' task (``configs``: the runs' resolved configs, so
    also when no run has metrics yet); None for runs of different tasks, which have none in common."""
    tasks = {task_of(cfg) for cfg in configs}
    return next(iter(tasks)).curve_key if len(tasks) == 1 else None


def aggregate(sweep: Sweep, planned: list[PlannedRun], curve_key: Optional[str]) -> dict:
    """results.json's content: every run's metrics, per (data set, method) mean ± std over seeds, and per
    (data set, comparison) the paired difference of the method from its baseline; ``curve_key`` is the
    test metric the curves of results.png show (``curve_key(configs)``)."""
    runs, groups = [], {}
    for run in planned:
        metrics = read_metrics(run)
        runs.append({"label": run.label, "dataset": run.dataset, "seed": run.seed, "run_dir": str(run.run_dir),
                     "config": str(run.config), "overrides": run.overrides, "metrics": metrics})
        groups.setdefault((run.dataset, run.label), []).append(metrics or {})
    table = []
    for (dataset, label), per_seed in groups.items():
        # A diverged seed has no metrics: the means are over the other seeds, and the row says how many diverged.
        row = {"label": label, "dataset": dataset, "seeds": len(per_seed),
               "diverged": sum("diverged" in m for m in per_seed), "metrics": {}}
        for metric in [*RATE_COLUMNS, *(m for m in sweep.metrics if m not in RATE_COLUMNS)]:
            summary = summarize([m.get(metric) for m in per_seed])
            reasons = sorted({m[f"{metric}_reason"] for m in per_seed if m.get(f"{metric}_reason")})
            if reasons:
                summary["reason"] = reasons[0]
            row["metrics"][metric] = summary
        table.append(row)
    paired = paired_table(sweep, runs, table)
    tests = correct(paired, BETTER, sweep.correction)
    return {"title": sweep.title, "name": sweep.name, "seeds": sweep.seeds, "metrics": sweep.metrics,
            "main_metric": sweep.main_metric, "curve_key": curve_key, "scales": {m: COLUMNS[m][1] for m in sweep.metrics},
            "better": {m: BETTER.get(m) for m in sweep.metrics}, "baseline": sweep.baseline,
            "comparisons": [[pair.method, pair.baseline] for pair in sweep.comparisons],
            "aggregate": table, "paired": paired, "correction": sweep.correction, "tests": tests, "runs": runs}


def format_cell(summary: dict, scale: float) -> str:
    """'mean ± std' in the column's unit (two decimals), 'mean (1 seed)' without a spread, 'n/a' when no seed
    has the metric."""
    if summary.get("mean") is None:
        return "n/a"
    if summary.get("std") is None:
        return f"{_shown(summary['mean'] / scale)} (1 seed)"
    return f"{_shown(summary['mean'] / scale)} ± {_shown(summary['std'] / scale)}"


def _shown(value: float, sign: str = "") -> str:
    """Two decimals in the column's unit; a magnitude of a million or more (a collapsed run's Δgap) as
    m×10^k, so that it reads as what it is: 1.25×10^13, not 12500000000000.00 or 1.25e+13."""
    if abs(value) < 1e6 or not math.isfinite(value):
        return f"{value:{sign}.2f}"
    mantissa, exponent = f"{value:{sign}.2e}".split("e")
    return f"{mantissa}×10^{int(exponent)}"


def _na_cell(summary: dict, metric: str, notes: dict) -> str:
    """'n/a [metric]' and the reason noted below the tables when one is known, else plain 'n/a'. Rows of one column
    may lack a value for different reasons (no hypergradient in one method, two levels' in another): each reason
    gets its own mark, 'n/a [metric]' for the first, 'n/a [metric, 2]' for the second, ..."""
    if not summary.get("reason"):
        return "n/a"
    reasons = notes.setdefault(metric, [])
    if summary["reason"] not in reasons:
        reasons.append(summary["reason"])
    return f"n/a [{_note_mark(metric, reasons.index(summary['reason']))}]"


def _note_mark(metric: str, index: int) -> str:
    return metric if index == 0 else f"{metric}, {index + 1}"


def format_paired_cell(cell: dict, scale: float) -> str:
    """'mean [CI low, CI high]; k/n better' in the column's unit, signed; 'CI n/a (1 seed)' where one seed
    gives no interval."""
    text = f"{_shown(cell['mean'] / scale, '+')} "
    if cell["ci95"] is None:
        text += "CI n/a (1 seed)"
    else:
        text += "[" + ", ".join(_shown(bound / scale, "+") for bound in cell["ci95"]) + "]"
    if cell["better_seeds"] is not None:
        text += f"; {cell['better_seeds']}/{cell['n']} better"
    if cell.get("p_holm") is not None:
        text += f"; p {cell['p_holm']:.2g} (Holm)"
    return text


def _table(header: list[str], rows: list[tuple[str, list[str]]]) -> list[str]:
    lines = ["| Method | " + " | ".join(header) + " |", "|---|" + "---|" * len(header)]
    return lines + [f"| {label} | " + " | ".join(cells) + " |" for label, cells in rows]


def _measured(results: dict) -> list[str]:
    """The sweep's metrics that some run measured: a column that is n/a in every row is left out of the
    tables (results_markdown says which and why)."""
    return [m for m in results["metrics"] if any(row["metrics"][m].get("mean") is not None for row in results["aggregate"])]


def _mean_table(results: dict, dataset: Optional[str], notes: dict) -> list[str]:
    # The rate columns of runs made before metrics.json held them are n/a; a sweep's metrics may list them too.
    metrics = [*(m for m in RATE_COLUMNS if m not in results["metrics"]), *_measured(results)]
    rows = []
    for row in (r for r in results["aggregate"] if r["dataset"] == dataset):
        cells = []
        for m in metrics:
            if m not in row["metrics"]:  # a results.json written before the rate columns
                cells.append("n/a")
                continue
            cell = format_cell(row["metrics"][m], COLUMNS[m][1])
            cells.append(_na_cell(row["metrics"][m], m, notes) if cell == "n/a" else cell)
        rows.append((_row_label(row), cells))
    return _table([COLUMNS[m][0] for m in metrics], rows)


def _row_label(row: dict) -> str:
    if not row["diverged"]:
        return row["label"]
    return f"{row['label']} ({row['diverged']} of {row['seeds']} seeds diverged)"


def _paired_table(results: dict, baseline: str, paired: list[dict], notes: dict) -> list[str]:
    """The paired differences of ``paired`` (rows with one baseline)."""
    metrics = _measured(results)
    rows = []
    for row in paired:
        cells = []
        for m in metrics:
            cell = row["metrics"][m]
            cells.append(_na_cell(cell, m, notes) if cell["mean"] is None else format_paired_cell(cell, COLUMNS[m][1]))
        rows.append((row["label"], cells))
    return [f"Paired difference from {baseline} (method − baseline, seed by seed; cells: mean "
            "[95% interval]; seeds in which the method did better):", "",
            *_table([COLUMNS[m][0] for m in metrics], rows)]


def _per_seed_table(results: dict, dataset: Optional[str]) -> list[str]:
    """The main metric of every run, seed by seed: the spread and the outliers the means summarize."""
    metric, seeds = results["main_metric"], results["seeds"]
    scale = COLUMNS[metric][1]
    values = {(run["label"], run["seed"]): run["metrics"] or {} for run in results["runs"] if run["dataset"] == dataset}
    rows = []
    for label in dict.fromkeys(label for label, _ in values):
        cells = []
        for seed in seeds:
            metrics = values[(label, seed)]
            number = _number(metrics.get(metric))
            cells.append("diverged" if "diverged" in metrics else "n/a" if number is None else _shown(number / scale))
        rows.append((label, cells))
    return [f"{COLUMNS[metric][0]} per seed:", "", *_table([f"seed {seed}" for seed in seeds], rows)]


def _verdict(cell: dict, better: Optional[str]) -> str:
    """How a significant difference reads: better / worse, or higher / lower for a metric without a side."""
    if better is None:
        return "higher" if cell["mean"] > 0 else "lower"
    return "better" if _gain(cell["mean"], better) > 0 else "worse"


def _significance(results: dict, baseline: str, paired: list[dict]) -> list[str]:
    """One sentence per metric: which methods differ from ``baseline`` (Holm-corrected, or CI excludes 0), or none."""
    lines = []
    for m in _measured(results):
        cells = [(row["label"], row["metrics"][m]) for row in paired]
        groups = {}
        for label, cell in cells:
            if cell["significant"]:
                groups.setdefault(_verdict(cell, results["better"][m]), []).append(label)
        untested = [label for label, cell in cells if cell["significant"] is None]
        if all(cell["n"] == 0 for _, cell in cells):
            sentence = "not measured, no difference"
        elif groups:
            sentence = "; ".join(f"significantly {verdict} than {baseline}: {', '.join(labels)}"
                                 for verdict, labels in sorted(groups.items()))
        elif len(untested) == len(cells):
            sentence = "no interval (fewer than 2 seeds with a value), so nothing is significant"
        else:
            sentence = f"no method differs significantly from {baseline}"
        if untested and len(untested) < len(cells):
            sentence += f" (no interval for {', '.join(untested)}: fewer than 2 seeds with a value)"
        lines.append(f"- {COLUMNS[m][0]}: {sentence}.")
    return lines


def results_markdown(results: dict) -> str:
    """Per data set: rows = methods, columns = metrics (the papers' headers and scale factors), mean ± std
    over seeds; below it each other method's paired difference from the baseline and what is significant."""
    lines = [f"# {results['title'] or results['name']}", ""]
    datasets = list(dict.fromkeys(row["dataset"] for row in results["aggregate"]))
    notes = {}
    for dataset in datasets:
        if dataset is not None:
            lines += [f"## {dataset}", ""]
        lines += [*_mean_table(results, dataset, notes), ""]
        lines += [*_per_seed_table(results, dataset), ""]
        paired = [row for row in results["paired"] if row["dataset"] == dataset]
        # One table per baseline, in the order the comparisons name them.
        for baseline in dict.fromkeys(row["baseline"] for row in paired):
            rows = [row for row in paired if row["baseline"] == baseline]
            lines += [*_paired_table(results, baseline, rows, notes), "", _significance_header(results),
                      *_significance(results, baseline, rows), ""]
    seeds = results["seeds"]
    lines.append(f"Mean ± sample standard deviation over {len(seeds)} seed(s) {seeds}; a column header's "
                 "(10^-k) means the values are shown divided by 10^-k (metrics.json and results.json hold unscaled values).")
    if results["paired"]:
        lines += ["", f"Paired difference: per seed{' and data set' if datasets != [None] else ''}, the method's "
                  "value minus its baseline's, in the column's unit; mean over the seeds, its 95% "
                  "t-interval [mean ± t(0.975, n−1)·sd/√n] and in how many of the n seeds the method did "
                  "better (lower for a ↓ column, higher for ↑ and active codes); with Holm's correction (the sweep's "
                  "`correction`, on by default) also the paired t-test's p-value after the correction, and a "
                  "difference is significant when it is below 0.05, so an interval that excludes 0 need not be; "
                  "one seed gives no interval."]
    left_out = [m for m in results["metrics"] if m not in _measured(results)]
    if left_out:
        lines += ["", "Left out, measured in no run: " + "; ".join(
            f"{COLUMNS[m][0]} ({_reason(results, m) or 'no value'})" for m in left_out) + "."]
    for metric, reasons in notes.items():
        for i, reason in enumerate(reasons):
            lines += ["", f"[{_note_mark(metric, i)}] not measured: {reason}"]
    return "\n".join(lines) + "\n"


def _reason(results: dict, metric: str) -> Optional[str]:
    return next((row["metrics"][metric]["reason"] for row in results["aggregate"] if row["metrics"][metric].get("reason")),
                None)


def _significance_header(results: dict) -> str:
    if results.get("correction", "none") == "holm":
        return (f"Significant (Holm-corrected over the sweep's {results['tests']} paired tests of metrics with a "
                "better side, family-wise error 5 %; a column without a side: its 95% interval excludes 0):")
    return "Significant at 95% (the interval excludes 0; each test alone, no correction for their number):"


def _curve_points(run: dict, key: str) -> list[tuple[float, float]]:
    """(wall-clock training seconds, test metric) from the run's eval records in log.jsonl, ending with
    the final evaluation from metrics.json."""
    points = []
    log = Path(run["run_dir"]) / "log.jsonl"
    if log.is_file():
        for record in read_lines(log):
            if key in record and "time_s" in record:
                points.append((record["time_s"], record[key]))
    final = run.get("metrics") or {}
    if final.get(key) is not None and final.get("wall_time_s") is not None:
        if not points or final["wall_time_s"] > points[-1][0]:
            points.append((final["wall_time_s"], final[key]))
    return points


def _paired_panel(ax, results: dict) -> None:
    """The main metric's paired differences (method − baseline, seed by seed) with their 95% intervals, the
    intervals the text's verdicts read; a symmetric-log axis, so that a collapsed method's difference does not
    squash the others (linear within the typical difference, logarithmic beyond it)."""
    main = results["main_metric"]
    header, scale = COLUMNS[main]
    cells = [(row, row["metrics"][main]) for row in results["paired"]]
    cells = [(row, cell) for row, cell in cells if cell["mean"] is not None]
    ax.set_title(f"{header}: method − baseline (paired 95% interval)", fontsize=9)
    ax.set_ylabel(f"difference in {header}")
    ax.set_xlabel("method vs its baseline")
    if not cells:
        ax.text(0.5, 0.5, "no paired difference measured", ha="center", va="center", transform=ax.transAxes,
                color="gray")
        return
    names = [f"{row['label']}\nvs {row['baseline']}" + (f" ({row['dataset']})" if row["dataset"] else "")
             for row, _ in cells]
    means = [cell["mean"] / scale for _, cell in cells]
    low = [cell["mean"] / scale - (cell["ci95"][0] / scale if cell["ci95"] else cell["mean"] / scale) for _, cell in cells]
    high = [(cell["ci95"][1] / scale if cell["ci95"] else cell["mean"] / scale) - cell["mean"] / scale for _, cell in cells]
    colors = ["tab:red" if cell["significant"] else "tab:gray" for _, cell in cells]
    for i, (mean, lo, hi, color) in enumerate(zip(means, low, high, colors)):
        ax.errorbar(i, mean, yerr=[[lo], [hi]], fmt="o", color=color, capsize=4)
    ax.axhline(0.0, color="black", linewidth=0.8)
    typical = sorted(abs(m) for m in means if m != 0)
    if typical:
        ax.set_yscale("symlog", linthresh=typical[len(typical) // 2])
    ax.set_xticks(range(len(cells)), names, rotation=30, ha="right", fontsize=7)
    ax.set_xlim(-0.5, len(cells) - 0.5)
    ax.text(0.01, 0.99, "red: significant" + (" (Holm)" if results.get("correction") == "holm" else ""),
            transform=ax.transAxes, va="top", fontsize=7, color="tab:red")


def save_results_plot(results: dict, path: Path) -> None:
    """The main metric's paired differences with their 95% intervals (``_paired_panel``), and the test metric
    against training wall-clock time per method and seed (MQ-VAE Fig. 4)."""
    from matplotlib import rcParams
    from matplotlib.figure import Figure

    rows = results["aggregate"]
    fig = Figure(figsize=(13, 4.6), dpi=110)
    axes = fig.subplots(1, 2)
    names = [row["label"] if row["dataset"] is None else f"{row['label']}\n{row['dataset']}" for row in rows]
    _paired_panel(axes[0], results)

    curve_key = results["curve_key"]
    colors = rcParams["axes.prop_cycle"].by_key()["color"]
    if curve_key is None:
        axes[1].set_title("test metric against time")
        axes[1].text(0.5, 0.5, "runs of different tasks: no common test metric", ha="center", va="center",
                     transform=axes[1].transAxes, color="gray")
    else:
        curve_header, curve_scale = COLUMNS[curve_key]
        axes[1].set_title(f"test {curve_header} against time")
    for i, row in enumerate(rows if curve_key is not None else []):
        first = True
        for run in results["runs"]:
            if run["label"] != row["label"] or run["dataset"] != row["dataset"]:
                continue
            points = _curve_points(run, curve_key)
            if points:
                xs, ys = zip(*points)
                axes[1].plot(xs, [y / curve_scale for y in ys], color=colors[i % len(colors)], marker=".",
                             alpha=0.8, label=names[i].replace("\n", " ") if first else None)
                first = False
    axes[1].set_xlabel("training wall-clock time (s)")
    if curve_key is not None:
        axes[1].set_ylabel(f"test {COLUMNS[curve_key][0]}")
    if axes[1].lines:
        axes[1].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def write_results(results: dict, sweep_dir: Path) -> None:
    sweep_dir = Path(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    write_json(sweep_dir / "results.json", results)
    write_text(sweep_dir / "results.md", results_markdown(results))
    save_results_plot(results, sweep_dir / "results.png")
