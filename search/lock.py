"""One experiment, one driver: a lock in the experiment folder, a lease in object storage.

Two drivers writing one experiment corrupt it: both restore the same Tune state, both write report.json,
and each judges its own trials by the state the other overwrote. So a driver (``search/run.py``,
``search/retrain.py``) holds its experiment for as long as it runs, and a second one is refused in one line
that names the first: its host, pid and start time.

- **Local folders and NFS:** ``<experiment>/.driver.lock``, held with ``flock`` (on NFS the Linux client
  turns it into a byte-range lock that the server arbitrates). The kernel drops it when the driver dies
  however it dies (even ``kill -9``), so nothing stale can block a ``--resume``. The holder unlinks the file
  when it is done; a driver that acquired the lock checks the file is still the one at that path, so two
  drivers can never both hold it across an unlink.
- **Object storage (s3://, gs://):** nothing there can be locked, so ``<experiment>/driver.lease`` holds the
  holder and an expiry (``LEASE_TTL_S``), renewed by a thread every ``RENEW_EVERY_S``. A driver that crashed
  stops renewing, and its lease lapses: a ``--resume`` then takes the experiment over, at most
  ``LEASE_TTL_S`` later -- at once on the machine it ran on, where its process can be seen to be gone (a
  `ray job submit` job's driver always runs on the head). Stores offer no compare-and-swap through pyarrow,
  so two drivers starting within ``SETTLE_S`` of each other both write a lease: each reads it back after
  ``SETTLE_S``, and only the one whose lease is there goes on. Expiry is judged by the reader's clock against
  the writer's: the TTL is a minute, clock skew between machines is usually well under a second.

The lock also tells the driver when its experiment went away under it: a deleted (or moved) folder takes the
lock file with it, and a deleted prefix or another driver's lease replaces the lease. :func:`check` then
raises :class:`ExperimentLost`, and the search stops (search/tuners.py) rather than write a report into a
folder that no longer holds the experiment.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from bss_model.errors import BssError

log = logging.getLogger("bss")

LOCK_FILE = ".driver.lock"
LEASE_FILE = "driver.lease"
LEASE_TTL_S = 60.0
RENEW_EVERY_S = 15.0
SETTLE_S = 1.0


class ExperimentInUse(BssError):
    """Another driver holds the experiment."""


class ExperimentLost(BssError):
    """The experiment's folder (or its lease) went away while this driver ran."""

    exit_code = 74  # EX_IOERR


