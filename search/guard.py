"""While Tune runs an experiment: stop it the way Ctrl-C does, so that Tune saves its state and a --resume
continues it, on SIGTERM, on a full disk, and when the experiment's folder goes away.

- **SIGTERM** (Kubernetes evicting a pod, a spot machine reclaimed, ``kill``) is handled as Ctrl-C: inside
  ``tuner.fit()`` it calls Tune's own SIGINT handler (Tune stops the trials and saves its state; the tuners
  then print the resume command, exit 143), elsewhere it raises :class:`bss_model.errors.Terminated` (exit 143).
  Ray's handler, which ``ray.init`` installs, calls ``sys.exit`` wherever the driver is and aborted it mid-fit
  with a C++ stack dump (exit 134): the entry points install this one, and ``cluster.init_ray`` keeps it.
- **A full disk:** at the first "No space left on device" that Ray logs (a trial's failed checkpoint upload,
  a failed sync of Tune's state), the experiment is stopped like Ctrl-C instead of letting every trial fail
  on it, retry and fail again (28 tracebacks). Ray's records of it are dropped; the tuners say it in one line.
- **The experiment's folder deleted or moved** (or its lease taken): see search/lock.py. Checked every
  ``WATCH_EVERY_S``; the experiment is stopped, the driver ends non-zero.

Stopping uses Tune's own interrupt: the SIGUSR1 handler that ``tune.run`` installs (it is SIGINT's).
"""

from __future__ import annotations

import contextlib
import logging
import re
import signal
import threading
from collections.abc import Iterator
from typing import Any

from bss_model.errors import Terminated
from search import lock

log = logging.getLogger("bss")

WATCH_EVERY_S = 2.0
# How a full disk (or a full quota) reads in the errors of pyarrow, Python, SQLite and Ray.
DISK_FULL = ("No space left on device", "[Errno 28]", "errno 28", "Disk quota exceeded", "disk is full")

_state = {"terminated": False, "in_fit": False}


def disk_full(text: str) -> bool:
    return any(k in text for k in DISK_FULL)


def terminated() -> bool:
    """Whether this process received SIGTERM (the tuners exit 143 for it, as a shell would report it)."""
    return _state["terminated"]


def on_sigterm(signum: int, frame: Any) -> None:
    _state["terminated"] = True
    handler = signal.getsignal(signal.SIGINT)
    if _state["in_fit"] and callable(handler) and handler is not signal.default_int_handler:
        handler(signal.SIGINT, frame)  # Tune's: save the experiment's state, stop the trials
        return
    raise Terminated()


@contextlib.contextmanager
def sigterm_as_ctrl_c() -> Iterator[None]:
    """For an entry point: SIGTERM handled by :func:`on_sigterm` while the command runs (see the module docstring)."""
    try:
        before = signal.signal(signal.SIGTERM, on_sigterm)
    except ValueError:  # not the main thread: a command run from a thread keeps the process's handler
        yield
        return
    _state["terminated"] = False
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def keep_sigterm_handler() -> Any:
    """The SIGTERM handler now, to reinstall after ``ray.init`` replaced it (see ``cluster.init_ray``)."""
    return signal.getsignal(signal.SIGTERM)


def reinstall(handler: Any) -> None:
    if handler is on_sigterm:
        with contextlib.suppress(ValueError):
            signal.signal(signal.SIGTERM, handler)


class _DropAndTrip(logging.Filter):
    """On Ray's log handlers while Tune runs: a record that says the disk is full stops the experiment and is
    dropped; once the experiment is stopping (that, or Tune's own interrupt), so is every traceback that follows
    from the stop."""

    def __init__(self, guard: FitGuard) -> None:
        super().__init__()
        self.guard = guard

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text += f" {type(record.exc_info[1]).__name__}: {record.exc_info[1]}"
        if disk_full(text):
            self.guard.stop("disk full", _detail(text))
            return False
        if vanished_temp_file(text):
            return False
        if "Stop signal received" in text:  # Tune's interrupt (Ctrl-C, SIGTERM, ours): what follows is its wake
            self.guard.stopping = True
        traceback = bool(record.exc_info) or "Traceback (most recent call last)" in text
        if traceback and not (self.guard.reason or self.guard.stopping):
            # A trial that failed because the folder went (its checkpoint had nowhere to go) can be reported
            # before the watch looks again: look now, and say the one line, not the trial's traceback.
            why = lock.lost(self.guard.root)
            if why:
                self.guard.stop("lost", why)
        if not (self.guard.reason or self.guard.stopping):
            return True
        # The trials' actors Tune stops mid-call raise in their threads ("Unhandled error ... release unlocked
        # lock"): the stop, not a fault. The tuners print the one line that matters.
        return not (traceback or "Unhandled error" in text)


