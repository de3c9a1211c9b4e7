"""The whole job on a wall-clock budget, for real: a tiny budgeted search that is interrupted and resumed ends
within its budget (both runs together) and reports its phases; a budget too small is refused before Ray starts.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path

import pytest

from search.budget import format_duration, parse_duration
from search.run import main
from tests._searchutil import RUN, SMOKE, cli_error, env_with, running

BUDGET = "100s"
# The smoke config's protocol and validation, small: the evaluation is then seconds, and the budget goes to
# the search and the retrain.
SMALL = ["base.data.val_pairs=500", "base.eval.draws=2", "base.eval.pairs=2000", "retrain.seeds=2",
         "retrain.epochs=3", "base.train.image_every=0"]  # fmt: skip


def budget_args(storage: Path, name: str, *extra: str) -> list[str]:
    sets = [a for s in SMALL for a in ("--set", s)]
    return [RUN, "--config", SMOKE, "--storage-path", str(storage), "--name", name, "--budget", BUDGET, *sets, *extra]


@pytest.mark.slow
def test_budgeted_job_interrupted_and_resumed_ends_on_time(tmp_path: Path, data_dir: Path) -> None:
    env = env_with(data_dir)
    exp = tmp_path / "results" / "b"
    budget_s = parse_duration(BUDGET)
    # Run 1: interrupted (Ctrl-C to the process group, as a terminal sends it) once the first trial has finished.
    t0 = time.monotonic()
    with running(budget_args(tmp_path / "results", "b"), tmp_path, env, "first") as first:
        first.wait_until(lambda: " finished: val MSE" in first.out, 150, "a finished trial")
        os.killpg(first.pid, signal.SIGINT)
        assert first.finish(60) == 130
    wall_1 = time.monotonic() - t0
    assert "--resume" in first.err
    ledger = json.loads((exp / "budget.json").read_text())
    assert len(ledger["runs"]) == 1 and ledger["runs"][0]["wall_s"] > 0.5 * wall_1
    plan = ledger["plan"]
    assert plan["budget_s"] == budget_s and plan["trials"] >= 1 and plan["trial_s"] > 0

    # Run 2: --resume counts what run 1 spent and says what is left; the job then finishes.
    t0 = time.monotonic()
    with running([*budget_args(tmp_path / "results", "b"), "--resume"], tmp_path, env, "second") as second:
        assert second.finish(240) == 0, second.tail()
    wall_2 = time.monotonic() - t0
    out = second.out
    said = next(line for line in out.splitlines() if "spent by earlier runs" in line)
    spent = parse_duration(said.split(": ", 1)[1].split(" spent")[0])
    assert abs(spent - ledger["runs"][0]["wall_s"]) <= 2  # what the ledger had counted when run 1 ended
    left = parse_duration(said.split(", ", 1)[1].split(" left")[0])
    assert left == pytest.approx(budget_s - spent, abs=2)
    # Finish on time: both runs together within the budget + 30 s (the allowance under 10 minutes); the ledger
    # counts the runs' wall times, the test its own clock, and they agree.
    assert wall_1 + wall_2 <= budget_s + 30, (wall_1, wall_2)
    assert out.strip().splitlines()[-1].startswith(f"budget {format_duration(budget_s)}: used ")

    report = json.loads((exp / "report.json").read_text())
    b = report["budget"]
    assert b["budget_s"] == budget_s and b["runs"] == 2
    for phase in ("startup", "search", "retrain", "eval"):
        assert b["phases"][phase]["planned_s"] is not None and b["phases"][phase]["actual_s"] > 0, phase
    assert b["phases"]["search"]["samples"] == sum(t["samples"] or 0 for t in report["trials"])
    assert b["phases"]["retrain"]["samples"] == sum(report["samples_per_seed"])
    assert b["phases"]["eval"]["pairs"] == 2 * 2 * 2000  # 2 seeds x 2 draws x 2,000 pairs
    assert "## Budget" in (exp / "report.md").read_text()
    # The trials were time-boxed at the plan's trial time, all of them; the winner ran its full budget.
    summary = json.loads((exp / "search_summary.json").read_text())
    statuses = {t["status"] for t in summary["trials"]}
    assert statuses <= {"completed", "stopped", "cut"}
    best = next(t for t in summary["trials"] if t["trial_id"] == summary["best_trial"])
    assert best["status"] == "completed"
    trial_config = json.loads((Path(best["path"]) / "params.json").read_text())
    assert trial_config  # Tune's record of the sampled params; the time box is in the trial's own config:
    resolved = (Path(best["path"]) / "config.yaml").read_text()
    assert f"time_limit_s: {round(plan['trial_s'], 3)}" in resolved and "samples_per_epoch: 0" in resolved
    # The retrain's seeds were time-limited to the plan's seed time, and trained it (their clock ran out).
    for seed_dir in sorted((exp / "retrain").glob("seed-*")):
        metrics = json.loads((seed_dir / "metrics.json").read_text())
        assert metrics["time_limit_s"] == pytest.approx(ledger_after(exp)["retrain_params"]["train.time_limit_s"])
        assert metrics["time_used_s"] == pytest.approx(metrics["time_limit_s"], abs=8)
    assert math.isfinite(report["test_mse_mean"]) and report["test_mse_ensemble"] <= report["test_mse_mean"] * 1.0001


def ledger_after(exp: Path) -> dict:
    return json.loads((exp / "budget.json").read_text())


def test_too_small_a_budget_is_refused_before_ray_starts(
    tmp_path: Path, data_dir: Path, no_ray: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BSS_DATA_DIR", str(data_dir))
    err = cli_error(main, ["--config", SMOKE, "--budget", "20s", "--name", "tiny-budget"], capsys)
    assert err.startswith("error: budget 20s is too small for this job") and "use --budget " in err
    needed = parse_duration(err.split("use --budget ")[1].split()[0])
    assert needed > 20
    assert not (tmp_path / "results" / "tiny-budget").exists()  # nothing written


@pytest.mark.parametrize(("flag", "words"), [("600", "has no unit"), ("ten minutes", "is not a duration")])
def test_bad_budget_flag_is_one_line(flag: str, words: str, capsys: pytest.CaptureFixture[str], no_ray: None) -> None:
    err = cli_error(main, ["--config", SMOKE, "--budget", flag], capsys)
    assert err == f"error: --budget={flag!r} {words}: write e.g. 90s, 10m, 2.5m or 1h30m" + (
        " (s, m or h)" if words == "has no unit" else ""
    )


def test_budget_in_the_config(tmp_path: Path, no_ray: None, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(Path(SMOKE).read_text() + "\nbudget: 600\n")
    assert "budget=600 has no unit" in cli_error(main, ["--config", str(cfg)], capsys)
