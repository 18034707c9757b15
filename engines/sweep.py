"""Run a sweep file: every (method, data set, seed) through ``run_experiment``, then the results table.

Restartable, and only with the planned config: a run folder is reused only when its config.yaml equals the
run's resolved config. Such a run with a metrics.json is finished and not run again; one with a checkpoint
but no metrics.json was cut short and resumes from that checkpoint. Any other run starts from scratch,
replacing what its folder held (and saying why), so a stale result never reaches results.*.
"""

from __future__ import annotations

from pathlib import Path

from mqvae.io.checkpoint import load_checkpoint
from mqvae.config import config_from_dict, load_config, to_dict
from mqvae.errors import Diverged, UserError
from mqvae.io.files import FolderLock, remove_stale_temps
from mqvae.evaluation.comparison import aggregate, curve_key, expand, load_sweep, read_metrics, write_results

from . import experiment
from .run_folder import differing_keys, run_files, saved_config


def run_sweep(path: str | Path, overrides: list[str] = (), out: str | Path | None = None, imports: list[str] = (),
              seeds: list[int] | None = None) -> dict:
    """Run (or finish) the sweep in ``path`` into ``out`` (default runs/<sweep name>) and write results.*.
    ``overrides`` (--set) and ``imports`` (--import) apply to every run; ``seeds`` (--seeds) replaces the sweep's
    seeds. Returns results.json's content."""
    sweep = load_sweep(path, seeds)
    sweep_dir = Path(out) if out is not None else Path("runs", sweep.name)
    planned = expand(sweep, sweep_dir, list(overrides))
    # Validate every run's config before training anything, so a typo fails in a second, not after an hour.
    configs = [load_config(run.config, run.overrides, imports) for run in planned]
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with FolderLock(sweep_dir):
        remove_stale_temps(sweep_dir)
        _run_all(planned, configs)
        results = aggregate(sweep, planned, curve_key(configs))
        write_results(results, sweep_dir)
    return results


def _run_all(planned, configs) -> None:
    for index, (run, cfg) in enumerate(zip(planned, configs), 1):
        tag = f"[{index}/{len(planned)}] {run.label} seed {run.seed}" + (f" on {run.dataset}" if run.dataset else "")
        stale = _stale(run.run_dir, to_dict(cfg))
        if stale is None and read_metrics(run) is not None:
            print(f"{tag}: finished earlier with this config, kept ({run.run_dir})", flush=True)
            continue
        resume = stale is None and _resumable(run.run_dir)
        if stale is not None and run_files(run.run_dir):
            print(f"{tag}: {run.run_dir} {stale}; running it again", flush=True)
        print(f"{tag}: {'resuming' if resume else 'running'} in {run.run_dir}", flush=True)
        try:
            _run(cfg, run.run_dir, resume)
        except Diverged as exc:
            # A diverged seed is a result of the method: the table counts it, and the sweep goes on.
            print(f"{tag}: diverged ({exc})", flush=True)
            experiment.write_diverged(run.run_dir, str(exc))


def _stale(run_dir: Path, planned: dict) -> str | None:
    """Why the folder's run is not the planned one (None when its config.yaml is the planned config).

    The saved config is read as a config, so that a key the toolkit added since (written there with its
    default) is no difference: a run made before a new config section is not trained again."""
    saved = saved_config(run_dir)
    if saved is None:
        return "holds no readable config.yaml"
    try:
        saved = to_dict(config_from_dict(saved, str(run_dir / "config.yaml")))
    except UserError as exc:
        return f"holds a config.yaml that no longer validates ({exc})"
    changed = differing_keys(saved, planned)
    if changed:
        return f"was run with other values of {', '.join(changed[:6])}" + (" and more" if len(changed) > 6 else "")
    return None


def _run(cfg, run_dir: Path, resume: bool) -> None:
    try:
        experiment.run_experiment(cfg, run_dir, resume=resume, overwrite=not resume)
    except UserError as exc:
        if isinstance(exc, Diverged) or not (resume and str(exc).startswith("--resume")):
            raise
        # The checkpoint does not fit this run's config: start the run afresh.
        print(f"{run_dir}: {exc}; restarting the run", flush=True)
        experiment.run_experiment(cfg, run_dir, resume=False, overwrite=True)


def _resumable(run_dir: Path) -> bool:
    """A run cut short continues from its checkpoint when that checkpoint reads back; else it restarts."""
    path = run_dir / "checkpoint.pt"
    if not path.is_file():
        return False
    try:
        load_checkpoint(path)
    except UserError as exc:
        print(f"{run_dir}: checkpoint unusable ({exc}); restarting the run", flush=True)
        return False
    return True
