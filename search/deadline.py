"""A budgeted job at run time: the ledger of the time it has spent, and the Tune pieces that keep it on time.

``budget.json`` in the experiment folder is the ledger: the budget, each run of the command (its start and
wall time so far; a ``--resume`` is a new run), the plan (search/budget.py) and what the probe measured,
this run's deadlines, and each phase's planned and actual time and samples. It is rewritten at every
phase boundary and, while Tune runs, every LEDGER_EVERY_S, so a driver killed outright loses at most that
much of its count; a resumed job starts from what earlier runs spent.

Tune pickles its searcher, stoppers and callbacks into the experiment, and a ``--resume`` restores them
as the first run made them. So the pieces here never hold a deadline themselves: they read this run's from
the ledger, which the driver writes before ``Tuner.fit()``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ray.tune import Stopper
from ray.tune.search import Searcher

from bss_model.io import atomic_write_json
from search import storage
from search.budget import process_started_at  # noqa: F401 -- where the budget's clock starts

log = logging.getLogger("bss")

LEDGER_FILE = "budget.json"
LEDGER_EVERY_S = 15.0
# Tune's own stop, should a trial overrun the deadline it was given (it never should: trials are time-boxed
# and refuse to start or go on when they cannot finish): this long after the phase's deadline.
BACKSTOP_S = 20.0


class Ledger:
    """``budget.json``: see the module docstring. ``now`` is injectable for tests."""

    def __init__(self, root: str, data: dict[str, Any], started: float) -> None:
        self.root, self.data, self.started = root, data, started
        self.data.setdefault("runs", [])
        self.data.setdefault("phases", {})
        self.data.setdefault("deadlines", {})
        self.data["runs"].append({"started": started, "wall_s": 0.0})
        # The phase going on: its name, when this run began it, and the time earlier runs had spent in it.
        self._phase: tuple[str, float, float] | None = None
        self._lock = threading.Lock()

    @classmethod
    def open(cls, root: str, budget_s: float, started: float, resume: bool) -> Ledger:
        """This run's ledger: a new one, or (``resume``) the experiment's, with this run added."""
        data: dict[str, Any] = {}
        if resume:
            data = storage.load_json(root, LEDGER_FILE) or {}
        data["budget_s"] = budget_s
        return cls(root, data, started)

    @property
    def path(self) -> Path:
        return storage.local_dir(self.root) / LEDGER_FILE

    # -- the clock ---------------------------------------------------------------------
    def spent_before(self) -> float:
        """Seconds spent by earlier runs of this experiment."""
        return sum(float(r.get("wall_s", 0.0)) for r in self.data["runs"][:-1])

    def now(self) -> float:
        """On the budget's clock: seconds since the first run started, counting only time a run was going."""
        return self.spent_before() + time.time() - self.started

    def left(self) -> float:
        return self.data["budget_s"] - self.now()

    def deadline(self, seconds_from_now: float) -> float:
        return time.time() + seconds_from_now

    # -- phases ------------------------------------------------------------------------
    def begin(self, phase: str, planned_s: float | None = None) -> None:
        entry = self.data["phases"].setdefault(phase, {"planned_s": None, "actual_s": 0.0})
        if planned_s is not None:
            entry["planned_s"] = planned_s
        self._phase = (phase, time.time(), float(entry.get("actual_s", 0.0)))
        self.save()

    def end(self, phase: str, **facts: Any) -> None:
        entry = self.data["phases"].setdefault(phase, {"planned_s": None, "actual_s": 0.0})
        with self._lock:
            self._count_phase()
            if self._phase and self._phase[0] == phase:
                self._phase = None
        entry.update(facts)
        self.save()

    def _count_phase(self) -> None:
        """The phase going on has taken its time so far, at every save: a run stopped inside it (Ctrl-C, a
        kill) leaves that time counted, and a --resume gives the phase only what its plan has left."""
        if self._phase:
            phase, began, before = self._phase
            self.data["phases"][phase]["actual_s"] = before + time.time() - began

    def record(self, phase: str, planned_s: float, actual_s: float) -> None:
        """A phase that was not bracketed by begin/end (the startup: it began before the ledger existed)."""
        entry = self.data["phases"].setdefault(phase, {"planned_s": None, "actual_s": 0.0})
        entry["planned_s"] = planned_s
        entry["actual_s"] = float(entry.get("actual_s", 0.0)) + actual_s
        self.save()

    def set(self, **fields: Any) -> None:
        self.data.update(fields)
        self.save()

    def save(self, upload: bool = True) -> None:
        with self._lock:
            self.data["runs"][-1]["wall_s"] = time.time() - self.started
            self._count_phase()
            atomic_write_json(self.path, self.data)
        if upload:
            storage.upload(self.root, self.path.parent, [LEDGER_FILE])

    @contextlib.contextmanager
    def ticking(self) -> Iterator[None]:
        """While a phase runs (inside Tune), rewrite the ledger every LEDGER_EVERY_S from a thread of the
        driver (locally; uploaded at phase ends), so a driver killed outright loses at most that much."""
        stop = threading.Event()

        def tick() -> None:
            while not stop.wait(LEDGER_EVERY_S):
                with contextlib.suppress(OSError):
                    self.save(upload=False)

        thread = threading.Thread(target=tick, name="bss-ledger", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()


def read_deadline(root: str, key: str) -> float | None:
    """This run's deadline ``key`` from the ledger the driver wrote (None: no budget, or no ledger)."""
    try:
        data = storage.read_local_json(storage.local_dir(root) / LEDGER_FILE)
    except (OSError, ValueError):
        return None
    value = (data or {}).get("deadlines", {}).get(key)
    return float(value) if isinstance(value, (int, float)) else None


class _Cached:
    """A ledger deadline, read at most once a second (Tune asks many times a second)."""

    def __init__(self, root: str, key: str) -> None:
        self.root, self.key = root, key
        self._value: float | None = None
        self._read_at = -1e18

    def __getstate__(self) -> dict[str, Any]:
        return {"root": self.root, "key": self.key}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["root"], state["key"])

    def get(self) -> float | None:
        if time.monotonic() - self._read_at >= 1.0:
            self._value, self._read_at = read_deadline(self.root, self.key), time.monotonic()
        return self._value


