"""Writing run files so that a crash, a full disk or a second process never leaves half of one.

Every file is written to a uniquely named temp file in its own folder, fsynced and renamed over the old
one (``atomic_write``): a reader sees the old file or the new one. ``log.jsonl`` grows by whole lines
(``append_line``); a line torn by a kill is dropped when the run resumes. ``FolderLock`` gives a folder to
one process at a time. Any ``OSError`` becomes a one-line ``UserError`` naming the path.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
from pathlib import Path
from typing import BinaryIO, Callable

from mqvae.errors import UserError, cut

TEMP_SUFFIX = ".tmp"
LOCK_NAME = ".lock"


def os_error(path: Path, exc: OSError, kept: str = "") -> UserError:
    reason = exc.strerror or type(exc).__name__
    return UserError(f"{cut(str(path))}: cannot write ({reason}){kept}")


def _temp_path(path: Path) -> Path:
    # Unique per process and call: two writers of one file never share (or delete) each other's temp file.
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}")


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Replace ``path`` by what ``write(file)`` writes, all or nothing."""
    path = Path(path)
    tmp = _temp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        kept = "; the previous version of the file is kept" if path.exists() else ""
        raise os_error(path, exc, kept) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def write_json(path: Path, data) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


def save_figure(fig, path: Path) -> None:
    """A matplotlib figure as a PNG at the figure's own dpi (the pixel size its maker chose)."""
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=fig.dpi))


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX needs the folder synced too)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def append_line(file, path: Path, line: str) -> None:
    """One whole line per write and flush, so a kill tears at most the last line."""
    try:
        file.write(line + "\n")
        file.flush()
    except OSError as exc:
        raise os_error(path, exc) from None


def read_lines(path: Path) -> list[dict]:
    """The records of ``log.jsonl``. A last line torn by a kill is left out; damage elsewhere is an error."""
    lines = [line for line in Path(path).read_text(errors="replace").splitlines() if line.strip()]
    records = [_record(line) for line in lines]
    if records and records[-1] is None:
        records.pop()
    if None in records:
        number = records.index(None) + 1
        raise UserError(f"{path}: line {number} is not a log record; the log is damaged (move it aside to start afresh)")
    return records


def _record(line: str) -> dict | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None


def remove_stale_temps(folder: Path) -> None:
    """Temp files left by a crashed writer; called while holding the folder's lock, so none is in use."""
    for tmp in Path(folder).glob(f".*{TEMP_SUFFIX}"):
        tmp.unlink(missing_ok=True)


class FolderLock:
    """An exclusive, non-blocking lock on a folder for the life of one process (released by the OS on any exit,
    ``kill -9`` included). A second process gets one line naming the holder."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._fd = None

    def __enter__(self) -> "FolderLock":
        path = self.folder / LOCK_NAME
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise os_error(path, exc) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise UserError(f"{self.folder}: in use by another run (process {holder}); wait for it or use another "
                                "folder") from None
            raise os_error(path, exc) from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:
            os.close(fd)
            raise os_error(path, exc) from None
        self._fd = fd
        return self

    def __exit__(self, *exc_info) -> None:
        os.close(self._fd)  # closing releases the lock; the file stays, harmless
        self._fd = None
