"""TensorBoard event files in the run folder (``logging.tensorboard: true``): log.jsonl's numbers and the pictures.

Event files are TensorBoard's own append-only record streams, written by ``torch.utils.tensorboard``'s
``SummaryWriter``; they cannot be replaced atomically as the other run files are. log.jsonl stays the run's
record and the event files are a view of it: the engine sends every record to both (``LevelEngine.record``).
A resumed run first rewrites each event file without the events logged after the checkpoint (``drop_after``), as
the resume drops those lines of log.jsonl, so that every loader (TensorBoard's fast and Python loaders,
``EventAccumulator``) shows each step once; its writer also opens with ``purge_step`` = the checkpoint's step + 1.
"""

from __future__ import annotations

import numbers
from pathlib import Path

from mqvae.errors import UserError
from mqvae.io.files import atomic_write, os_error

# SummaryWriter names its files events.out.tfevents.<time>.<host>.<pid>.<n>: a new file per writer.
EVENT_FILES = "events.out.tfevents.*"


def _summary_writer():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("logging.tensorboard: true needs TensorBoard, which is not installed; in the repository, "
                        'pip install --ignore-requires-python -e ".[tensorboard]" (or set logging.tensorboard: false)') from None
    return SummaryWriter


def require_tensorboard() -> None:
    """Fail at build time, before anything trains, when TensorBoard is missing."""
    _summary_writer()


def drop_after(run_dir: Path, step: int) -> None:
    """Rewrite every event file of ``run_dir`` without the events of steps after ``step`` (each file replaced
    atomically; events without a step, such as the file version, are kept)."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.summary.writer.record_writer import RecordWriter

    for path in sorted(Path(run_dir).glob(EVENT_FILES)):
        records = list(RawEventFileLoader(str(path)).Load())  # stops at a record torn by a kill
        kept = [r for r in records if Event.FromString(r).step <= step]
        if len(kept) == len(records) and path.stat().st_size == sum(len(r) + 16 for r in records):
            continue  # nothing after the checkpoint, nothing torn (16: a record's length and checksums)

        def write(f, kept=kept):
            writer = RecordWriter(f)
            for record in kept:
                writer.write(record)

        atomic_write(path, write)


class TensorBoard:
    """The run's TensorBoard writer; ``close`` it on every exit path (the engine's ``close``)."""

    def __init__(self, run_dir: Path, purge_step: int | None = None):
        self.run_dir = Path(run_dir)
        try:
            self._writer = _summary_writer()(log_dir=str(self.run_dir), purge_step=purge_step)
        except OSError as exc:
            raise os_error(self.run_dir, exc) from None

    def scalars(self, record: dict) -> None:
        """Every number of a log.jsonl record at its ``step``; other values (a warning's text) have no scalar."""
        step = record["step"]
        for key, value in record.items():
            if key != "step" and isinstance(value, numbers.Real) and not isinstance(value, bool):
                self._writer.add_scalar(key, value, step)

    def figures(self, figures: dict, step: int) -> None:
        """The run's pictures (name -> matplotlib figure) at ``step``; the figures stay open for their caller."""
        for name, figure in figures.items():
            self._writer.add_figure(name, figure, step, close=False)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