class DeadlineSearcher(Searcher):
    """Ray's searcher, which suggests no new trial once a trial could no longer finish before the search's
    deadline (the ledger's ``search_start_by``): Tune then lets the running trials end and the search is over.

    The first ``first_wave`` trials (one per worker) always start, however late: without one full-budget
    trial the job has no winner, and the plan made their time fit (a slow actor start costs seconds).
    It delegates everything else, like Ray's ConcurrencyLimiter."""

    def __init__(self, searcher: Searcher, root: str, first_wave: int = 1) -> None:
        self.searcher = searcher
        self.start_by = _Cached(root, "search_start_by")
        self.first_wave, self.suggested = first_wave, 0
        super().__init__(metric=searcher.metric, mode=searcher.mode)

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        return self.searcher.set_search_properties(metric, mode, config, **spec)

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        return self.searcher.set_max_concurrency(max_concurrent)

    def suggest(self, trial_id: str) -> dict | None:
        start_by = self.start_by.get()
        if self.suggested >= self.first_wave and start_by is not None and time.time() > start_by:
            return Searcher.FINISHED
        config = self.searcher.suggest(trial_id)
        if isinstance(config, dict):
            self.suggested += 1
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self.searcher.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.searcher.on_trial_complete(trial_id, result=result, error=error)

    def add_evaluated_point(self, *args: Any, **kwargs: Any) -> None:
        self.searcher.add_evaluated_point(*args, **kwargs)

    def save(self, checkpoint_path: str) -> None:
        self.searcher.save(checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        self.searcher.restore(checkpoint_path)

    # A wrapper's own state (Tune's SearchGenerator saves the searcher it wraps separately): how many trials it
    # started. The deadline is read from the ledger of the run at hand.
    def get_state(self) -> dict:
        return {"suggested": self.suggested}

    def set_state(self, state: dict) -> None:
        self.suggested = int(state.get("suggested", 0))


class DeadlineStopper(Stopper):
    """Tune's stop of last resort: the whole phase ends BACKSTOP_S after the ledger's deadline ``key``."""

    def __init__(self, root: str, key: str) -> None:
        self.deadline = _Cached(root, key)

    def __call__(self, trial_id: str, result: dict) -> bool:
        return False

    def stop_all(self) -> bool:
        deadline = self.deadline.get()
        if deadline is not None and time.time() > deadline + BACKSTOP_S:
            log.warning("the budget's deadline passed %.0f s ago: Tune stops the trials still running", BACKSTOP_S)
            return True
        return False
