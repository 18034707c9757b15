"""A user's modules, imported before a config is validated (``imports:`` in a config, ``run.py --import``).

A plugin module registers what a config may then name: a level (``problems.register_problem``), a hypergradient
method, a data set, an optimizer or a schedule. An entry is a module name, found on ``sys.path`` or in the
working folder (as ``python -m`` finds one), or the path of a ``.py`` file. A file path is recorded absolute, so
that ``--resume`` and sweeps import the same file from any working folder.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import traceback
from pathlib import Path

from mqvae.errors import UserError


def is_file_entry(entry: str) -> bool:
    return entry.endswith(".py") or os.sep in entry or "/" in entry


def resolved(entry: str) -> str:
    """The entry as the resolved config records it: a file path made absolute, a module name as it is."""
    return str(Path(entry).expanduser().resolve()) if is_file_entry(entry) else entry


def import_plugins(entries: list[str], where: str) -> None:
    """Import each entry (once per process); a module that cannot be imported is one line."""
    for entry in entries:
        try:
            _import(entry)
        except UserError as exc:
            raise UserError(f"{where}: imports: {entry!r}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - any failure of a user's module is one line naming it
            raise UserError(f"{where}: imports: {entry!r} could not be imported: {_failure(exc)}") from None
        except SystemExit as exc:
            # A module that exits while imported would end the run with its code (0: nothing written, nothing said).
            raise UserError(f"{where}: imports: {entry!r} called sys.exit({exc.code!r}) while being imported"
                            f"{_where_raised(exc)}; a plugin module should only define and register") from None


def _import(entry: str) -> None:
    if not is_file_entry(entry):
        # As `python -m` does: a module in the working folder is found even when run.py lives elsewhere.
        if os.getcwd() not in sys.path:
            sys.path.append(os.getcwd())
        importlib.import_module(entry)
        return
    path = Path(entry)
    if not path.is_file():
        raise UserError("no such file")
    name = f"mqvae_plugin_{path.stem}"
    loaded = sys.modules.get(name)
    if loaded is not None and Path(getattr(loaded, "__file__", "")).resolve() == path.resolve():
        return
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before running it, as import does (dataclasses and pickling look it up)
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise


def _where_raised(exc: BaseException) -> str:
    """`` (file:line)`` of the deepest frame of the user's code, or "" when there is none."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not f.filename.startswith("<frozen") and "importlib" not in Path(f.filename).parts
              and f.filename != _import.__code__.co_filename]  # (this module's own frames)
    return f" ({Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""


def _failure(exc: BaseException) -> str:
    """``Type: message (file:line)``, the line being the deepest frame of the user's code (none when the module
    itself was not found)."""
    message = " ".join(str(exc).split())[:300]
    at = _where_raised(exc)
    if isinstance(exc, ModuleNotFoundError) and not at:
        at = " (looked on sys.path and in the working folder; give the module's .py path, or add its folder to PYTHONPATH)"
    return f"{type(exc).__name__}: {message}{at}"
