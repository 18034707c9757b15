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

Optional keys: ``name`` (the sweep folder under runs/, default the file name), ``datasets`` (a list of
``data.name`` values; each run is repeated on each), ``main_metric`` (the bar chart's metric, default
the first of ``metrics``), ``set`` (overrides applied to every run, before each run's own ``set``).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .config import build, read_yaml, spec
from .errors import UserError

ROOT = Path(__file__).resolve().parents[1]

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
    "wall_time_s": ("Train time (s)", 1.0),
    "iterations": ("Iterations", 1.0),
}


@dataclass
class SweepRun:
    label: str = spec(dataclasses.MISSING)
    config: str = spec(dataclasses.MISSING)
    # --set style overrides of this method, e.g. ["hypergradient.type=direct"]
    set: list[str] = spec(factory=list)


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
    """A run's config path: as given (relative to the working folder), else relative to the sweep file,
    else relative to the project root."""
    for candidate in (Path(text), sweep_path.parent / text, ROOT / text):
        if candidate.is_file():
            return candidate
    return None


def load_sweep(path: str | Path) -> Sweep:
    """Read and validate a sweep file; every problem is a one-line UserError naming the file and key."""
    path = Path(path)
    data = read_yaml(path)
    where = str(path)
    for key in data:
        if key != "sweep":
            close = difflib.get_close_matches(str(key), ["sweep"], n=1)
            hint = "did you mean 'sweep'? " if close else ""
            raise UserError(f"{where}: {key}: unknown top-level key in a sweep file; {hint}(a sweep file holds only 'sweep')")
    body = data["sweep"]
    if not isinstance(body, dict):
        raise UserError(f"{where}: sweep: expected a mapping of sweep keys (title, seeds, metrics, runs, ...), got {body!r}")
    sweep = build(Sweep, body, where, "sweep")
    if not sweep.runs:
        raise UserError(f"{where}: sweep.runs: at least one run is required")
    if not sweep.seeds:
        raise UserError(f"{where}: sweep.seeds: at least one seed is required")
    if len(set(sweep.seeds)) != len(sweep.seeds) or any(s < 0 for s in sweep.seeds):
        raise UserError(f"{where}: sweep.seeds: seeds must be distinct non-negative integers, got {sweep.seeds}")
    for i, metric in enumerate(sweep.metrics + ([sweep.main_metric] if sweep.main_metric else [])):
        if metric not in COLUMNS:
            close = difflib.get_close_matches(metric, list(COLUMNS), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            key = f"sweep.metrics.{i}" if i < len(sweep.metrics) else "sweep.main_metric"
            raise UserError(f"{where}: {key}: unknown metric '{metric}'; {hint}(known: {', '.join(COLUMNS)})")
    if not sweep.metrics:
        raise UserError(f"{where}: sweep.metrics: at least one metric is required")
    slugs = {}
    for i, run in enumerate(sweep.runs):
        slug = slugify(run.label)
        if slug in slugs:
            raise UserError(f"{where}: sweep.runs.{i}.label: '{run.label}' gives the same folder name '{slug}' as "
                            f"'{slugs[slug]}'; labels must differ")
        slugs[slug] = run.label
        resolved = _resolve_config(run.config, path)
        if resolved is None:
            raise UserError(f"{where}: sweep.runs.{i}.config: file '{run.config}' not found")
        run.config = str(resolved)
    sweep.name = sweep.name or path.stem
    sweep.main_metric = sweep.main_metric or sweep.metrics[0]
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
                planned.append(PlannedRun(run.label, slugify(run.label), dataset, seed, Path(run.config),
                                          [*sweep.set, *run.set, f"seed={seed}", *extra, *overrides], folder))
    return planned


# -- results --------------------------------------------------------------------------------------

def read_metrics(run: PlannedRun) -> Optional[dict]:
    path = run.run_dir / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else None


def summarize(values: list) -> dict:
    """Mean and sample standard deviation (n - 1; 0 for one seed) of the non-null values."""
    numbers = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    if not numbers:
        return {"mean": None, "std": None, "n": 0}
    std = statistics.stdev(numbers) if len(numbers) > 1 else 0.0
    return {"mean": statistics.fmean(numbers), "std": std, "n": len(numbers)}


def aggregate(sweep: Sweep, planned: list[PlannedRun]) -> dict:
    """results.json's content: every run's metrics, and per (data set, method) mean ± std over seeds."""
    runs, groups = [], {}
    for run in planned:
        metrics = read_metrics(run)
        runs.append({"label": run.label, "dataset": run.dataset, "seed": run.seed, "run_dir": str(run.run_dir),
                     "config": str(run.config), "overrides": run.overrides, "metrics": metrics})
        groups.setdefault((run.dataset, run.label), []).append(metrics or {})
    table = []
    for (dataset, label), per_seed in groups.items():
        row = {"label": label, "dataset": dataset, "seeds": len(per_seed), "metrics": {}}
        for metric in sweep.metrics:
            summary = summarize([m.get(metric) for m in per_seed])
            reasons = sorted({m[f"{metric}_reason"] for m in per_seed if m.get(f"{metric}_reason")})
            if reasons:
                summary["reason"] = reasons[0]
            row["metrics"][metric] = summary
        table.append(row)
    return {"title": sweep.title, "name": sweep.name, "seeds": sweep.seeds, "metrics": sweep.metrics,
            "main_metric": sweep.main_metric, "scales": {m: COLUMNS[m][1] for m in sweep.metrics},
            "aggregate": table, "runs": runs}


def format_cell(summary: dict, scale: float) -> str:
    """'mean ± std' in the column's unit (two decimals), 'n/a' when no seed has the metric."""
    if summary.get("mean") is None:
        return "n/a"
    return f"{summary['mean'] / scale:.2f} ± {summary['std'] / scale:.2f}"


def results_markdown(results: dict) -> str:
    """Rows = methods, columns = metrics (the papers' headers and scale factors), mean ± std over seeds."""
    metrics = results["metrics"]
    lines = [f"# {results['title'] or results['name']}", ""]
    datasets = list(dict.fromkeys(row["dataset"] for row in results["aggregate"]))
    notes = {}
    for dataset in datasets:
        if dataset is not None:
            lines += [f"## {dataset}", ""]
        lines.append("| Method | " + " | ".join(COLUMNS[m][0] for m in metrics) + " |")
        lines.append("|---|" + "---|" * len(metrics))
        for row in (r for r in results["aggregate"] if r["dataset"] == dataset):
            cells = []
            for m in metrics:
                summary = row["metrics"][m]
                cell = format_cell(summary, COLUMNS[m][1])
                if cell == "n/a" and summary.get("reason"):
                    notes.setdefault(m, summary["reason"])
                    cell = f"n/a [{m}]"
                cells.append(cell)
            lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
        lines.append("")
    seeds = results["seeds"]
    lines.append(f"Mean ± sample standard deviation over {len(seeds)} seed(s) {seeds}; a column header's "
                 "(10^-k) means the values are shown divided by 10^-k (metrics.json and results.json hold unscaled values).")
    for metric, reason in notes.items():
        lines += ["", f"[{metric}] not measured: {reason}"]
    return "\n".join(lines) + "\n"


def _curve_points(run: dict, key: str) -> list[tuple[float, float]]:
    """(wall-clock training seconds, test metric) from the run's eval records in log.jsonl, ending with
    the final evaluation from metrics.json."""
    points = []
    log = Path(run["run_dir"]) / "log.jsonl"
    if log.is_file():
        for line in log.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                if key in record and "time_s" in record:
                    points.append((record["time_s"], record[key]))
    final = run.get("metrics") or {}
    if final.get(key) is not None and final.get("wall_time_s") is not None:
        if not points or final["wall_time_s"] > points[-1][0]:
            points.append((final["wall_time_s"], final[key]))
    return points


def save_results_plot(results: dict, path: Path) -> None:
    """Bars of the main metric per method (std error bars), and the test metric against training wall-clock
    time per method and seed (MQ-VAE Fig. 4)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = results["main_metric"]
    header, scale = COLUMNS[main]
    rows = results["aggregate"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    names = [row["label"] if row["dataset"] is None else f"{row['label']}\n{row['dataset']}" for row in rows]
    means = [(row["metrics"].get(main, {}).get("mean") or 0.0) / scale for row in rows]
    stds = [(row["metrics"].get(main, {}).get("std") or 0.0) / scale for row in rows]
    axes[0].bar(range(len(rows)), means, yerr=stds, capsize=4, color="tab:blue")
    axes[0].set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=8)
    axes[0].set_title(f"{header} (mean ± std over seeds)")

    any_run = next((r for r in results["runs"] if r["metrics"]), {})
    curve_key = "test_mse" if "test_mse" in (any_run.get("metrics") or {}) else "accuracy"
    curve_header, curve_scale = COLUMNS[curve_key]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, row in enumerate(rows):
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
    axes[1].set_title(f"test {curve_header} against time")
    if axes[1].lines:
        axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(results: dict, sweep_dir: Path) -> None:
    sweep_dir = Path(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (sweep_dir / "results.md").write_text(results_markdown(results))
    save_results_plot(results, sweep_dir / "results.png")
