"""Run an experiment: ``python run.py CONFIG [--set key=value ...] [--out DIR] [--resume RUN_DIR]``."""

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
        cfg = load_config(args.config, args.overrides)
        run_dir = args.resume or args.out or default_run_dir(args.config)
        metrics = run_experiment(cfg, run_dir, resume=args.resume is not None)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; continue with --resume from the last checkpoint", file=sys.stderr)
        return 130
    print(f"{run_dir}: " + ", ".join(f"{k} {v:.5g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
