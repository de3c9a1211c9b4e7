"""The Optuna study in SQLite (search/study.py) on synthetic trials: states, values, epochs, params, no duplicates.

The finished searches are checked against their report.json in test_search_e2e (a normal run and the
dashboard's HTTP API) and test_reliability (a driver SIGKILLed mid-search, then --resume). Here the
rows are real ``ray.tune.Result`` objects, and the callback is driven with the hooks Tune calls.
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import optuna
import pandas as pd
import pytest
from ray.tune import Result

from search.results import COMPLETED, DIVERGED, ERRORED, STOPPED
from search.selection import trial_row
from search.space import parse_space
from search.study import STUDY_FILE, StudyRecorder, frozen_trial, intermediate_values, record_results

BUDGET = 3
DIMS = parse_space({"train.lr": {"loguniform": [1e-4, 1e-2]}, "model.filters": {"choice": [4, 8]}})
State = optuna.trial.TrialState


def reports(vals: list[float], t0: float = 1.8e9, **last: Any) -> list[dict[str, Any]]:
    """A trial's reported results, one per epoch (10 s each), the last one updated with ``last``."""
    rows = [{"epoch": e, "val_mse": v, "samples": 640 * e, "timestamp": t0 + 10 * e, "time_this_iter_s": 10.0,
             "diverged": False} for e, v in enumerate(vals, 1)]  # fmt: skip
    rows[-1].update(last)
    return rows


# (status, reported results, error): one of each kind of trial
KINDS = {
    COMPLETED: (reports([0.03, 0.02, 0.01]), None),
    STOPPED: (reports([0.05]), None),  # ASHA stopped it after epoch 1 of 3
    DIVERGED: (
        reports([0.04]) + [{"epoch": 1, "val_mse": math.nan, "diverged": True, "reason": "non-finite loss"}],
        RuntimeError("TrialDiverged: non-finite loss"),
    ),  # fmt: skip
    ERRORED: (reports([0.03, 0.02]), RuntimeError("boom\nCUDA out of memory")),
}


def result(number: int, history: list[dict[str, Any]], error: Any, lr: float = 1e-3, filters: int = 8) -> Result:
    metrics = {**history[-1], "trial_id": f"t{number}", "config": {"train.lr": lr, "model.filters": filters}}
    return Result(
        metrics=metrics,
        checkpoint=None,
        error=error,
        path=f"/r/search/train_trial_ab12c_{number}_lr={lr}",
        metrics_dataframe=pd.DataFrame(history),
    )


def test_each_status_maps_to_its_optuna_state_value_and_epochs() -> None:
    expected = {COMPLETED: (State.COMPLETE, 0.01), STOPPED: (State.PRUNED, 0.05), DIVERGED: (State.FAIL, None),
                ERRORED: (State.FAIL, None)}  # fmt: skip
    for i, (status, (history, error)) in enumerate(KINDS.items()):
        path = f"/s/train_trial_ab12c_{i}"
        row = trial_row(history[-1] | {"trial_id": f"t{i}"}, error, {"train.lr": 1e-3}, path, BUDGET)
        assert row.status == status  # selection's rule decides the status...
        t = frozen_trial(row, history, DIMS)
        assert (t.state, t.value) == expected[status]  # ...and the state follows from it
        assert t.user_attrs["status"] == status and t.user_attrs["tune_trial_id"] == f"t{i}"
        assert t.user_attrs["tune_number"] == i and t.user_attrs["epochs"] == row.epochs
        # One intermediate value per validated epoch; the divergence marker is not a validation.
        good = [r for r in history if not r["diverged"]]
        assert t.intermediate_values == {r["epoch"]: r["val_mse"] for r in good}
        assert t.user_attrs["samples"] == good[-1]["samples"]
        assert (t.datetime_complete - t.datetime_start).total_seconds() == pytest.approx(10.0 * len(good))
    errored = frozen_trial(trial_row(*_args(ERRORED)), KINDS[ERRORED][0], DIMS)
    assert errored.user_attrs["error"] == "CUDA out of memory"


