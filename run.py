"""Run an experiment: ``python run.py CONFIG [--set key=value ...] [--import MODULE ...] [--out DIR] [--overwrite]``.

``--nproc N`` trains on N data-parallel processes on this machine: torchrun, started by run.py, whose report of a
failed job is condensed to the toolkit's one line (engines/launch.py).

Continue a run: ``python run.py --resume RUN_DIR [--set train.iters=N ...]``. It reads RUN_DIR/config.yaml;
``--set`` may change only the number of iterations, the logging, evaluation and checkpoint intervals,
TensorBoard logging, the device and thread count, the ``eval`` keys and the ``distributed`` keys
(``engines.run_folder.RESUMABLE_KEYS``).

``--import MODULE`` (a module name or a .py file, repeatable) imports a user's module before the config is
read, so that the levels, hypergradients, data sets, optimizers and schedules it registers can be named; the
run's config.yaml records it (``imports``), so ``--resume`` and sweeps import it again.

CONFIG may also be a sweep file (a top-level ``sweep:`` key, see mqvae/evaluation/comparison.py): every run it lists is
run into runs/<sweep name>/ (or --out), ``--set`` and ``--import`` apply to all of them, ``--seeds 0,1,2``
replaces its seeds, and rerunning the same command finishes only the runs that are missing or whose config
changed.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml


def default_run_dir(config_path: Path) -> Path:
    """runs/<config name>, keeping the config's folder under configs/ (configs/digits/mqvae.yaml -> runs/digits/mqvae)."""
    parts = config_path.with_suffix("").parts
    if "configs" in parts:
        parts = parts[parts.index("configs") + 1:]
    else:
        parts = parts[-1:]
    return Path("runs", *parts)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # argparse prints its usage block first; stderr holds an error's one line only.
        self.exit(2, f"error: {message} (python run.py -h shows the usage)\n")


def main(argv=None) -> int:
    parser = _Parser(description=__doc__)
    parser.add_argument("config", type=Path, nargs="?", help="YAML experiment or sweep file (optional with --resume)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.iters=100 --set levels.codebook.lr=0.01")
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                        help="import a module (name or .py path) that registers levels, methods or data sets")
    parser.add_argument("--seeds", metavar="S,S,...", help="a sweep's seeds, e.g. --seeds 0,1,2 (sweep files only)")
    parser.add_argument("--out", type=Path, help="run folder (default: runs/<config name>)")
    parser.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue the run in RUN_DIR from its checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace the run that the run folder holds")
    parser.add_argument("--nproc", type=int, metavar="N",
                        help="train on N data-parallel processes on this machine (torchrun), reported as one run")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (defaults filled in, --set and --import applied) and exit")
    parser.add_argument("--list", action="store_true",
                        help="print the names every registry holds (with --import's), the choices a config may name")
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = parser.parse_args(argv)
    if args.list:
        return _list(args.imports)
    if args.config is None and args.resume is None:
        parser.error("name a CONFIG file, or a run folder with --resume RUN_DIR")
    if args.nproc is not None:
        if args.nproc < 1:
            parser.error(f"--nproc: at least 1 process, got {args.nproc}")
        from engines.launch import launch

        return launch(args.nproc, __file__, _without_nproc(argv))

    try:
        from engines.experiment import run_experiment
        from engines.run_folder import resume_config
        from mqvae.config import load_config, read_yaml, to_dict
        from mqvae.errors import UserError
        from mqvae.io.provenance import set_code_folder
        from mqvae.evaluation.comparison import is_sweep_file
    except ImportError as exc:  # e.g. the Betty version check in mqvae/__init__.py
        print(f"error: {exc}", file=sys.stderr)
        return 1

    set_code_folder(Path(__file__).resolve().parent)  # the commit runs record
    run_dir = "RUN_DIR"
    try:
        if args.config is not None and args.config.is_file() and is_sweep_file(read_yaml(args.config)):
            if args.print_config:
                raise UserError(f"--print-config: prints one experiment's config; {args.config} is a sweep (print a "
                                "run of it with its config file and the run's --set)")
            return _run_sweep(args)
        if args.seeds is not None:
            raise UserError(f"--seeds: replaces a sweep file's seeds; {args.config or args.resume} is one run (set its "
                            "seed with --set seed=N)")
        if args.resume is not None:
            if args.out is not None or args.overwrite:
                raise UserError("--resume: continues the run in its own folder; --out and --overwrite start a new run")
            run_dir = args.resume
            cfg = resume_config(run_dir, args.overrides, args.config, args.imports)
        else:
            run_dir = args.out or default_run_dir(args.config)
            cfg = load_config(args.config, args.overrides, args.imports)
        if args.print_config:
            print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
            return 0
        metrics = run_experiment(cfg, run_dir, resume=args.resume is not None, overwrite=args.overwrite)
        if not metrics:
            return 0  # a data-parallel rank other than 0: rank 0 reports the run
    except UserError as exc:
        return _error(exc)
    except (OSError, MemoryError, RuntimeError) as exc:
        if _peer_lost(exc):
            return 1
        return _error(_fault_line(exc))
    except KeyboardInterrupt:
        if _launch_rank() == 0:  # torchrun interrupts every rank; rank 0 says so
            print(f"interrupted; continue with --resume {run_dir} (from the last checkpoint)", file=sys.stderr)
        return 130
    print(summary_line(run_dir, metrics))
    return 0


