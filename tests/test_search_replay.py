"""The search replay (benchmarks/search_replay.py) and the learning-curve table build (benchmarks/learning_curves.py).

The replay's claim is that it runs the real job's rules in simulated time: these tests hold it to
that -- Ray's own scheduler decides the same on the same results, the winner is selection.pick_best's,
a seed gives one replay -- and check that a killed table build resumes without retraining.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
from _replaytable import REPO, bench, synthetic_table

sr = bench("search_replay")

SMALL = sr.Settings(num_samples=16, workers=4, n_startup_trials=5, grace_period=1, reduction_factor=3)


@pytest.fixture(scope="module")
def table():
    return sr.Table.from_dict(synthetic_table(40, 9))


def test_replay_is_deterministic_for_a_seed(table):
    method = next(m for m in sr.METHODS if m.name == "tpe+asha")
    a, b = sr.replay(method, table, SMALL, seed=3), sr.replay(method, table, SMALL, seed=3)
    assert (a.wall, a.winner_val, a.decisions, a.winner) == (b.wall, b.winner_val, b.decisions, b.winner)
    c = sr.replay(method, table, SMALL, seed=4)
    assert c.decisions != a.decisions  # the seed matters: another seed samples other trials


def test_asha_decisions_match_rays_scheduler_on_the_same_stream(table):
    """Every result the replay judged, fed in the same order to an AsyncHyperBandScheduler built as a
    Tuner builds it (TuneConfig's metric and mode), gets the same decision."""
    from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

    replay = sr.replay(next(m for m in sr.METHODS if m.name == "random+asha"), table, SMALL, seed=0)
    stops = [d for d in replay.decisions if d[3] == TrialScheduler.STOP and d[1] < table.epochs]
    assert stops, "the stream must contain early stops, or the comparison proves nothing"
    ray_sched = AsyncHyperBandScheduler(
        time_attr="training_iteration",
        metric="val_mse",
        mode="min",
        max_t=table.epochs,
        grace_period=SMALL.grace_period,
        reduction_factor=SMALL.reduction_factor,
    )

    class T:
        def __init__(self, tid):
            self.trial_id = tid

    added, finished = set(), set()
    for tid, epoch, val, decision in replay.decisions:
        if tid not in added:
            ray_sched.on_trial_add(None, T(tid))
            added.add(tid)
        result = {"training_iteration": epoch, "val_mse": val}
        assert ray_sched.on_trial_result(None, T(tid), result) == decision, (tid, epoch, val)
        if decision == TrialScheduler.STOP and tid not in finished:
            ray_sched.on_trial_complete(None, T(tid), result)
            finished.add(tid)


def test_the_winner_is_the_best_full_budget_trial_never_a_diverged_one():
    """Config 1 (a starting point) has the lowest val MSE of all at every epoch it reports, then
    diverges in its last epoch: the project's rule never selects it."""
    data = synthetic_table(30, 6, diverged=0)
    runs = {r["config"]: r for r in data["runs"]}
    runs[1]["val_mse"] = [1e-6] * 5
    runs[1]["status"] = "diverged"
    table = sr.Table.from_dict(data)
    method = sr.Method("points", sampler="random", asha=False, points=True)
    points = [c["params"] for c in data["configs"][:3]]
    r = sr.replay(method, table, sr.Settings(num_samples=12, workers=3), seed=0, points=points)
    finals = {table.nearest(c["params"]) for c in data["configs"][:3]}
    assert 1 in finals  # the diverging config was tried
    assert r.winner != 1 and r.winner >= 0
    assert r.winner_val[-1] == table.final(r.winner)
    assert not math.isfinite(table.final(1))


def test_stopped_as_pruned_tells_optuna_pruned_with_the_stopping_value():
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    from search.space import param_space, parse_space
    from search.tuners import make_sampler, make_searcher

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = param_space(parse_space({"train.lr": {"loguniform": [1e-4, 1e-2]}}))
    for pruned, expected in ((True, optuna.trial.TrialState.PRUNED), (False, optuna.trial.TrialState.COMPLETE)):
        s = make_searcher(make_sampler(0, 2), [], stopped_as_pruned=pruned)
        assert isinstance(s, OptunaSearch)
        s.set_search_properties("val_mse", "min", space)
        s.suggest("a")
        s.on_trial_result("a", {"val_mse": 0.5, "training_iteration": 1})
        s.on_trial_complete("a", result={"val_mse": 0.3, "training_iteration": 2, "epoch": 2, "budget_epochs": 9})
        s.suggest("b")
        s.on_trial_complete("b", result={"val_mse": 0.2, "training_iteration": 9, "epoch": 9, "budget_epochs": 9})
        a, b = s._ot_study.trials
        assert a.state == expected and b.state == optuna.trial.TrialState.COMPLETE
        assert a.value == 0.3 and b.value == 0.2


def test_a_synthetic_table_runs_end_to_end_through_every_method(tmp_path):
    path = tmp_path / "table.json"
    path.write_text(json.dumps(synthetic_table(40, 9)))
    out, png = tmp_path / "replay.json", tmp_path / "replay.png"
    argv = ["--table", str(path), "--json", str(out), "--plot", str(png), "--seeds", "2", "--processes", "1"]
    argv += ["--num-samples", "12", "--workers", "3", "--n-startup-trials", "4", "--grace-period", "1"]
    argv += ["--sweep", "tpe+asha", "--sweep-seeds", "1"]
    assert sr.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["table"] == {"file": str(path), "configs": 40, "epochs": 9}
    assert set(result["methods"]) == {m.name for m in sr.METHODS}
    for name, m in result["methods"].items():
        assert m["seeds"] == 2
        assert 0 <= m["final_regret_median"] < math.inf, name
        curve = m["anytime"]["trial_epochs"]
        assert len(curve["x"]) == len(curve["median"]) == len(curve["q25"]) == len(curve["q75"])
        finite = [v for v in curve["median"] if math.isfinite(v)]
        assert finite == sorted(finite, reverse=True)  # the selected winner only ever gets better
    assert result["methods"]["random-2x"]["trials_median"] == 24
    assert math.isfinite(result["compute_ratio_tpe_asha_vs_random"]) or result["compute_ratio_tpe_asha_vs_random"] > 0
    assert set(result["rank_correlation_vs_final"]) == {str(e) for e in range(1, 10)}
    assert result["rank_correlation_vs_final"]["9"] == pytest.approx(1.0)
    assert png.stat().st_size > 10_000
    rows = result["sweep"]["rows"]
    varied = {r["vary"] for r in rows}
    assert varied == {"grace_period", "reduction_factor", "n_startup_trials", "workers", "num_samples"}
    assert len({json.dumps(r["settings"], sort_keys=True) for r in rows}) == len(rows)  # each setting once
    assert {r["settings"]["grace_period"] for r in rows if r["vary"] == "grace_period"} == {1, 2, 4}


@pytest.mark.slow
def test_a_killed_table_build_resumes_without_retraining(tmp_path, data_dir):
    out = tmp_path / "table.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "learning_curves.py"), "--out", str(out), "--configs", "3"]
    cmd += ["--noise-configs", "1", "--epochs", "1", "--samples-per-epoch", "256", "--workers", "1", "--nice", "0"]
    env = {**os.environ, "BSS_DATA_DIR": str(data_dir), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:  # kill it as soon as two runs are on disk
            if out.exists() and len(json.loads(out.read_text()).get("runs", [])) >= 2:
                break
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = json.loads(out.read_text())
    assert 2 <= len(before["runs"]) < 5, "killed after two of five runs (config 0 has 3 seeds)"
    assert all("samples_per_s" in c for c in before["configs"])
    done = {(r["config"], r["seed"]): r for r in before["runs"]}
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "throughput:" not in again.stdout  # nothing measured twice
    assert f"training: {5 - len(done)} runs to go ({len(done)} done)" in again.stdout
    after = json.loads(out.read_text())
    assert len(after["runs"]) == 5
    for key, run in done.items():  # the finished runs are kept as they were, not retrained
        assert next(r for r in after["runs"] if (r["config"], r["seed"]) == key) == run
    assert after["summary"]["noise_configs_measured"] == 1


def test_the_jobs_tpe_options_are_pinned():
    """search/tuners.py pins what the replay chose, whatever Optuna's defaults become."""
    from search.tuners import make_sampler

    sampler = make_sampler(0, 5)
    assert sampler._multivariate is False and sampler._constant_liar is True
    assert sampler._n_startup_trials == 5


# -- two objectives (--objective): the front of full-budget trials and its hypervolume --------------------------


def test_multiobjective_replay_tracks_the_hypervolume_of_full_budget_trials(table):
    """MO-TPE + ASHA told COMPLETE (Ray's default): the stopped trials' low-fidelity values reach the sampler,
    but never the front the replay scores."""
    method = next(m for m in sr.MO_METHODS if m.name == "mo-tpe+asha")
    r = sr.replay(method, table, SMALL, seed=1, cost="params")
    stopped = [d for d in r.decisions if d[3] == "STOP" and d[1] < table.epochs]
    assert stopped, "ASHA stopped trials early, or the test proves nothing"
    assert len(r.hv_regret) == len(r.wall) == r.trials + 1 and r.hv_regret[0] == 1.0
    assert all(0 <= b <= a <= 1 for a, b in zip(r.hv_regret, r.hv_regret[1:], strict=False))  # never worse
    assert r.front and all(math.isfinite(table.final(i)) for i in r.front)
    assert r.hv_regret[-1] == pytest.approx(table.hv_regret(r.front, "params"))
    # The table's own front scores 0; a single full-budget config scores worse.
    assert table.hv_regret(table.true_front("params"), "params") == 0
    assert table.hv_regret(r.front[:1], "params") >= r.hv_regret[-1]


def test_nondominated_rung_rule_keeps_a_cheap_trial_that_asha_on_mse_stops():
    from ray.tune.schedulers import TrialScheduler

    from search.moasha import NonDominatedASHA
    from search.tuners import make_scheduler

    class T:
        def __init__(self, tid):
            self.trial_id = tid

    def at_rung(sched, tid, val, cost):
        sched.on_trial_add(None, T(tid))
        return sched.on_trial_result(None, T(tid), {"training_iteration": 1, "val_mse": val, "params": cost})

    mo, asha = (
        NonDominatedASHA("val_mse", "params", max_t=9, grace_period=1, reduction_factor=2),
        make_scheduler(9, 1, 2, metric="val_mse", mode="min"),
    )
    for sched in (mo, asha):
        assert at_rung(sched, "a", 0.10, 100) == TrialScheduler.CONTINUE  # the first at the rung goes on
    # b: worse MSE than a but ten times cheaper -- non-dominated, so the rule lets it go on; ASHA stops it.
    assert at_rung(mo, "b", 0.20, 10) == TrialScheduler.CONTINUE
    assert at_rung(asha, "b", 0.20, 10) == TrialScheduler.STOP
    # c: dominated by b (worse and dearer) -- stopped by both.
    assert at_rung(mo, "c", 0.30, 50) == TrialScheduler.STOP
    assert at_rung(asha, "c", 0.30, 50) == TrialScheduler.STOP
    # A trial at its budget stops, as Ray's ASHA stops it.
    mo.on_trial_add(None, T("d"))
    assert mo.on_trial_result(None, T("d"), {"training_iteration": 9, "val_mse": 0.0, "params": 1}) == "STOP"


def test_multiobjective_comparison_end_to_end(tmp_path):
    path = tmp_path / "table.json"
    path.write_text(json.dumps(synthetic_table(40, 9)))
    out, png = tmp_path / "mo.json", tmp_path / "mo.png"
    methods = ["mo-random", "mo-tpe+asha", "mo-tpe+asha-pruned", "nsga2+asha-pruned", "mo-tpe+moasha-pruned"]
    argv = ["--table", str(path), "--objective", "params", "--json", str(out), "--plot", str(png), "--seeds", "2"]
    argv += ["--processes", "1", "--num-samples", "12", "--workers", "3", "--n-startup-trials", "4"]
    argv += ["--grace-period", "1", "--methods", *methods]
    assert sr.main(argv) == 0
    result = json.loads(out.read_text())
    assert set(result["methods"]) == set(methods) and result["objective"] == "params"
    assert result["hypervolume"]["true_front_hypervolume"] > 0 and result["hypervolume"]["true_front"]
    for name, m in result["methods"].items():
        assert m["seeds"] == 2 and len(m["final_hv_regret_per_seed"]) == 2
        assert 0 <= m["final_hv_regret_median"] <= 1, name
        curve = m["hv_anytime"]["wall"]["median"]
        assert curve == sorted(curve, reverse=True) and curve[0] == 1.0  # only ever better, from nothing
    assert result["methods"]["mo-random"]["trials_median"] == 12
    assert png.stat().st_size > 10_000
