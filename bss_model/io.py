"""Small file helpers: atomic writes, auto-numbered run folders, logging.

Every output a user keeps (reports, checkpoints, downloaded data) is written to a
temporary name in the same folder and ``os.replace``-d into place, so a crash
mid-write never leaves a truncated file where a good one is expected.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, TextIO


def _temp_beside(path: Path) -> tuple[int, Path]:
    """A new, empty hidden file beside ``path``, opened for writing: ``(fd, its path)``.

    Created with mode 0o666 so that the process's umask applies, as for any file the user's tools
    create (``tempfile.mkstemp`` makes 0o600 files: other users of a shared NFS experiment folder
    could not read the reports and models renamed from them)."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666), tmp
        except FileExistsError:  # another writer's temp file: draw another name
            continue


def _write_temp(path: Path, write: Callable[[IO[bytes]], None]) -> Path:
    """``write(f)`` into a fsynced temp file beside ``path``; returns it (removed again if anything fails)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write(f)`` on a temp file beside ``path``, fsync, then rename over ``path``."""
    path = Path(path)
    tmp = _write_temp(path, write)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_all(files: list[tuple[Path, bytes]]) -> None:
    """Write several files as one: every one to a temp file beside it first, and only once all of them are
    written (a full disk fails here), rename each into place. A failure leaves every target as it was
    (what renames remain after the first can only fail on a folder that vanished meanwhile)."""
    done: list[tuple[Path, Path]] = []
    try:
        for path, data in files:
            done.append((_write_temp(Path(path), lambda f, data=data: f.write(data)), Path(path)))
    except BaseException:
        for tmp, _ in done:
            tmp.unlink(missing_ok=True)
        raise
    for i, (tmp, path) in enumerate(done):
        try:
            os.replace(tmp, path)
        except BaseException:
            for left, _ in done[i:]:
                left.unlink(missing_ok=True)
            raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def atomic_torch_save(obj: Any, path: Path) -> None:
    import torch

    atomic_write(path, lambda f: torch.save(obj, f))


def next_run_dir(root: Path, name: str) -> Path:
    """Create and return ``root/NNN-name`` with NNN one past the highest existing number."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    pattern = re.compile(r"^(\d{3,})-")
    numbers = [int(m.group(1)) for p in root.iterdir() if (m := pattern.match(p.name))]
    n = max(numbers, default=-1) + 1
    while True:  # another process may race us to a number: mkdir is the lock
        run = root / f"{n:03d}-{name}"
        try:
            run.mkdir()
            return run
        except FileExistsError:
            n += 1


def setup_logging(
    log_file: Path | None = None, level: int = logging.INFO, stream: TextIO | None = None
) -> logging.Logger:
    """Log to the console (``stream``, default stdout) and, if given, to a file. Idempotent per file."""
    logger = logging.getLogger("bss")
    logger.setLevel(level)
    logger.propagate = False
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    if not any(getattr(h, "_bss_console", False) for h in logger.handlers):
        console = logging.StreamHandler(stream or sys.stdout)
        console.setFormatter(fmt)
        console._bss_console = True  # type: ignore[attr-defined]
        logger.addHandler(console)
    if log_file is not None:
        log_file = Path(log_file).resolve()
        if not any(getattr(h, "baseFilename", None) == str(log_file) for h in logger.handlers):
            log_file.parent.mkdir(parents=True, exist_ok=True)
            fh = logging.FileHandler(log_file)
            fh.setFormatter(fmt)
            logger.addHandler(fh)
    return logger


@contextlib.contextmanager
def logging_to(
    log_file: Path | None = None, level: int = logging.INFO, stream: TextIO | None = None
) -> Iterator[logging.Logger]:
    """:func:`setup_logging` for the length of a command, then the ``bss`` logger as it was (its level,
    handlers and propagation): for the CLI entry points, so that calling one in-process (a test, a
    notebook) leaves the process's logging as it found it."""
    logger = logging.getLogger("bss")
    level_before, propagate_before, handlers_before = logger.level, logger.propagate, list(logger.handlers)
    try:
        yield setup_logging(log_file, level, stream)
    finally:
        for h in [h for h in logger.handlers if h not in handlers_before]:
            logger.removeHandler(h)
            h.close()
        logger.setLevel(level_before)
        logger.propagate = propagate_before


class _LogFile(logging.FileHandler):
    """A log file that, once it cannot be written (a full disk), says so in one line and stops trying: not a
    "--- Logging error ---" traceback per record on the console, which keeps every line."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        if getattr(self, "_failed", False):
            return
        self._failed = True
        exc = sys.exc_info()[1]
        print(f"notice: {self.baseFilename} can no longer be written ({exc}): the console has the rest of the log",
              file=sys.stderr)  # fmt: skip

    def emit(self, record: logging.LogRecord) -> None:
        if not getattr(self, "_failed", False):
            super().emit(record)

    def close(self) -> None:
        # The record whose write failed is still in the stream's buffer, and closing flushes it again: on a full
        # disk that raised ENOSPC from the command's `finally`, in place of the one line it was saying (seen:
        # a full disk under a search, reported as a bare "no space left" without the resume command).
        try:
            super().close()
        except OSError as exc:
            if not getattr(self, "_failed", False):
                self._failed = True
                print(f"notice: {self.baseFilename} could not be closed ({exc}): its last lines may be missing",
                      file=sys.stderr)  # fmt: skip


@contextlib.contextmanager
def log_file(path: Path) -> Iterator[None]:
    """The ``bss`` logger also to the file ``path`` while the block runs (what reaches it is the logger's
    level: an entry point's :func:`logging_to` sets it)."""
    logger = logging.getLogger("bss")
    path = Path(path).resolve()
    if any(getattr(h, "baseFilename", None) == str(path) for h in logger.handlers):
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = _LogFile(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()