def _args(status: str) -> tuple:
    history, error = KINDS[status]
    return history[-1], error, {"train.lr": 1e-3}, "/s/train_trial_ab12c_9", BUDGET


def test_a_retried_epoch_keeps_its_last_value() -> None:
    """A retry restored from the epoch-1 checkpoint reports epoch 2 again: the study keeps the rerun."""
    history = reports([0.05, 0.04]) + reports([0.035, 0.03])[1:]
    assert intermediate_values(history) == {1: 0.05, 2: 0.03}
    assert intermediate_values([{"epoch": 1}, {"val_mse": 0.1}, {"epoch": float("nan"), "val_mse": 0.1}]) == {}


def test_params_carry_the_space_tables_distributions_and_out_of_space_values_go_to_a_user_attr() -> None:
    history, _ = KINDS[COMPLETED]
    inside = frozen_trial(trial_row(history[-1], None, {"train.lr": 2e-3, "model.filters": 4}, "/x", BUDGET), history,
                          DIMS)  # fmt: skip
    assert inside.params == {"train.lr": 2e-3, "model.filters": 4}
    assert inside.distributions == {
        "train.lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True),
        "model.filters": optuna.distributions.CategoricalDistribution([4, 8]),
    }
    # A hand-given starting point outside the space: kept, but not as a param (Optuna refuses it there).
    outside = frozen_trial(trial_row(history[-1], None, {"train.lr": 1.0, "model.filters": 16}, "/x", BUDGET), history,
                           DIMS)  # fmt: skip
    assert outside.params == {} and outside.user_attrs["params_outside_space"] == {"train.lr": 1.0, "model.filters": 16}


def test_record_results_adds_each_trial_once_and_load_study_reads_them(tmp_path: Path) -> None:
    results = [result(i, *KINDS[status]) for i, status in enumerate(KINDS)]
    path = record_results(str(tmp_path), "exp", DIMS, results[:2], BUDGET)
    assert path == tmp_path / STUDY_FILE
    record_results(str(tmp_path), "exp", DIMS, results, BUDGET)  # a rerun: the first two again, two new
    record_results(str(tmp_path), "exp", DIMS, results, BUDGET)
    study = optuna.load_study(study_name="exp", storage=f"sqlite:///{path}")
    assert study.direction == optuna.study.StudyDirection.MINIMIZE and study.metric_names == ["val_mse"]
    by_id = {t.user_attrs["tune_trial_id"]: t for t in study.trials}
    assert sorted(by_id) == ["t0", "t1", "t2", "t3"] and len(study.trials) == 4
    assert [by_id[f"t{i}"].state for i in range(4)] == [State.COMPLETE, State.PRUNED, State.FAIL, State.FAIL]
    assert by_id["t0"].intermediate_values == {1: 0.03, 2: 0.02, 3: 0.01} and by_id["t0"].value == 0.01
    assert study.best_trial.user_attrs["tune_trial_id"] == "t0"  # the PRUNED 0.05 never counts as best


def fake_trial(number: int, history: list[dict[str, Any]], tmp: Path, error: str | None = None) -> SimpleNamespace:
    """What the callback reads of a Tune Trial: id, config, last result, storage path, the driver's error file."""
    error_file = None
    if error is not None:
        error_file = tmp / f"error-{number}.txt"
        error_file.write_text(f"Failure # 1 (occurred at now)\nTraceback ...\n{error}\n")
    return SimpleNamespace(
        trial_id=f"t{number}",
        config={"train.lr": 1e-3, "model.filters": 8},
        last_result={**history[-1], "trial_id": f"t{number}"},
        path=f"/r/search/train_trial_ab12c_{number}_x",
        error_file=str(error_file) if error_file else None,
    )