# Tune's sync of the driver's staging folder lists a trial's folder, then copies each file: a temp file of an
# atomic write (bss_model/io.py: ".<name>.<8 hex>.tmp" beside its target) listed before its rename is gone when
# copied, and Tune logs that sync's failure with a traceback. The renamed file is there for the next sync; the
# failure says nothing about the storage (seen once in a retrain's last sync, tests/test_search_e2e.py).
_TEMP_GONE = re.compile(
    r"Failed to open local file '[^']*/\.[^/']+\.[0-9a-f]{8}\.tmp'.*No such file or directory", re.S
)


def vanished_temp_file(text: str) -> bool:
    return "Saving experiment state to storage" in text and bool(_TEMP_GONE.search(text))


def _detail(text: str) -> str:
    for key in DISK_FULL:
        if key in text:
            return key if key != "[Errno 28]" and key != "errno 28" else "No space left on device"
    return text[:200]


class FitGuard:
    """Around ``tuner.fit()`` for the experiment at ``root``; ``reason`` says why it stopped Tune, if it did."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.reason: str | None = None  # "disk full" | "lost"
        self.stopping = False  # Tune is being interrupted (by the user, a signal, or this guard)
        self.detail = ""
        self._asked = False
        self._done = threading.Event()
        self._filter = _DropAndTrip(self)
        self._handlers: list[logging.Handler] = []
        self._signals: dict[int, Any] = {}

    def stop(self, reason: str, detail: str) -> None:
        if self.reason is None:
            self.reason, self.detail = reason, detail
        self._interrupt()

    def _interrupt(self) -> None:
        """Tune's interrupt, once its handler is installed (SIGUSR1's default would kill the process)."""
        if self._asked or not callable(signal.getsignal(signal.SIGUSR1)):
            return
        self._asked = True
        signal.raise_signal(signal.SIGUSR1)

    def _watch(self) -> None:
        while not self._done.wait(WATCH_EVERY_S):
            why = lock.lost(self.root)
            if why:
                self.stop("lost", why)
            elif self.reason:
                self._interrupt()  # asked before Tune's handler was there

    def __enter__(self) -> FitGuard:
        _state["in_fit"] = True
        # tune.run installs its SIGINT and SIGUSR1 handlers as a fit starts and puts SIGINT's back only when a
        # signal comes: after a fit that ended by itself its handler stays, and the next Ctrl-C (the retrain
        # being set up, the evaluation) would only tell the finished fit, and the job would carry on.
        self._signals = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGUSR1)}
        self._handlers = list(logging.getLogger("ray").handlers)
        for h in self._handlers:
            h.addFilter(self._filter)
        threading.Thread(target=self._watch, name="bss-fit-guard", daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        _state["in_fit"] = False
        for signum, handler in self._signals.items():
            if handler is not None:  # None: a handler not set from Python, which cannot be put back
                with contextlib.suppress(ValueError):  # not the main thread: Tune installed nothing either
                    signal.signal(signum, handler)
        self._done.set()
        for h in self._handlers:
            h.removeFilter(self._filter)


@contextlib.contextmanager
def resume_said(root: str, resume_cmd: str) -> Iterator[None]:
    """Ctrl-C or SIGTERM outside ``tuner.fit()`` (Ray starting, the evaluation after the retrain, the report): once
    the experiment has its settings (search_config.yaml), the resume command is said as the tuners say it inside
    a fit, exit 143 for SIGTERM, 130 for Ctrl-C. Before that there is nothing to resume: "interrupted" alone."""
    try:
        yield
    except KeyboardInterrupt as exc:
        from search import storage
        from search.tuners import Interrupted

        if not (storage.local_dir(root) / storage.CONFIG_FILE).is_file():
            raise
        sigterm = isinstance(exc, Terminated)
        stopped = Interrupted(
            f"interrupted{' (SIGTERM)' if sigterm else ''}; what had finished is saved: resume with `{resume_cmd}`"
        )
        stopped.exit_code = Terminated.exit_code if sigterm else Interrupted.exit_code
        raise stopped from None
