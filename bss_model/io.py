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
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, TextIO


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write(f)`` on a temp file beside ``path``, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
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
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()
