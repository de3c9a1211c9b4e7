"""The budget's arithmetic (search/budget.py) as pure functions on tiny numbers, and the deadline rules of the
trainable (search/trainable.py) and the winner rule (search/selection.py) with trials cut by a deadline."""

from __future__ import annotations

import math

import pytest

from bss_model.errors import ConfigError
from search import budget
from search.budget import JobShape, Speeds, asha_trial_units, format_duration, parse_duration, plan_job, rungs
from search.results import COMPLETED, CUT, STOPPED
from search.selection import pick_best, trial_row, trial_status
from search.trainable import cannot_finish


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("10m", 600), ("2.5m", 150), ("1h", 3600), ("1h30m", 5400), ("2m30s", 150), (" 10M ", 600)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("value", "words"),
    [("600", "has no unit"), (600, "has no unit"), ("10 minutes", "not a duration"), ("m", "not a duration"),
     ("0s", "out of range"), ("31d", "not a duration"), ("800h", "out of range"), ("", "not a duration"),
     (True, "not a duration"), ("1h1h", None)],
)  # fmt: skip
def test_parse_duration_refuses(value: object, words: str | None) -> None:
    if words is None:  # units may repeat in order only as written: 1h1h is 2h, which is still a duration
        assert parse_duration(value) == 7200
        return
    with pytest.raises(ConfigError, match=words):
        parse_duration(value, "--budget")


def test_format_duration_round_trips() -> None:
    for seconds in (1, 59, 60, 61, 150, 600, 3599, 3600, 3725, 86400):
        assert parse_duration(format_duration(seconds)) == seconds
    assert format_duration(0.2) == "1s"  # rounded up: a minimum is never understated


def test_rungs_match_rays_asha() -> None:
    from ray.tune.schedulers.async_hyperband import _Bracket

    for max_t, grace, rf in [(8, 2, 2), (16, 1, 2), (10, 3, 2), (36, 4, 3), (4, 4, 2)]:
        ray_rungs = sorted(int(m) for m, _ in _Bracket(grace, max_t, rf, 0)._rungs)
        assert [r for r in rungs(max_t, grace, rf) if r < max_t] == [r for r in ray_rungs if r < max_t]


def test_asha_units_by_hand() -> None:
    # 8 trials, rungs 2, 4, 8 of 8 epochs, rf 2: 8 x 1/4 + 4 x 1/4 + 2 x 1/2 = 4 full trials.
    assert asha_trial_units(8, 8, 2, 2) == pytest.approx(4.0)
    # 3 trials: 3 x 1/4 + ceil(1.5)=2 x 1/4 + 1 x 1/2 = 1.75; one trial runs whole; no early stopping: all whole.
    assert asha_trial_units(3, 8, 2, 2) == pytest.approx(1.75)
    assert asha_trial_units(1, 8, 2, 2) == pytest.approx(1.0)
    assert asha_trial_units(5, 8, 8, 2) == pytest.approx(5.0)
    assert asha_trial_units(0, 8, 2, 2) == 0


SPEEDS = Speeds(
    train_samples_per_s=1000.0, epoch_tail_s=1.0, trial_setup_s=2.0, infer_images_per_s=4000.0, ray_start_s=4.0,
    batch_size=64,
)  # fmt: skip
SHAPE = JobShape(
    trial_epochs=8, max_trials=8, concurrency=2, grace_period=2, reduction_factor=2, seeds=2, retrain_concurrency=2,
    retrain_epochs=10, protocol_pairs=200_000, search_share=0.35, min_trial_share=0.25,
)  # fmt: skip


def test_plan_adds_up_to_the_budget() -> None:
    plan = plan_job(600, 0, 6, SPEEDS, SHAPE)
    # Evaluation: its start, then 2 seeds x 200,000 pairs at 4,000 images/s = 100 s; margin 2% = 12 s;
    # report 8 s; startup 6 + 4.
    assert plan.eval_s == pytest.approx(budget.EVAL_START_S + 100)
    assert plan.margin_s == pytest.approx(12)
    assert plan.startup_s == pytest.approx(10)
    left = 600 - 10 - plan.eval_s - budget.REPORT_RESERVE_S - 12
    assert plan.search_s == pytest.approx(0.35 * left) and plan.retrain_s == pytest.approx(0.65 * left)
    assert plan.end_s + plan.margin_s == pytest.approx(600)
    # Two seeds at once: one wave, each seed the retrain's time less its setup.
    assert plan.retrain_waves == 1 and plan.retrain_seed_s == pytest.approx(plan.retrain_s - 2)
    # 8 trials fit: 4 full trials' work plus 8 starts on 2 workers within the search's time.
    assert plan.trials == 8
    assert 8 * 2 + 4 * plan.trial_s == pytest.approx(2 * plan.search_s)