def test_the_callback_records_each_trial_as_it_ends_and_survives_a_driver_restart(tmp_path: Path) -> None:
    root = str(tmp_path / "exp")
    done, stopped = reports([0.03, 0.02, 0.01]), reports([0.05])
    a = StudyRecorder(root, "exp", DIMS, BUDGET)
    a.setup()  # Tune calls it when the search starts: the study exists, empty, before any trial ends
    study_file = Path(root) / STUDY_FILE
    assert optuna.load_study(study_name="exp", storage=f"sqlite:///{study_file}").trials == []
    t0, t1 = fake_trial(0, done, tmp_path), fake_trial(1, stopped, tmp_path)
    a.on_trial_result(0, [], t0, done[0])
    a.on_trial_result(0, [], t1, stopped[0])
    a.on_trial_complete(0, [], t1)  # ASHA stopped it: written at once
    assert optuna.load_study(study_name="exp", storage=f"sqlite:///{study_file}").trials[0].state == State.PRUNED

    # The driver dies. Tune restores the callback from tuner.pkl and its state from the experiment checkpoint.
    state = a.get_state()
    b = pickle.loads(pickle.dumps(a))
    assert b._study is None  # the open database connection is not pickled
    b.set_state(state)
    for r in done[1:]:
        b.on_trial_result(0, [], t0, r)
    b.on_trial_complete(0, [], t0)
    b.on_trial_complete(0, [], t0)  # a repeated end adds nothing
    bad = reports([0.04, 0.03])
    t2 = fake_trial(2, bad, tmp_path, error="RuntimeError: injected")
    for r in bad:
        b.on_trial_result(0, [], t2, r)
    b.on_trial_error(0, [], t2)

    study = optuna.load_study(study_name="exp", storage=f"sqlite:///{study_file}")
    trials = {t.user_attrs["tune_trial_id"]: t for t in study.trials}
    assert len(trials) == 3
    assert trials["t0"].state == State.COMPLETE and trials["t0"].intermediate_values == {1: 0.03, 2: 0.02, 3: 0.01}
    assert trials["t2"].state == State.FAIL and trials["t2"].user_attrs["error"] == "RuntimeError: injected"
    assert trials["t2"].intermediate_values == {1: 0.04, 2: 0.03}
    assert b.results == {}, "recorded trials' results are dropped from the callback's state"


