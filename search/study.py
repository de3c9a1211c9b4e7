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

Where: by default ``<experiment>/optuna.db``, a SQLite file of its own. ``tune.study_storage`` names an
Optuna storage URL instead (``postgresql://bss@db.lab:5432/studies``), which a team shares: one
``optuna-dashboard <url>`` shows every experiment, each its own study. The study carries its experiment
(the user attribute ``bss_experiment``: the experiment's root), so before Ray starts (:func:`claim_study`)
a ``--resume`` goes on with its own study, and a new experiment is refused a name whose study holds
another experiment's trials -- never merged into it. A database that does not answer, or refuses the
credentials, is one line then too.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
import re
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ray.tune import Callback

from bss_model.errors import ConfigError
from search import storage
from search.objectives import cost_of, trial_costs
from search.results import COMPLETED, CUT, DIVERGED, ERRORED, STOPPED, TrialRow
from search.selection import METRIC, trial_row
from search.space import Dimension, optuna_distributions

log = logging.getLogger("bss")

STUDY_FILE = "optuna.db"
# Optuna's TrialState names, by our status (search/results.py).
STATES = {COMPLETED: "COMPLETE", STOPPED: "PRUNED", CUT: "PRUNED", DIVERGED: "FAIL", ERRORED: "FAIL"}
# What the study keeps of each reported result (the callback's state stays small).
RESULT_KEYS = ("epoch", METRIC, "samples", "timestamp", "time_this_iter_s", "diverged")


def study_path(root: str) -> Path:
    return storage.local_dir(root) / STUDY_FILE


def storage_url(path: Path) -> str:
    return f"sqlite:///{Path(path).resolve()}"


# --------------------------------------------------------------------------------------
# tune.study_storage: a shared database

OWNER = "bss_experiment"  # the study's user attribute naming the experiment it belongs to (its root)
_VAR = re.compile(r"\$\{(\w+)\}")


def _parse(url: str) -> Any:
    import sqlalchemy.engine
    import sqlalchemy.exc

    try:
        return sqlalchemy.engine.make_url(url)
    except (sqlalchemy.exc.ArgumentError, ValueError):
        return None


def shown_url(url: str) -> str:
    """A storage URL fit to print: any password masked."""
    parsed = _parse(url)
    return parsed.render_as_string(hide_password=True) if parsed is not None else url


def check_storage_url(url: str) -> None:
    """``tune.study_storage`` is a database URL without a password in it (the config is saved with the results)."""
    parsed = _parse(_VAR.sub("x", url))
    if parsed is None or not parsed.drivername:
        raise ConfigError(
            f"tune.study_storage={url!r} is not a database URL: use e.g. postgresql://user@host:5432/studies or "
            "sqlite:////absolute/path/studies.db (empty: the experiment's own optuna.db)"
        )
    password = _parse(url).password if _parse(url) is not None else None
    if password and not _VAR.search(str(password)):
        raise ConfigError(
            f"tune.study_storage {shown_url(url)} holds a password, which would be saved in plain text beside the "
            "results: drop it from the URL and set PGPASSWORD or ~/.pgpass (PostgreSQL), or write ${VAR} there "
            "for a variable read from the environment when connecting"
        )


def location(root: str, storage: str = "") -> Path | str:
    """Where the study lives: the experiment's own SQLite file, or ``tune.study_storage``'s URL."""
    return storage or study_path(root)


def _expanded(url: str) -> str:
    missing = [v for v in _VAR.findall(url) if v not in os.environ]
    if missing:
        raise ConfigError(
            f"tune.study_storage {shown_url(url)} reads ${{{missing[0]}}} from the environment, which does not set "
            f"it: export {missing[0]}=..."
        )
    return _VAR.sub(lambda m: os.environ[m.group(1)], url)


def rdb_storage(url: str) -> Any:
    """Optuna's storage for a database URL; a database that does not answer fails in seconds, not minutes."""
    import optuna

    parsed = _parse(url)
    connect_args = {}
    if parsed is not None and parsed.get_backend_name() == "postgresql" and "connect_timeout" not in parsed.query:
        connect_args["connect_timeout"] = 10
    return optuna.storages.RDBStorage(
        _expanded(url),
        engine_kwargs={"pool_pre_ping": True, **({"connect_args": connect_args} if connect_args else {})},
    )


def _storage_error(url: str, exc: BaseException) -> ConfigError:
    """One line for a database that cannot be used: its driver, the server, the credentials, the database."""
    from bss_model.cli import MissingExtra

    shown, text = shown_url(url), " ".join(str(exc).split())
    if isinstance(exc, ModuleNotFoundError):
        if "psycopg" in text:
            return MissingExtra(
                f"tune.study_storage {shown} needs the 'postgresql' extra (psycopg not installed): "
                "pip install 'bss-search[postgresql]'"
            )
        return ConfigError(f"tune.study_storage {shown}: the database driver is not installed ({text}): install it")
    low = text.lower()
    if "password authentication failed" in low or "access denied" in low or "no password supplied" in low:
        why = "the server refused the credentials"
        fix = "fix the user in the URL and its password (PGPASSWORD or ~/.pgpass for PostgreSQL)"
    elif "does not exist" in low and "database" in low:
        why, fix = "the database does not exist", "create it (e.g. `createdb`) or fix the database name in the URL"
    elif any(k in low for k in ("connection refused", "could not connect", "timeout expired", "could not translate",
                                "name or service not known", "no such host", "can't connect")):  # fmt: skip
        why, fix = "the database server cannot be reached", "start it, or fix the host and port in the URL"
    else:
        why, fix = "the database cannot be used", "check the URL, the server and the credentials"
    detail = text.split("(Background on this error")[0].strip()[:200]
    return ConfigError(f"tune.study_storage {shown}: {why} ({detail}): {fix}")


def claim_study(storage: str, name: str, root: str, resume: bool, objectives: Sequence[str] = (METRIC,)) -> None:
    """Before Ray starts: the database answers, and study ``name`` in it is this experiment's (or is made so).

    A new experiment may not take a name whose study already holds trials (any experiment's, this
    folder's earlier one included): they would merge. A ``--resume`` goes on with its own study only.
    """
    import optuna

    try:
        rdb = rdb_storage(storage)
        try:
            study_id = rdb.get_study_id_from_name(name)
        except KeyError:
            study_id = None
        if study_id is None:
            with quiet_optuna():
                study = optuna.create_study(
                    storage=rdb, study_name=name, directions=["minimize"] * len(objectives)
                )  # fmt: skip
            study.set_user_attr(OWNER, root)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                study.set_metric_names(list(objectives))
            return
        owner = rdb.get_study_user_attrs(study_id).get(OWNER)
        trials = len(rdb.get_all_trials(study_id, deepcopy=False))
        directions = len(rdb.get_study_directions(study_id))
    except ConfigError:
        raise
    except Exception as exc:  # SQLAlchemy's, the driver's: one line naming the fix
        raise _storage_error(storage, exc) from None
    shown = shown_url(storage)
    if owner not in (None, root):
        raise ConfigError(
            f"optuna study '{name}' in {shown} belongs to another experiment ({owner}, {trials} trials): a "
            f"{'resume' if resume else 'new experiment'} here would merge into it; choose another --name"
        )
    if trials and not resume:
        raise ConfigError(
            f"optuna study '{name}' in {shown} already holds {trials} trials of an earlier experiment at {root}: a "
            "new one would merge into it; choose another --name, or delete that study first "
            f"(optuna delete-study --study-name {name} --storage <url>)"
        )
    if directions != len(objectives):
        raise ConfigError(
            f"optuna study '{name}' in {shown} has {directions} objective(s) and tune.objectives {list(objectives)} "
            f"{len(objectives)}: choose another --name, or delete that study first "
            f"(optuna delete-study --study-name {name} --storage <url>)"
        )
    if owner is None:
        optuna.load_study(study_name=name, storage=rdb).set_user_attr(OWNER, root)


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


def open_study(path: Path | str, name: str, objectives: Sequence[str] = (METRIC,)) -> Any:
    """The study ``name`` in the SQLite file ``path`` (or at the storage URL ``path``), created on first use;
    one direction per objective."""
    import optuna

    if isinstance(path, Path):
        path.parent.mkdir(parents=True, exist_ok=True)
    with quiet_optuna():
        study = optuna.create_study(
            storage=optuna.storages.RDBStorage(storage_url(path)) if isinstance(path, Path) else rdb_storage(path),
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
    root: str,
    name: str,
    dims: dict[str, Dimension],
    results: Any,
    budget: int,
    study_storage: str = "",
    objectives: Sequence[str] = (METRIC,),
) -> Path | str:
    """Add every finished Tune trial the study lacks, from the search's final results; upload for URIs."""
    path = location(root, study_storage)
    try:
        entries = [
            study_trial(
                trial_row(r.metrics, r.error, r.config, r.path, budget), _history(r), dims, objectives, r.metrics
            )  # fmt: skip
            for r in results
        ]
        added = add_new(open_study(path, name, objectives), entries)
        if isinstance(path, Path):
            storage.upload(root, path.parent, [STUDY_FILE])
    except Exception as exc:  # the study is a view: the retrain and the report go on without it
        log.warning("optuna study %s not written (%s: %s)", shown_url(str(path)), type(exc).__name__, exc)
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
        self,
        root: str,
        name: str,
        dims: dict[str, Dimension],
        budget: int,
        study_storage: str = "",
        objectives: Sequence[str] = (METRIC,),
    ) -> None:
        self.root, self.name, self.dims, self.budget = root, name, dims, budget
        self.study_storage = study_storage
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
                # (A recorder pickled before study_storage or objectives existed has none: the experiment's own
                # file, the single-objective study.)
                where = location(self.root, getattr(self, "study_storage", ""))
                self._study = open_study(where, self.name, self.__dict__.get("objectives", [METRIC]))
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
