"""What libraries (torch, torchmetrics, Betty, ...) say during a run goes to the run's log.jsonl, not the terminal.

The terminal shows the progress bar and the run's own lines only; stderr holds nothing but an error's one line.
Python warnings and library log records of level WARNING and above become ``{"step", "warning"}`` records through
``LevelEngine.warn(..., terminal=False)``, each distinct message once.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

from betty.logging.logger_base import get_logger


def _short_path(filename: str) -> str:
    """``filename`` relative to the longest ``sys.path`` entry that holds it (``torch/optim/lr_scheduler.py``)."""
    roots = [os.path.abspath(entry) for entry in sys.path if entry]
    holding = [root for root in roots if filename.startswith(root + os.sep)]
    return os.path.relpath(filename, max(holding, key=len)) if holding else filename


def warning_line(message, category: type, filename: str, lineno: int) -> str:
    """One line ``Category: message (file:line)``."""
    return f"{category.__name__}: {' '.join(str(message).split())} ({_short_path(filename)}:{lineno})"


class _ToRun(logging.Handler):
    def __init__(self, sink):
        super().__init__(logging.WARNING)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink(f"{record.name} {record.levelname}: {' '.join(record.getMessage().split())}")


class LibraryWarnings:
    """Inside ``with LibraryWarnings() as captured:``, Python warnings (as the filters in force let them through)
    and library log records go to the engine given to ``captured.attach(engine)``. Those raised before the engine
    exists (while the data and the model are built) are kept until then; everything is as before afterwards."""

    def __init__(self):
        self._engine = None
        self._pending: list[str] = []
        self._catch = warnings.catch_warnings()
        self._handler = _ToRun(self._record)
        # Betty's logger does not propagate and prints to stdout itself; root collects every other library's
        # records, which would otherwise reach stderr through logging's last-resort handler.
        self._betty, self._root = get_logger(), logging.getLogger()
        self._betty_handlers: list[logging.Handler] = []

    def __enter__(self) -> LibraryWarnings:
        self._catch.__enter__()
        warnings.showwarning = self._show
        self._betty_handlers, self._betty.handlers = self._betty.handlers, [self._handler]
        self._root.addHandler(self._handler)
        return self

    def __exit__(self, *exc_info) -> None:
        self._root.removeHandler(self._handler)
        self._betty.handlers = self._betty_handlers
        self._catch.__exit__(*exc_info)

    def attach(self, engine) -> None:
        self._engine = engine
        for message in self._pending:
            engine.warn(message, terminal=False)
        self._pending.clear()

    def _show(self, message, category, filename, lineno, file=None, line=None) -> None:
        self._record(warning_line(message, category, filename, lineno))

    def _record(self, text: str) -> None:
        if self._engine is None:
            self._pending.append(text)
        else:
            self._engine.warn(text, terminal=False)
