"""Choosing the winner on synthetic Tune results: diverged, ASHA-stopped, NaN, errored, tied and all-failed trials.

The rows are real ``ray.tune.Result`` objects with the metrics a trial reports, so the field names
the selection reads are Tune's, not a stand-in's.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from ray import tune
from ray.tune import Result

from bss_model.config import Config
from bss_model.errors import BssError
from search import storage
from search.results import SearchSummary, SeedResult
from search.selection import (
    pick_best,
    pick_best_seed,
    retrain_summary,
    search_summary,
    summarize_retrain,
    summarize_trials,
)

BUDGET = 3


def trial(number: int, lr: float, epoch: int, val: float, error: Exception | None = None, **extra: Any) -> Result:
    metrics = {"trial_id": f"t{number}", "epoch": epoch, "samples": epoch * 640, "val_mse": val,
               "config": {"train.lr": lr}, "hostname": "box", "node_id": "abcdef0123456789", **extra}  # fmt: skip
    return Result(metrics=metrics, checkpoint=None, error=error, path=f"/r/search/train_trial_ab12c_{number}_lr={lr}")


def mixed() -> list[Result]:
    return [
        trial(0, 1e-3, BUDGET, 0.020),  # completed
        trial(1, 2e-3, 1, 0.001),  # stopped by ASHA after 1 epoch: best value, but not a full budget
        trial(2, 1e3, 1, math.nan, diverged=True, reason="non-finite loss at step 7"),
        trial(3, 3e-3, BUDGET, 0.005, error=RuntimeError("boom\nCUDA out of memory")),  # errored at the end
        trial(4, 4e-3, BUDGET, math.nan),  # full budget, but no finite validation MSE
        trial(5, 5e-3, BUDGET, 0.010),  # completed: the winner
    ]


def test_statuses_and_fields_of_each_kind_of_trial() -> None:
    rows = {r.trial_id: r for r in summarize_trials(mixed(), BUDGET)}
    assert {k: r.status for k, r in rows.items()} == {
        "t0": "completed", "t1": "stopped", "t2": "diverged", "t3": "errored", "t4": "stopped", "t5": "completed",
    }  # fmt: skip
    assert rows["t2"].error == "non-finite loss at step 7" and math.isnan(rows["t2"].val_mse)
    assert rows["t3"].error == "CUDA out of memory"  # the last line of the error
    assert rows["t5"].number == 5 and rows["t5"].params == {"train.lr": 5e-3} and rows["t5"].epochs == BUDGET
    assert rows["t5"].node == "box:abcdef01"


def test_only_a_full_budget_trial_can_win() -> None:
    best = pick_best(summarize_trials(mixed(), BUDGET))
    assert best.trial_id == "t5"  # not t1 (stopped, lower), t3 (errored, lower) or t4 (NaN)


def test_ties_go_to_the_earlier_trial_whatever_the_order() -> None:
    rows = summarize_trials([trial(7, 1e-3, BUDGET, 0.01), trial(2, 2e-3, BUDGET, 0.01)], BUDGET)
    assert pick_best(rows).trial_id == "t2"
    assert pick_best(rows[::-1]).trial_id == "t2"


def test_all_trials_failed_is_one_clear_line() -> None:
    rows = summarize_trials([r for i, r in enumerate(mixed()) if i not in (0, 5)], BUDGET)
    with pytest.raises(BssError) as err:
        pick_best(rows)
    message = str(err.value)
    assert "no trial ran its full budget" in message and "tune.num_samples" in message and "\n" not in message


def test_search_summary_sorts_counts_and_builds_the_best_config() -> None:
    summary = search_summary(Config(), summarize_trials(mixed(), BUDGET), wall_s=12.5)
    assert summary.best_trial == "t5" and summary.best_params == {"train.lr": 5e-3}
    assert summary.best_config["train"]["lr"] == 5e-3 and summary.best_val_mse == 0.010
    assert [t.trial_id for t in summary.trials] == ["t5", "t0", "t1", "t3", "t2", "t4"]  # full budget first, NaN last
    d = summary.to_dict()
    # search_summary.json's format: these keys, in this order.
    assert list(d) == [
        "best_trial", "best_params", "best_val_mse", "best_config", "num_trials", "num_completed",
        "num_stopped_early", "num_errored", "num_diverged", "num_cut", "search_wall_s", "trials",
    ]  # fmt: skip
    assert (d["num_trials"], d["num_completed"], d["num_stopped_early"], d["num_errored"], d["num_diverged"]) == (
        6, 2, 2, 2, 1,
    )  # fmt: skip
    assert list(d["trials"][0]) == ["trial_id", "number", "params", "epochs", "val_mse", "status", "error", "node",
                                    "path", "samples", "samples_per_s", "epoch_tail_s"]  # fmt: skip
    # The samples each trial saw, as it reported them: equal at equal epochs in a compute-fair search.
    assert {t["trial_id"]: t["samples"] for t in d["trials"]} == {
        "t5": 1920, "t0": 1920, "t1": 640, "t3": 1920, "t2": 640, "t4": 1920,
    }  # fmt: skip


def test_summary_file_round_trip_keeps_types_and_bytes(tmp_path: Path) -> None:
    summary = search_summary(Config(), summarize_trials(mixed(), BUDGET), wall_s=12.5)
    storage.save_summary(str(tmp_path), summary)
    first = (tmp_path / storage.SUMMARY_FILE).read_text()
    back = storage.load_summary(str(tmp_path))
    assert isinstance(back, SearchSummary) and back.trials[0].trial_id == "t5"
    assert math.isnan(back.trials[-1].val_mse)  # NaN survives JSON
    storage.save_summary(str(tmp_path), back)
    assert (tmp_path / storage.SUMMARY_FILE).read_text() == first
    assert json.loads(first)["num_errored"] == 2
    assert storage.load_summary(str(tmp_path / "none")) is None


def seed_result(
    seed: int, val: float | None, test: float | None, error: Exception | None = None, epoch: int = 2, tmp: Path = None
) -> Result:
    metrics = {"val_mse": val, "config": {"train.seed": seed}, "epoch": epoch, "budget_epochs": 2, "samples": 3840,
               "protocol_draws": 2}  # fmt: skip
    if test is not None:
        metrics |= {"test_mse_mean": test, "baseline_mix_mse_mean": 0.05}
    checkpoint = tune.Checkpoint.from_directory(str(tmp)) if tmp is not None else None
    return Result(metrics=metrics, checkpoint=checkpoint, error=error, path=f"/r/retrain/train_trial_cd34e_{seed}")


def test_best_seed_is_chosen_by_validation_never_by_test(tmp_path: Path) -> None:
    seeds = summarize_retrain(
        [seed_result(1001, 0.010, 0.001, tmp=tmp_path), seed_result(1000, 0.008, 0.009, tmp=tmp_path),
         seed_result(1002, 0.001, None, OSError(), tmp=tmp_path),
         seed_result(1003, 0.0005, None, epoch=1, tmp=tmp_path)]  # cut short: its last epoch is not its budget
    )  # fmt: skip
    assert [s.seed for s in seeds] == [1000, 1001, 1002, 1003] and [s.samples for s in seeds] == [3840] * 4
    assert [s.finished for s in seeds] == [True, True, False, False]
    assert seeds[0].metrics == {"test_mse_mean": 0.009, "baseline_mix_mse_mean": 0.05, "protocol_draws": 2}
    summary = retrain_summary(seeds)
    # Lowest val among the seeds that finished: 1001 has the lower *test* MSE, 1002 errored, 1003 did not finish.
    assert summary.best.seed == 1000
    assert [s.seed for s in summary.evaluated] == [1000, 1001]
    assert seeds[2].error == "OSError"  # an error without text is still named


def test_no_finished_seed_is_one_clear_line() -> None:
    seeds = [SeedResult(1000, None, None, {}, None, "RuntimeError: boom", "/r/x")]
    with pytest.raises(BssError) as err:
        pick_best_seed(seeds)
    assert "no retrain seed finished" in str(err.value) and "seed 1000: RuntimeError: boom" in str(err.value)