def _without_nproc(argv: list[str]) -> list[str]:
    """run.py's arguments without ``--nproc N`` (or ``--nproc=N``): what each rank runs."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            kept.append(arg)
    return kept


def summary_line(run_dir, metrics: dict) -> str:
    """The run's one line: each measured number, then the metrics not measured (their reasons are in metrics.json).
    Lists (per group) and records stay in metrics.json."""
    shown = {k: v for k, v in metrics.items()
             if not k.endswith("_reason") and k not in ("scales", "config_sha256", "provenance")
             and not isinstance(v, (list, dict))}
    measured = ", ".join(f"{k} {v:.5g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items() if v is not None)
    missing = [k for k, v in shown.items() if v is None]
    return f"{run_dir}: {measured}" + (f"; not measured: {', '.join(missing)} (see metrics.json)" if missing else "")


def _list(imports: list[str]) -> int:
    """--list: each registry's names, after the --import modules registered theirs."""
    try:
        import engines.experiment  # noqa: F401  (registers the shipped levels and hypergradient methods)
        from mqvae.config import registries
        from mqvae.errors import UserError
        from mqvae.config.plugins import import_plugins
    except ImportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        import_plugins(imports, "--import")
    except UserError as exc:
        return _error(exc)
    for key, registry in registries().items():
        print(f"{key} ({registry.kind}s): {', '.join(sorted(registry))}")
    return 0


def _run_sweep(args) -> int:
    from engines.sweep import run_sweep
    from mqvae.runtime.distributed import launched
    from mqvae.errors import UserError
    from mqvae.evaluation.comparison import load_sweep, parse_seeds

    try:
        if launched() > 1:
            raise UserError(f"{args.config}: a sweep runs in one process; start each of its runs with torchrun instead")
        if args.resume is not None or args.overwrite:
            raise UserError(f"--resume, --overwrite: not used with a sweep file ({args.config}); rerun the same command "
                            "to finish the missing runs (runs whose config changed are run again)")
        seeds = None if args.seeds is None else parse_seeds(args.seeds)
        results = run_sweep(args.config, args.overrides, args.out, args.imports, seeds)
    except UserError as exc:
        return _error(exc)
    except (OSError, MemoryError, RuntimeError) as exc:
        return _error(_fault_line(exc))
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to finish the sweep (finished runs are kept, a cut run "
              "resumes from its checkpoint)", file=sys.stderr)
        return 130
    sweep_dir = args.out or Path("runs", load_sweep(args.config).name)
    print((sweep_dir / "results.md").read_text(), end="")
    print(f"{sweep_dir}: results.md, results.json, results.png ({len(results['runs'])} runs)")
    return 0


def _fault_line(exc: BaseException) -> str:
    """The one line of a fault of the machine: a full disk or read-only folder outside the run files' own writers
    (which name their file themselves), or exhausted memory. Any other RuntimeError is a bug: its traceback stays."""
    from mqvae.errors import cut

    if isinstance(exc, MemoryError) or "OutOfMemoryError" in type(exc).__name__ or "can't allocate memory" in str(exc):
        return ("out of memory during the run; lower data.batch_size or the model's size (model.hidden_channels, "
                "quantizer.num_codes)")
    if isinstance(exc, OSError):
        # The path quoted short, so that the OS's reason stays on the line whatever the path's length.
        return f"{cut(str(exc.filename)) if exc.filename else 'file system'}: {exc.strerror or exc}"
    raise exc


def _error(exc) -> int:
    """The one line of a user's error. Messages are one line by contract; a multi-line one (e.g. re-raised by a
    library) is cut to its first line, so the contract holds on stderr. Under torchrun the job's one line comes
    from the rank where the error began: rank 0 for what every rank meets alike (the config, a diverged loss, which
    the ranks check together), the rank itself (named) for its own (its data); a rank that only lost its peers says
    nothing."""
    from mqvae.errors import AllRanksError

    lines = str(exc).strip().splitlines() or [type(exc).__name__]
    rank = _launch_rank()
    if rank == 0 or (_training_in_parallel() and not isinstance(exc, AllRanksError)):
        print(f"error: {f'rank {rank}: ' if rank else ''}{lines[0][:2000]}", file=sys.stderr)
    return 2


def _launch_rank() -> int:
    """This process's rank as torchrun set it (RANK; 0 without torchrun), readable before the process group exists."""
    return int(os.environ.get("RANK", "0"))


def _training_in_parallel() -> bool:
    """Whether this process has joined torchrun's process group (mqvae.runtime.distributed.start)."""
    distributed = sys.modules.get("mqvae.runtime.distributed")
    return distributed is not None and distributed.world_size() > 1


def _peer_lost(exc: BaseException) -> bool:
    """A collective failed because another data-parallel rank stopped (that rank reports why)."""
    import torch.distributed as dist

    # NCCL raises DistBackendError; gloo a plain RuntimeError naming the closed connection or the timeout.
    peer_gone = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Timed out")
    return _training_in_parallel() and (isinstance(exc, getattr(dist, "DistError", ()))
                                        or any(text in str(exc) for text in peer_gone))


def _main() -> int:
    try:
        return main()
    finally:
        # A data-parallel rank leaves its process group before the interpreter exits (torch aborts a rank that
        # exits holding one while its peers still run).
        distributed = sys.modules.get("mqvae.runtime.distributed")
        if distributed is not None:
            distributed.stop()


if __name__ == "__main__":
    sys.exit(_main())