def test_plan_runs_fewer_longer_trials_when_short() -> None:
    plan = plan_job(240, 0, 6, SPEEDS, SHAPE)
    assert plan.trials < SHAPE.max_trials
    assert plan.trial_s >= SHAPE.min_trial_share * plan.retrain_seed_s
    assert any("trials" in note for note in plan.notes)
    # and one more trial would break the floor
    more = budget.trial_time(plan.search_s, plan.trials + 1, SHAPE, SPEEDS.trial_setup_s)
    assert more < SHAPE.min_trial_share * plan.retrain_seed_s


def test_a_small_search_share_runs_one_wave_not_none() -> None:
    # search_share 0.2 with min_trial_share 0.25: a trial could never keep a quarter of a seed's time (0.2 of the
    # training time against 0.25 x 0.8 of it), which refused a 10-minute budget as "too small, use 2m47s".
    shape = JobShape(**{**SHAPE.__dict__, "search_share": 0.2})
    plan = plan_job(600, 0, 6, SPEEDS, shape)
    assert plan.trials == SHAPE.concurrency
    assert plan.trial_s == pytest.approx(plan.search_s - SPEEDS.trial_setup_s)
    assert plan.retrain_s == pytest.approx(4 * plan.search_s)


def test_spent_time_counts() -> None:
    fresh, resumed = plan_job(600, 0, 6, SPEEDS, SHAPE), plan_job(600, 120, 6, SPEEDS, SHAPE)
    assert fresh.search_s + fresh.retrain_s - (resumed.search_s + resumed.retrain_s) == pytest.approx(120)


def test_too_small_is_refused_with_the_smallest_that_works() -> None:
    need = budget.minimum_budget(0, 6, SPEEDS, SHAPE)
    with pytest.raises(ConfigError, match=f"use --budget {format_duration(need)} or more") as exc:
        plan_job(60, 0, 6, SPEEDS, SHAPE)
    assert "one search trial and one retrain epoch" in str(exc.value) and "\n" not in str(exc.value)
    plan = plan_job(need, 0, 6, SPEEDS, SHAPE)  # the minimum it names works, one second less does not
    assert plan.trials >= 1
    with pytest.raises(ConfigError):
        plan_job(need - 2, 0, 6, SPEEDS, SHAPE)


def test_replan_gives_the_retrain_what_the_search_left() -> None:
    plan = plan_job(600, 0, 6, SPEEDS, SHAPE)
    early = budget.replan_after_search(plan, 200, SPEEDS, SHAPE)
    late = budget.replan_after_search(plan, 260, SPEEDS, SHAPE)
    assert early.retrain_s - late.retrain_s == pytest.approx(60)
    assert early.retrain_s == pytest.approx(600 - 200 - plan.eval_s - plan.report_s - plan.margin_s)
    faster = budget.replan_after_search(plan, 200, Speeds(**{**SPEEDS.__dict__, "infer_images_per_s": 8000}), SHAPE)
    assert faster.eval_s == pytest.approx(budget.EVAL_START_S + 50)
    assert faster.retrain_s == pytest.approx(early.retrain_s + 50)


def test_retrain_samples() -> None:
    # 100 s per seed, 10 epochs with 1 s of validation each: 90 s x 1,000 samples/s x 0.92 = 82,800 -> per epoch
    # 8,280, in whole batches of 64: 8,256.
    assert budget.retrain_samples(100, 10, 1000, 1.0, 64) == 8256
    assert budget.retrain_samples(1, 10, 1000, 1.0, 64) == 64  # at least one batch


def test_a_restored_trial_goes_on_only_if_it_can_finish() -> None:
    # A time-boxed trial of 60 s that has used 20 s ends at now + 40.
    assert not cannot_finish(1000.0, 1040.0, 60.0, 20.0)
    assert not cannot_finish(1000.0, 1036.0, 60.0, 20.0)  # within the slack for its last validation
    assert cannot_finish(1000.0, 1030.0, 60.0, 20.0)
    assert not cannot_finish(1000.0, None, 60.0, 20.0) and not cannot_finish(1000.0, 1.0, 0.0, 20.0)


