"""Suite-wide guard: a test that trains a shipped config (configs/**) must shorten it with ``--set train.iters=N``.

A shipped config trains for minutes (1500 iterations on digits); two tests that forgot to shorten their runs once
took the suite past CI's limit. Every ``run.main`` call and every ``run.py`` subprocess that names a shipped config
or sweep, finishes with exit 0, and sets no ``train.iters`` fails its test, unless the test is marked
``@pytest.mark.full_run("why it must train at full length")``.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

import run

ROOT = Path(run.__file__).resolve().parent  # the repository: run.py's folder
SHIPPED = ROOT / "configs"


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # Workers share the cores: one thread each, and the same for the runs they start in subprocesses.
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
    config.addinivalue_line("markers", "full_run(reason): the test trains a shipped config at its full length")
    config.addinivalue_line("markers", "long(reason): the test needs more than 30 s on 2 cores, and why it must")


@pytest.fixture(autouse=True)
def seeded():
    """Each test starts from the same random state, whatever ran before it on its xdist worker: a test that draws
    unseeded inputs otherwise sees other inputs from run to run (a tolerance once failed in CI at one such draw)."""
    import random

    import numpy as np

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def registries_put_back():
    """What a test registers (a data set, a kind, an optimizer, a level) is gone after it: every registry of
    mqvae.registry holds again what it held before the test. The shipped names are registered first: run.py
    imports the modules that register them only once a config is valid, so a test's run would otherwise register
    them inside the test, and putting the registries back would drop them for every later test (whose modules,
    already imported, never register again)."""
    import problems  # noqa: F401  (registers the shipped levels, and through mqvae.shipped every other shipped name)
    from mqvae import registry

    held = {name: dict(value) for name, value in vars(registry).items() if isinstance(value, registry.Registry)}
    yield
    for name, entries in held.items():
        getattr(registry, name).clear()
        getattr(registry, name).update(entries)


def full_length_run(argv) -> str | None:
    """The shipped config ``argv`` (run.py's arguments) trains at its shipped length, or None."""
    args = [str(a) for a in argv]
    if "--resume" in args or any(a.startswith("train.iters=") for a in args):
        return None
    for arg in args:
        path = Path(arg) if Path(arg).is_absolute() else ROOT / arg
        if arg.endswith(".yaml") and path.resolve().is_relative_to(SHIPPED):
            return arg
    return None


@pytest.fixture(autouse=True)
def shipped_configs_are_shortened(request, monkeypatch):
    if request.node.get_closest_marker("full_run") is not None:
        yield
        return
    found = []
    main, subprocess_run = run.main, subprocess.run

    def note(code: int, argv) -> None:
        config = full_length_run(argv) if code == 0 else None
        if config is not None:
            found.append(config)

    def checked_main(argv=None):
        code = main(argv)
        if argv is not None:
            note(code, argv)
        return code

    def checked_subprocess_run(command, *args, **kwargs):
        result = subprocess_run(command, *args, **kwargs)
        words = [str(w) for w in command] if isinstance(command, (list, tuple)) else []
        starts = [i for i, word in enumerate(words) if word.endswith("run.py")]
        if starts:
            note(result.returncode, words[starts[0] + 1:])
        return result

    monkeypatch.setattr(run, "main", checked_main)
    monkeypatch.setattr(subprocess, "run", checked_subprocess_run)
    yield
    assert not found, (f"{request.node.nodeid} trained the shipped {found[0]} at its full length: add --set "
                       "train.iters=N, or mark the test @pytest.mark.full_run('why')")
