"""What a search prints: one line per trial event in the project's words, and a status line now and then.

Ray Tune's own reporter (boxed config and result tables per trial, a heartbeat table) is off by
default (``tune.verbose: 0``) and comes back with ``--verbose`` (``tune.verbose: 2``). These
callbacks run in the driver and print plain lines, so a log file or a CI console reads the same as
a terminal.

A trial is named as its TensorBoard run and its folder are (``trial_label``): ``007-f785168e``,
the order Tune created it in and its id; a retrain trial is ``seed-1000``.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ray.tune import Callback

from bss_model.cli import command_name  # noqa: F401  (its old home: search.console.command_name)
from bss_model.io import logging_to
from search.results import CUT, STOPPED
from search.selection import METRIC, trial_status

# Often enough to see a search move, rarely enough that 8 trials stay one screen.
STATUS_EVERY_S = 30.0


def trial_number(trial: Any) -> int:
    """The order Tune created a trial in: the leading number of its experiment tag (``7_model.filters=8,...``)."""
    head = str(getattr(trial, "experiment_tag", "") or "").split("_", 1)[0]
    return int(head) if head.isdigit() else 0


def _error_line(trial: Any) -> str:
    """The last line of a trial's error. Tune reads it from storage: when storage itself is what failed (an
    S3 outage), the console says so rather than raising inside Tune's callback and losing the clear exit."""
    try:
        return _last_line(trial.get_error() if hasattr(trial, "get_error") else None)
    except OSError as exc:
        return f"(its error could not be read from storage: {' '.join(str(exc).split())[:160]})"


def trial_label(trial: Any) -> str:
    """``007-f785168e``: a search trial's number and Tune's id. Its folder and TensorBoard run are named so."""
    return f"{trial_number(trial):03d}-{trial.trial_id}"


def seed_label(trial: Any) -> str:
    """``seed-1000``: a retrain trial (a grid over ``train.seed``), its folder and TensorBoard run."""
    return f"seed-{trial.config['train.seed']}"


def short_params(params: dict[str, Any]) -> str:
    """``filters=8 bottleneck_convs=1 lr=0.00133``: each dotted key's last part, floats to 3 significant digits."""
    parts = []
    for key, value in params.items():
        text = f"{value:.3g}" if isinstance(value, float) else str(value)
        parts.append(f"{key.rsplit('.', 1)[-1]}={text}")
    return " ".join(parts)


def duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def _mse(value: Any) -> str:
    return f"{value:.3e}" if isinstance(value, (int, float)) and math.isfinite(value) else "n/a"


def _last_line(error: Any) -> str:
    text = str(error or "").strip()
    return text.splitlines()[-1] if text else "unknown error"


class SearchProgress(Callback):
    """The search's console: a line per trial start, finish, ASHA stop, retry and error; a status line.

    (Kept under its old name: experiments pickle their callbacks, and a ``--resume`` of one started
    before this class grew its lines unpickles it by that name.)
    """

    def __init__(self, budget: int, total: int = 0, every_s: float = STATUS_EVERY_S) -> None:
        self.budget, self.total, self.every_s = budget, total, every_s
        self._reset()

    def _reset(self) -> None:
        self.t0 = time.monotonic()
        self.last_status = self.t0
        self.started: set[str] = set()
        self.ended: dict[str, str] = {}  # trial id -> completed | stopped | errored
        self.best: tuple[float, str] | None = None

    def __getstate__(self) -> dict[str, Any]:
        # Only the settings travel in the experiment's pickle: a resumed search counts its own time.
        return {"budget": self.budget, "total": self.total, "every_s": self.every_s}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.budget, self.total = state["budget"], state.get("total", 0)
        self.every_s = state.get("every_s", STATUS_EVERY_S)
        self._reset()

    def setup(self, total_num_samples: int = 0, **info: Any) -> None:
        self._reset()
        self.total = self.total or total_num_samples

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if trial.trial_id in self.started:
            return
        self.started.add(trial.trial_id)
        print(f"trial {trial_label(trial)} started: {short_params(trial.evaluated_params or {})}", flush=True)

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        print(f"trial {trial_label(trial)} failed; retrying from its last checkpoint", flush=True)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        m = trial.last_result or {}
        label, epochs, val = trial_label(trial), m.get("epoch", 0), m.get(METRIC, math.nan)
        speed = f", {m['samples_per_s']:.0f} samples/s" if isinstance(m.get("samples_per_s"), (int, float)) else ""
        status = trial_status(m, None, self.budget)
        self.ended[trial.trial_id] = status
        if status == CUT:
            when = f"after epoch {epochs}/{self.budget}" if epochs else "before its first epoch"
            print(f"trial {label} cut by the budget's deadline {when}: it could not finish in time", flush=True)
            return
        if status == STOPPED:
            print(
                f"trial {label} stopped early by ASHA after epoch {epochs}/{self.budget}: val MSE {_mse(val)} "
                f"is not among the best at its rung{speed}",
                flush=True,
            )
            return
        if isinstance(val, (int, float)) and math.isfinite(val) and (self.best is None or val < self.best[0]):
            self.best = (val, label)
        print(f"trial {label} finished: val MSE {_mse(val)} after {epochs}/{self.budget} epochs{speed}", flush=True)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        m = trial.last_result or {}
        self.ended[trial.trial_id] = "errored"
        reason = m.get("reason") or _error_line(trial)
        word = "diverged" if m.get("diverged") else "errored"
        print(f"trial {trial_label(trial)} {word} after epoch {m.get('epoch', 0)}/{self.budget}: {reason}", flush=True)

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        now = time.monotonic()
        if now - self.last_status < self.every_s:
            return
        self.last_status = now
        print(self.status_line(trials, now), flush=True)

    def status_line(self, trials: list, now: float) -> str:
        statuses = [t.status for t in trials]
        done = sum(s in ("TERMINATED", "ERROR") for s in statuses)
        running = statuses.count("RUNNING")
        stopped = sum(v == STOPPED for v in self.ended.values())
        errored = statuses.count("ERROR")
        elapsed = now - self.t0
        total = self.total or len(trials)
        line = (
            f"[search {duration(elapsed)}] {done}/{total} trials done ({stopped} stopped early, {errored} errored), "
            f"{running} running"
        )
        if self.best is not None:
            line += f"; best val MSE {self.best[0]:.3e} ({self.best[1]})"
        # The work in epochs: a trial that ended (ASHA stop or error included) needs no more, a running one has
        # its last epoch done. An upper bound on what is left, as ASHA will stop some trials early.
        work = sum(
            self.budget if t.status in ("TERMINATED", "ERROR") else (t.last_result or {}).get("epoch", 0)
            for t in trials
        )
        if 0 < work and done < total:
            line += f"; ETA {duration(elapsed * (total * self.budget - work) / work)}"
        return line