def _now_text(t: float) -> str:
    return datetime.fromtimestamp(t).astimezone().isoformat(timespec="seconds")


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` (Linux: /proc/<pid>/stat's 22nd field), None if there is no such
    process: with the pid, it names one process, never a later one that got the same pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _holder() -> dict[str, Any]:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "started": _now_text(time.time()), "proc": _process_start(pid)}


def _dead_here(holder: dict[str, Any]) -> bool:
    """Whether ``holder`` ran on this machine and is gone (killed, crashed): its lease need not lapse."""
    if holder.get("host") != socket.gethostname() or not holder.get("proc") or not Path("/proc/self/stat").exists():
        return False
    return _process_start(int(holder.get("pid", 0))) != holder["proc"]


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another driver (which has not written its details yet)"
    return f"the driver with pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"


def _in_use(root: str, holder: dict[str, Any] | None, extra: str = "") -> ExperimentInUse:
    return ExperimentInUse(
        f"experiment {root} is in use by {_describe(holder)}: wait for it to end (or stop it: Ctrl-C, or "
        f"`kill {holder.get('pid') if holder else '<pid>'}` on {holder.get('host') if holder else 'its host'}, "
        f"saves its state), then run this again{extra}; nothing was changed"
    )


class FolderLock:
    """``<root>/.driver.lock``, held with flock for the life of the driver."""

    def __init__(self, root: str) -> None:
        self.root, self.path = root, Path(root) / LOCK_FILE
        self.fd: int | None = None
        self.created = False

    def acquire(self) -> None:
        folder = Path(self.root)
        try:
            self.created = not folder.exists()
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            # No folder to lock (a file of that name, a name too long for the filesystem): the experiment's own
            # checks (storage.prepare_experiment) refuse it next, in their words; nothing can be written there.
            self.created = False
            return
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = _read_json(lambda fd=fd: os.pread(fd, 4096, 0))
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise _in_use(self.root, holder) from None
                if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    log.warning("%s cannot be locked (%s): nothing stops a second driver on it", self.root, exc)
                    return
                raise
            try:  # the file a releasing holder unlinked is not the lock any more: take the new one
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        data = json.dumps(_holder()).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        self.fd = fd

    def lost(self) -> str | None:
        if self.fd is None:
            return None
        try:
            if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                return None
        except FileNotFoundError:
            pass
        return f"the experiment folder {self.root} was deleted or moved while this driver ran"

    def release(self) -> None:
        if self.fd is None:
            self._remove_if_empty()
            return
        if not self.lost():
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        os.close(self.fd)
        self.fd = None
        self._remove_if_empty()

    def _remove_if_empty(self) -> None:
        """A folder this driver made only to lock it (the run stopped on bad input) is not left behind."""
        if self.created:
            with contextlib.suppress(OSError):
                Path(self.root).rmdir()


def _read_json(read: Any) -> dict[str, Any] | None:
    try:
        data = json.loads(read() or b"null")
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class StorageLease:
    """``<root>/driver.lease`` in object storage: this driver's, renewed until released, or lapsing."""

    def __init__(self, root: str) -> None:
        from search.storage import _filesystem

        self.root = root
        self.fs, base = _filesystem(root)
        self.key = f"{base.rstrip('/')}/{LEASE_FILE}"
        self.token = uuid.uuid4().hex
        self.holder = {**_holder(), "token": self.token}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost: str | None = None

    def read(self) -> dict[str, Any] | None:
        import pyarrow.fs

        if self.fs.get_file_info(self.key).type != pyarrow.fs.FileType.File:
            return None

        def read() -> bytes:
            with self.fs.open_input_stream(self.key) as f:
                return f.read()

        return _read_json(read)

    def _write(self) -> None:
        lease = {**self.holder, "expires": time.time() + LEASE_TTL_S}
        with self.fs.open_output_stream(self.key) as f:
            f.write(json.dumps(lease).encode())

    def acquire(self) -> None:
        current = self.read()
        live = current and current.get("token") != self.token and float(current.get("expires", 0)) > time.time()
        if live and _dead_here(current):
            log.info("taking over %s from %s, which is no longer running", self.root, _describe(current))
        elif live:
            raise _in_use(self.root, current, self._lapse(current))
        self._write()
        time.sleep(SETTLE_S)  # a driver that read "free" at the same moment has written its lease by now
        current = self.read()
        if not current or current.get("token") != self.token:
            raise _in_use(self.root, current, self._lapse(current))
        self._thread = threading.Thread(target=self._renew, name="bss-lease", daemon=True)
        self._thread.start()

    @staticmethod
    def _lapse(current: dict[str, Any] | None) -> str:
        if not current or "expires" not in current:
            return ""
        left = max(0, round(float(current["expires"]) - time.time()))
        return f" (if that driver died, its lease lapses at {_now_text(float(current['expires']))}, in {left} s)"

    def _renew(self) -> None:
        while not self._stop.wait(RENEW_EVERY_S):
            try:
                current = self.read()
                if not current or current.get("token") != self.token:
                    self._lost = (
                        f"the lease of {self.root} was taken by {_describe(current)}"
                        if current
                        else f"the experiment {self.root} (its {LEASE_FILE}) was deleted while this driver ran"
                    )
                    return
                self._write()
            except OSError as exc:  # storage trouble: the search's own storage checks report it
                log.warning("could not renew the lease of %s (%s)", self.root, " ".join(str(exc).split())[:200])

    def lost(self) -> str | None:
        return self._lost

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with contextlib.suppress(OSError):
            current = self.read()
            if current and current.get("token") == self.token:
                self.fs.delete_file(self.key)


# The experiments this process holds: {root: lock}. Set by the entry points (hold), read by check.
_HELD: dict[str, FolderLock | StorageLease] = {}


@contextlib.contextmanager
def hold(root: str) -> Iterator[None]:
    """Hold the experiment at ``root`` while the block runs, or refuse in one line if another driver does.

    The storage is checked first (its one-line errors name the fix), so a lock never creates a folder
    where the experiment could not be written."""
    from search.storage import check_writable, is_uri

    check_writable(root if is_uri(root) else str(Path(root).parent))
    lock: FolderLock | StorageLease = StorageLease(root) if is_uri(root) else FolderLock(root)
    try:
        lock.acquire()
    except BaseException:
        if isinstance(lock, FolderLock):
            lock.release()
        raise
    _HELD[root] = lock
    try:
        yield
    finally:
        _HELD.pop(root, None)
        lock.release()


def lost(root: str) -> str | None:
    """Why this process's hold on ``root`` is lost (its folder or lease gone), else None."""
    lock = _HELD.get(root)
    return lock.lost() if lock is not None else None


def check(root: str) -> None:
    """Raise ExperimentLost if the experiment went away under this driver (see the module docstring)."""
    reason = lost(root)
    if reason:
        raise ExperimentLost(f"{reason}: stopped without writing anything more; what it held is gone or elsewhere")
