"""Run a sweep file: every (method, data set, seed) through ``run_experiment``, then the results table.

Restartable: a run whose metrics.json exists is finished and not run again; a run with a checkpoint but
no metrics.json was cut short and is resumed from that checkpoint; any other run starts from scratch.
"""

from __future__ import annotations

import sys
from pathlib import Path

from mqvae.checkpoint import load_checkpoint
from mqvae.config import load_config
from mqvae.errors import Diverged, UserError
from mqvae.sweep import aggregate, expand, load_sweep, write_results

from . import experiment


def run_sweep(path: str | Path, overrides: list[str] = (), out: str | Path | None = None) -> dict:
    """Run (or finish) the sweep in ``path`` into ``out`` (default runs/<sweep name>) and write results.*.
    ``overrides`` (--set) apply to every run. Returns results.json's content."""
    sweep = load_sweep(path)
    sweep_dir = Path(out) if out is not None else Path("runs", sweep.name)
    planned = expand(sweep, sweep_dir, list(overrides))
    # Validate every run's config before training anything, so a typo fails in a second, not after an hour.
    configs = [load_config(run.config, run.overrides) for run in planned]
    for index, (run, cfg) in enumerate(zip(planned, configs), 1):
        tag = f"[{index}/{len(planned)}] {run.label} seed {run.seed}" + (f" on {run.dataset}" if run.dataset else "")
        if (run.run_dir / "metrics.json").is_file():
            print(f"{tag}: finished earlier, kept ({run.run_dir})", file=sys.stderr)
            continue
        resume = _resumable(run.run_dir)
        print(f"{tag}: {'resuming' if resume else 'running'} in {run.run_dir}", file=sys.stderr)
        try:
            _run(cfg, run.run_dir, resume)
        except Diverged as exc:
            # A diverged seed is a result of the method: the table counts it, and the sweep goes on.
            print(f"{tag}: diverged ({exc})", file=sys.stderr)
            experiment.write_diverged(run.run_dir, str(exc))
    results = aggregate(sweep, planned)
    write_results(results, sweep_dir)
    return results


def _run(cfg, run_dir: Path, resume: bool) -> None:
    try:
        experiment.run_experiment(cfg, run_dir, resume=resume)
    except UserError as exc:
        if isinstance(exc, Diverged) or not (resume and str(exc).startswith("--resume")):
            raise
        # The checkpoint belongs to another version of this run's config: start the run afresh.
        print(f"{run_dir}: {exc}; restarting the run", file=sys.stderr)
        experiment.run_experiment(cfg, run_dir, resume=False)


def _resumable(run_dir: Path) -> bool:
    """A run cut short continues from its checkpoint when that checkpoint reads back; else it restarts."""
    path = run_dir / "checkpoint.pt"
    if not path.is_file():
        return False
    try:
        load_checkpoint(path)
    except UserError as exc:
        print(f"{run_dir}: checkpoint unusable ({exc}); restarting the run", file=sys.stderr)
        return False
    return True