def shown_path(path: str | Path) -> str:
    """A local path as the user would type it: relative to the working directory when inside it."""
    text = str(path)
    if "://" in text:
        return text
    p = Path(path).resolve()
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return str(p)


def where_lines(root: str, name: str, study_storage: str = "") -> list[str]:
    """Where the experiment is and how to look at it: the folder, TensorBoard, the Optuna dashboard."""
    folder = shown_path(root)
    if study_storage:  # a shared database: its dashboard shows this experiment beside the others
        from search.study import shown_url

        dashboard = f"optuna-dashboard {shown_url(study_storage)} --host 127.0.0.1 (study '{name}')"
    elif "://" not in root and Path(root).resolve() == (Path("results") / name).resolve():
        dashboard = f"make dashboard NAME={name}"
    else:
        dashboard = f"optuna-dashboard sqlite:///{Path(root).resolve() / 'optuna.db'} --host 127.0.0.1"
    return [
        f"experiment: {folder}",
        f"TensorBoard: tensorboard --logdir {folder} --host 127.0.0.1",
        f"Optuna dashboard (once the first trial ends): {dashboard}",
    ]


# Ray's threshold (seconds) under which consecutive experiment-state snapshots draw a warning; 0 turns it off.
EXCESSIVE_SNAPSHOTS = "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S"


@contextlib.contextmanager
def entry_point(verbose: int) -> Iterator[None]:
    """The process-wide settings of search/run.py and search/retrain.py, for the length of the command, then
    restored (a command called in-process leaves the process as it found it):

    - the ``bss`` logger to the console (``bss_model.io.logging_to``; the pipeline adds the experiment's log file);
    - at ``tune.verbose: 0``, Ray's legacy output engine (``RAY_AIR_NEW_OUTPUT=0``), which prints nothing at 0,
      where the new one still prints an experiment box and a TensorBoard hint into /tmp/ray; above 0 Ray's own
      tables come back as Ray prints them;
    - at ``tune.verbose: 0``, no Ray warning that experiment-state snapshots came less than 5 s apart: a trial
      checkpoints at its first and last epoch (and every 30 s between, ``trainable.CHECKPOINT_EVERY_S``), so
      Tune forces a snapshot as each short trial ends, and two trials ending together tripped it on every smoke
      search. Ray's warning that a snapshot was *slow* (storage trouble) stays;
    - Optuna at WARNING: its INFO "A new study created in memory" is OptunaSearch's in-memory copy, not the
      experiment's optuna.db;
    - $BSS_DATA_DIR made absolute: a local Ray's workers inherit it and run in their trial folders.
    """
    import optuna

    env_before = {k: os.environ.get(k) for k in ("RAY_AIR_NEW_OUTPUT", EXCESSIVE_SNAPSHOTS, "BSS_DATA_DIR")}
    optuna_before = optuna.logging.get_verbosity()
    try:
        if verbose == 0:
            os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
            os.environ.setdefault(EXCESSIVE_SNAPSHOTS, "0")
        if os.environ.get("BSS_DATA_DIR"):
            os.environ["BSS_DATA_DIR"] = str(Path(os.environ["BSS_DATA_DIR"]).expanduser().resolve())
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        with logging_to():
            yield
    finally:
        optuna.logging.set_verbosity(optuna_before)
        for key, value in env_before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