def test_a_study_that_cannot_be_written_never_stops_the_search(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    rec = StudyRecorder(str(blocker / "exp"), "exp", DIMS, BUDGET)  # its folder would be under a file
    history = reports([0.01, 0.01, 0.01])
    t = fake_trial(0, history, tmp_path)
    rec.on_trial_result(0, [], t, history[0])
    rec.on_trial_complete(0, [], t)
    assert "optuna study: trial t0 not recorded yet" in caplog.text
    assert rec.results["t0"], "kept, for the reconciliation at the end of the search"
    record_results(str(blocker / "exp"), "exp", DIMS, [result(0, history, None)], BUDGET)
    assert "not written" in caplog.text


def test_the_console_gets_one_line_per_asha_stopped_trial(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from search.tuners import SearchProgress

    progress = SearchProgress(BUDGET)
    for number, history in enumerate([reports([0.03, 0.02, 0.01]), reports([0.05, 0.04])]):
        progress.on_trial_complete(0, [], fake_trial(number, history, tmp_path))
    lines = capsys.readouterr().out.splitlines()
    # Each trial's end is one line (a full-budget one too), named as search.console.trial_label names it
    # (these stand-in trials have no experiment tag, so no number: 000).
    assert lines == [
        "trial 000-t0 finished: val MSE 1.000e-02 after 3/3 epochs",
        "trial 000-t1 stopped early by ASHA after epoch 2/3: val MSE 4.000e-02 is not among the best at its rung",
    ]


# -- a two-objective search (tune.objectives [val_mse, <cost>]) ------------------------------------------------

MO = ["val_mse", "cpu_ms"]
COSTS = {"params": 1234, "macs": 56789, "cpu_ms": 0.75, "cpu_model": "AMD EPYC", "latency_batch": 1}


def test_a_two_objective_study_has_two_directions_and_stopped_trials_stay_off_its_front(tmp_path: Path) -> None:
    results = [result(i, *KINDS[status]) for i, status in enumerate(KINDS)]
    for r in results:
        r.metrics.update(COSTS)
    cheap = result(4, reports([0.04, 0.03, 0.02]), None)  # full budget, worse, cheaper: on the front too
    cheap.metrics.update({**COSTS, "cpu_ms": 0.25})
    nocost = result(5, reports([0.05, 0.04, 0.03]), None)  # full budget but no cost reported: not a point
    path = record_results(str(tmp_path), "mo", DIMS, [*results, cheap, nocost], BUDGET, objectives=MO)
    study = optuna.load_study(study_name="mo", storage=f"sqlite:///{path}")
    assert len(study.directions) == 2 and study.metric_names == MO
    by_id = {t.user_attrs["tune_trial_id"]: t for t in study.trials}
    assert by_id["t0"].state == State.COMPLETE and by_id["t0"].values == [0.01, 0.75]
    # Stopped early (the lowest val MSE of its epoch, 0.05 at epoch 1): PRUNED without values, never on a front.
    assert by_id["t1"].state == State.PRUNED and by_id["t1"].values is None
    assert by_id["t1"].intermediate_values == {1: 0.05} and by_id["t1"].user_attrs["cpu_ms"] == 0.75
    assert by_id["t2"].state == by_id["t3"].state == State.FAIL
    assert by_id["t4"].values == [0.02, 0.25] and by_id["t0"].user_attrs["cpu_model"] == "AMD EPYC"
    assert by_id["t5"].state == State.FAIL and by_id["t5"].user_attrs["error"] == "no cpu_ms reported"
    assert {t.user_attrs["tune_trial_id"] for t in study.best_trials} == {"t0", "t4"}  # Optuna's Pareto front


def test_the_callback_writes_a_two_objective_study_and_a_single_objective_one_as_before(tmp_path: Path) -> None:
    history = reports([0.03, 0.02, 0.01])
    for objectives, values in ((MO, [0.01, 0.75]), (["val_mse"], [0.01])):
        root = tmp_path / objectives[-1]
        rec = StudyRecorder(str(root), "exp", DIMS, BUDGET, objectives=objectives)
        t = fake_trial(0, history, tmp_path)
        t.last_result.update(COSTS)
        rec.on_trial_result(0, [], t, history[0])
        rec.on_trial_complete(0, [], t)
        study = optuna.load_study(study_name="exp", storage=f"sqlite:///{root / STUDY_FILE}")
        assert study.metric_names == objectives and study.trials[0].values == values
        assert ("cpu_ms" in study.trials[0].user_attrs) == (len(objectives) == 2)  # no costs in today's study


def test_a_shared_storage_study_is_claimed_with_the_searchs_directions(tmp_path: Path) -> None:
    from bss_model.errors import ConfigError
    from search.study import claim_study, open_study

    url = f"sqlite:///{tmp_path / 'team.db'}"  # tune.study_storage: any SQLAlchemy URL, a team's database
    claim_study(url, "mo", str(tmp_path / "mo"), resume=False, objectives=MO)
    study = optuna.load_study(study_name="mo", storage=url)
    assert len(study.directions) == 2 and study.metric_names == MO
    assert len(open_study(url, "mo", MO).directions) == 2  # the recorder then opens it as it is
    claim_study(url, "mo", str(tmp_path / "mo"), resume=True, objectives=MO)  # a --resume goes on with it
    claim_study(url, "one", str(tmp_path / "one"), resume=False)
    with pytest.raises(ConfigError, match=r"has 1 objective\(s\) and tune.objectives \['val_mse', 'cpu_ms'\] 2"):
        claim_study(url, "one", str(tmp_path / "one"), resume=True, objectives=MO)
