"""Run an experiment: ``python run.py CONFIG [--set key=value ...] [--out DIR] [--resume RUN_DIR]``.

CONFIG may also be a sweep file (a top-level ``sweep:`` key, see mqvae/sweep.py): every run it lists is
run into runs/<sweep name>/ (or --out), ``--set`` applies to all of them, and rerunning the same
command finishes only the runs that are missing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def default_run_dir(config_path: Path) -> Path:
    """runs/<config name>, keeping the config's folder under configs/ (configs/digits/mqvae.yaml -> runs/digits/mqvae)."""
    parts = config_path.with_suffix("").parts
    if "configs" in parts:
        parts = parts[parts.index("configs") + 1:]
    else:
        parts = parts[-1:]
    return Path("runs", *parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("config", type=Path, help="YAML experiment file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.iters=100 --set levels.codebook.lr=0.01")
    parser.add_argument("--out", type=Path, help="run folder (default: runs/<config name>)")
    parser.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue the run in RUN_DIR from its checkpoint")
    args = parser.parse_args(argv)

    try:
        from engines.experiment import run_experiment
        from mqvae.config import load_config
        from mqvae.errors import UserError
    except ImportError as exc:  # e.g. the Betty version check in mqvae/__init__.py
        print(f"error: {exc}", file=sys.stderr)
        return 1

    try:
        from mqvae.config import read_yaml
        from mqvae.sweep import is_sweep_file

        if args.config.is_file() and is_sweep_file(read_yaml(args.config)):
            return _run_sweep(args)
        cfg = load_config(args.config, args.overrides)
        run_dir = args.resume or args.out or default_run_dir(args.config)
        metrics = run_experiment(cfg, run_dir, resume=args.resume is not None)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; continue with --resume from the last checkpoint", file=sys.stderr)
        return 130
    shown = {k: v for k, v in metrics.items() if not k.endswith("_reason") and k != "scales"}  # both are in metrics.json
    print(f"{run_dir}: " + ", ".join(f"{k} {v:.5g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items()))
    return 0


def _run_sweep(args) -> int:
    from engines.sweep import run_sweep
    from mqvae.errors import UserError
    from mqvae.sweep import load_sweep

    try:
        if args.resume is not None:
            raise UserError(f"--resume: not used with a sweep file ({args.config}); rerun the same command to finish "
                            "the missing runs")
        results = run_sweep(args.config, args.overrides, args.out)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to finish the sweep (finished runs are kept, a cut run "
              "resumes from its checkpoint)", file=sys.stderr)
        return 130
    sweep_dir = args.out or Path("runs", load_sweep(args.config).name)
    print((sweep_dir / "results.md").read_text(), end="")
    print(f"{sweep_dir}: results.md, results.json, results.png ({len(results['runs'])} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
