"""The search as an Optuna study in SQLite, ``<experiment>/optuna.db``, for optuna-dashboard and ``optuna.load_study``.

Why a study of our own: OptunaSearch keeps one inside Ray's searcher checkpoint, a pickle that no
Optuna tool opens, and it records a trial that ASHA stopped as COMPLETE. This study holds one
finished trial per Tune trial, in the states Optuna's tools understand, mapped from the statuses of
``search/selection.py`` so that the study, ``report.json`` and the winner rule never disagree:

    completed  (ran its full budget)   -> COMPLETE, value = its last validation MSE
    stopped    (stopped early by ASHA) -> PRUNED,   value = its last validation MSE
    diverged, errored                  -> FAIL,     no value

A two-objective search (``tune.objectives: [val_mse, <cost>]``, search/objectives.py) is a study with two
directions (both minimise), metric names ``[val_mse, <cost>]``: a COMPLETE trial's values are (its last
validation MSE, its cost), so the study's own Pareto front (``study.best_trials``, optuna-dashboard's Pareto front
plot) is the report's; a PRUNED trial has no values, so it is never on that front; the costs the trial measured
(params, macs, cpu_ms, cpu_model ...) are user attributes. A full-budget trial that reported no cost is FAIL.

Each trial also carries its parameters with their distributions (``search/space.py``'s table), its
validation MSE per epoch as intermediate values (step = epoch), its start and end times, and user
attributes: ``tune_trial_id``, ``tune_number``, ``status``, ``epochs``, ``samples``, ``error``, ``node``.
A parameter value outside its declared distribution (a hand-given starting point) goes to the user
attribute ``params_outside_space`` instead, because Optuna refuses it and optuna-dashboard drops a
parameter whose distribution differs between trials.

When it is written:
- while the search runs, by ``StudyRecorder``, a Tune callback in the driver: the (empty) study when
  the search starts, then each trial as it ends (after its retries). It keeps each trial's epochs
  from Tune's results as they arrive -- Tune's own result.json of a trial restored after a failure
  can lack the epochs before the restore -- and Tune saves that state with the experiment, so a
  resumed search goes on with the epochs it had already seen;
- at the end of the search, by ``record_results``, from Tune's final results: it adds any trial the
  callback did not record (one that ended while the driver was dead, or a search started before the
  study existed).

The study is named after the experiment and keyed by Tune's trial id, so a resume or a rerun adds
each trial once. With URI storage the file lives in the local mirror (``storage.local_dir``) and is
uploaded at the end of the search. The study is a view of the search: a failure to write it is
logged and never stops the search.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ray.tune import Callback

from search import storage
from search.objectives import cost_of, trial_costs
from search.results import COMPLETED, DIVERGED, ERRORED, STOPPED, TrialRow
from search.selection import METRIC, trial_row
from search.space import Dimension, optuna_distributions

log = logging.getLogger("bss")

STUDY_FILE = "optuna.db"
# Optuna's TrialState names, by our status (search/results.py).
STATES = {COMPLETED: "COMPLETE", STOPPED: "PRUNED", DIVERGED: "FAIL", ERRORED: "FAIL"}
# What the study keeps of each reported result (the callback's state stays small).
RESULT_KEYS = ("epoch", METRIC, "samples", "timestamp", "time_this_iter_s", "diverged")


def study_path(root: str) -> Path:
    return storage.local_dir(root) / STUDY_FILE


def storage_url(path: Path) -> str:
    return f"sqlite:///{Path(path).resolve()}"


def _finite(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def intermediate_values(results: Iterable[dict[str, Any]]) -> dict[int, float]:
    """Validation MSE by epoch from a trial's reported results, in order.

    An epoch reported twice (a retry restored from an earlier checkpoint runs it again) keeps its
    last value. The report a diverged trial makes last repeats its last good epoch with a NaN: it
    marks the divergence and is not a validation, so it is skipped.
    """
    out: dict[int, float] = {}
    for r in results:
        epoch, value = r.get("epoch"), r.get(METRIC)
        if r.get("diverged") is True or epoch is None or value is None:
            continue
        with contextlib.suppress(TypeError, ValueError):
            if not math.isnan(float(epoch)):
                out[int(epoch)] = float(value)
    return dict(sorted(out.items()))


def _json_safe(value: Any) -> Any:
    """numpy scalars (Tune's samples) as plain Python, for Optuna's JSON user attributes."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (list, dict, str)) else value


def _split_params(params: dict[str, Any], dims: dict[str, Dimension]) -> tuple[dict, dict, dict]:
    """(params, distributions) that Optuna accepts, and the values outside their distribution."""
    inside, dists, outside = {}, {}, {}
    for key, dist in optuna_distributions(dims).items():
        if key not in params:
            continue
        value = _json_safe(params[key])
        try:
            ok = dist._contains(dist.to_internal_repr(value))
        except (ValueError, TypeError):
            ok = False
        if ok:
            inside[key], dists[key] = value, dist
        else:
            outside[key] = value
    return inside, dists, outside


def _times(results: list[dict[str, Any]]) -> tuple[datetime.datetime | None, datetime.datetime | None]:
    """When the trial started (its first result's time less that epoch's duration) and last reported."""
    stamps = [(r.get("timestamp"), r.get("time_this_iter_s")) for r in results if _finite(r.get("timestamp"))]
    if not stamps:
        return None, None
    first, took = stamps[0]
    start = float(first) - (_finite(took) or 0.0)
    return datetime.datetime.fromtimestamp(start), datetime.datetime.fromtimestamp(float(stamps[-1][0]))


def frozen_trial(row: TrialRow, results: list[dict[str, Any]], dims: dict[str, Dimension]) -> Any:
    """One Tune trial as a finished Optuna trial; ``results`` are its reported results in order."""
    import optuna

    state = optuna.trial.TrialState[STATES[row.status]]
    params, dists, outside = _split_params(row.params, dims)
    samples = next((r["samples"] for r in reversed(results) if _finite(r.get("samples")) is not None), None)
    attrs = {
        "tune_trial_id": row.trial_id,
        "tune_number": row.number,
        "status": row.status,
        "epochs": row.epochs,
        "samples": int(samples) if samples is not None else None,
        "error": row.error,
        "node": row.node,
    }
    if outside:
        attrs["params_outside_space"] = outside
    trial = optuna.trial.create_trial(
        state=state,
        # COMPLETE always has a finite value (selection's rule); PRUNED keeps its last one, as Optuna does.
        value=None if state == optuna.trial.TrialState.FAIL else _finite(row.val_mse),
        params=params,
        distributions=dists,
        user_attrs=attrs,
        intermediate_values=intermediate_values(results),
    )
    start, end = _times(results)
    if start is not None:
        trial.datetime_start, trial.datetime_complete = start, max(start, end)
    return trial


@contextlib.contextmanager
def quiet_optuna() -> Iterator[None]:
    """Optuna at WARNING while it creates a study ("A new study created ..." is INFO), then as it was:
    its verbosity is the process's, set by the user or an entry point, not by a library function."""
    import optuna

    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(before)


def open_study(path: Path, name: str, objectives: Sequence[str] = (METRIC,)) -> Any:
    """The study ``name`` in the SQLite file ``path``, created on first use; one direction per objective."""
    import optuna

    path.parent.mkdir(parents=True, exist_ok=True)
    with quiet_optuna():
        study = optuna.create_study(
            storage=optuna.storages.RDBStorage(storage_url(path)),
            study_name=name,
            directions=["minimize"] * len(objectives),
            load_if_exists=True,
        )
    if study.metric_names is None:
        with warnings.catch_warnings():  # set_metric_names is marked experimental
            warnings.simplefilter("ignore")
            study.set_metric_names(list(objectives))
    return study


def study_trial(
    row: TrialRow, results: list[dict[str, Any]], dims: dict[str, Dimension], objectives: Sequence[str],
    metrics: dict[str, Any] | None,
) -> Any:  # fmt: skip
    """:func:`frozen_trial`, for a two-objective search (search/objectives.py) with values (val MSE, cost) and
    its costs as user attributes. A stopped trial stays PRUNED, with no values: it is never on the study's front."""
    trial = frozen_trial(row, results, dims)
    cost = cost_of(objectives)
    if cost is None:
        return trial
    import optuna

    costs = trial_costs(metrics, objectives)
    trial.user_attrs.update(costs)
    c = _finite(costs.get(cost))
    if trial.state == optuna.trial.TrialState.COMPLETE and c is not None:
        trial.values = [row.val_mse, c]
    elif trial.state == optuna.trial.TrialState.COMPLETE:  # a full budget but no cost: not a point of the front
        trial.state, trial.values = optuna.trial.TrialState.FAIL, None
        trial.user_attrs["error"] = f"no {cost} reported"
    else:
        trial.values = None
    return trial


def recorded_ids(study: Any) -> set[str]:
    return {t.user_attrs.get("tune_trial_id") for t in study.get_trials(deepcopy=False)}


def add_new(study: Any, trials: Iterable[Any]) -> int:
    """Add the trials whose Tune trial id the study does not hold yet; returns how many were added."""
    known = recorded_ids(study)
    added = 0
    for trial in trials:
        if trial.user_attrs["tune_trial_id"] in known:
            continue
        study.add_trial(trial)
        known.add(trial.user_attrs["tune_trial_id"])
        added += 1
    return added


def _history(result: Any) -> list[dict[str, Any]]:
    """A Tune Result's reported results (its metrics_dataframe), else just its last result."""
    df = getattr(result, "metrics_dataframe", None)
    if df is not None and len(df):
        cols = [c for c in RESULT_KEYS if c in df.columns]
        return [{k: v for k, v in row.items() if not _is_missing(v)} for row in df[cols].to_dict("records")]
    return [result.metrics] if result.metrics else []


def _is_missing(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def record_results(
    root: str, name: str, dims: dict[str, Dimension], results: Any, budget: int, objectives: Sequence[str] = (METRIC,)
) -> Path:
    """Add every finished Tune trial the study lacks, from the search's final results; upload for URIs."""
    path = study_path(root)
    try:
        entries = [
            study_trial(
                trial_row(r.metrics, r.error, r.config, r.path, budget), _history(r), dims, objectives, r.metrics
            )  # fmt: skip
            for r in results
        ]
        added = add_new(open_study(path, name, objectives), entries)
        storage.upload(root, path.parent, [STUDY_FILE])
    except Exception as exc:  # the study is a view: the retrain and the report go on without it
        log.warning("optuna study %s not written (%s: %s)", path, type(exc).__name__, exc)
        return path
    if added:
        log.info("optuna study: %d trial(s) added at the end of the search (the driver missed their end)", added)
    return path


def _error_of(trial: Any) -> str:
    """The text of a failed trial's last error, from the error file Tune wrote on this driver."""
    path = getattr(trial, "error_file", None)
    if path and Path(path).exists():
        return Path(path).read_text(errors="replace")
    return "error"


class StudyRecorder(Callback):
    """Adds each search trial to the study as it ends (see the module docstring)."""

    def __init__(
        self, root: str, name: str, dims: dict[str, Dimension], budget: int, objectives: Sequence[str] = (METRIC,)
    ) -> None:
        self.root, self.name, self.dims, self.budget = root, name, dims, budget
        self.objectives = list(objectives)
        self.results: dict[str, list[dict[str, Any]]] = {}  # trial id -> its reported results (RESULT_KEYS)
        self._study: Any = None

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles the callbacks into tuner.pkl: the open database connection stays behind.
        return {**self.__dict__, "_study": None}

    def setup(self, **info: Any) -> None:
        # At the start of the search (and of each resume): the first write creates the schema, which
        # takes seconds, and should not hold up the driver when the first trial ends. It also gives
        # the dashboard a study to open from the start.
        self._open(None)

    def _open(self, trial_id: str | None) -> bool:
        try:
            if self._study is None:
                # (A recorder pickled before objectives existed has none: the single-objective study.)
                self._study = open_study(study_path(self.root), self.name, self.__dict__.get("objectives", [METRIC]))
            return True
        except Exception as exc:  # a view of the search must never stop it; the end of the search reconciles
            what = f"trial {trial_id} not recorded yet" if trial_id else "not opened yet"
            log.warning("optuna study: %s (%s: %s)", what, type(exc).__name__, exc)
            self._study = None
            return False

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self.results.setdefault(trial.trial_id, []).append({k: result[k] for k in RESULT_KEYS if k in result})

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.record(trial, error=None)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.record(trial, error=_error_of(trial))

    def record(self, trial: Any, error: Any) -> None:
        row = trial_row(trial.last_result, error, trial.config, trial.path, self.budget)
        if not self._open(row.trial_id):
            return
        try:
            objectives = self.__dict__.get("objectives", [METRIC])
            entry = study_trial(row, self.results.get(trial.trial_id, []), self.dims, objectives, trial.last_result)
            add_new(self._study, [entry])
        except Exception as exc:  # as in _open
            log.warning("optuna study: trial %s not recorded yet (%s: %s)", row.trial_id, type(exc).__name__, exc)
            self._study = None
            return
        self.results.pop(trial.trial_id, None)

    def get_state(self) -> dict[str, Any]:
        return {"results": self.results}

    def set_state(self, state: dict[str, Any]) -> None:
        self.results = dict(state.get("results", {}))