def test_a_cut_trial_is_never_the_winner() -> None:
    """A trial cut by the deadline with the best val MSE of all is neither completed nor ASHA-stopped, and the
    winner is the best full-budget trial."""
    full = {"epoch": 8, "val_mse": 0.02, "trial_id": "a"}
    cut = {"epoch": 3, "val_mse": 0.001, "cut": True, "trial_id": "b"}
    never = {"epoch": 0, "val_mse": math.nan, "cut": True, "trial_id": "c"}
    stopped = {"epoch": 2, "val_mse": 0.03, "trial_id": "d"}
    assert [trial_status(m, None, 8) for m in (full, cut, never, stopped)] == [COMPLETED, CUT, CUT, STOPPED]
    rows = [
        trial_row(m, None, {}, f"/x/00{i}-{m['trial_id']}0000", 8) for i, m in enumerate((cut, never, full, stopped))
    ]
    assert pick_best(rows).trial_id == "a"
    with pytest.raises(Exception, match="no trial ran its full budget"):
        pick_best([rows[0], rows[1]])


def test_the_searcher_starts_the_first_wave_then_stops_at_the_ledgers_start_by(tmp_path) -> None:
    """No trial is started once it could not finish by the deadline, except the first wave (one per worker),
    without which there would be no winner; the deadline comes from the ledger of the run at hand, also for a
    searcher unpickled from an earlier run's experiment."""
    import json
    import time

    from ray import cloudpickle
    from ray.tune.search import Searcher

    from search.deadline import LEDGER_FILE, DeadlineSearcher

    class Counting(Searcher):
        def __init__(self) -> None:
            super().__init__(metric="val_mse", mode="min")
            self.n = 0

        def suggest(self, trial_id: str) -> dict:
            self.n += 1
            return {"x": self.n}

    def ledger(start_by: float) -> None:
        (tmp_path / LEDGER_FILE).write_text(json.dumps({"deadlines": {"search_start_by": start_by}}))

    ledger(time.time() - 1)  # already past
    searcher = DeadlineSearcher(Counting(), str(tmp_path), first_wave=2)
    assert searcher.suggest("a") == {"x": 1} and searcher.suggest("b") == {"x": 2}
    assert searcher.suggest("c") == Searcher.FINISHED
    restored = cloudpickle.loads(cloudpickle.dumps(searcher))  # as Tune restores it from the experiment on --resume
    restored.set_state(searcher.get_state())
    ledger(time.time() + 60)  # the resumed run's own deadline
    assert restored.suggest("d") == {"x": 3}


def test_a_run_stopped_inside_a_phase_leaves_its_time_counted_for_the_resume(tmp_path, monkeypatch) -> None:
    """A Ctrl-C (or a kill) inside the search left the ledger's search at 0 s (the phase's time was added only
    at its end): the job's last line said "search 3s" after 10 s of it, and the --resume gave the search its
    whole planned time again. Each save now counts the phase going on."""
    import json

    from search import deadline
    from search.deadline import LEDGER_FILE, Ledger

    clock = [1000.0]
    monkeypatch.setattr(deadline.time, "time", lambda: clock[0])
    first = Ledger.open(str(tmp_path), 100.0, started=1000.0, resume=False)
    first.begin("search", 40.0)
    clock[0] += 15
    first.save()  # the ticking save (or the last save) of a run that then stops inside the search
    saved = json.loads((tmp_path / LEDGER_FILE).read_text())
    assert saved["phases"]["search"] == {"planned_s": 40.0, "actual_s": 15.0}
    assert saved["runs"] == [{"started": 1000.0, "wall_s": 15.0}]

    clock[0] += 30  # the user resumes later: time between runs is not the budget's
    second = Ledger.open(str(tmp_path), 100.0, started=clock[0], resume=True)
    assert second.spent_before() == 15.0 and second.data["phases"]["search"]["actual_s"] == 15.0
    second.begin("search")
    clock[0] += 20
    second.end("search", trials=4)
    assert second.data["phases"]["search"] == {"planned_s": 40.0, "actual_s": 35.0, "trials": 4}
    clock[0] += 5
    second.save()  # no phase going on: nothing more is counted to the search
    assert json.loads((tmp_path / LEDGER_FILE).read_text())["phases"]["search"]["actual_s"] == 35.0
    assert second.now() == 15.0 + 25.0
