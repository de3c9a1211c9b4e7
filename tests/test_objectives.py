"""Accuracy against cost without Ray: tune.objectives and retrain.pick validation, the front of full-budget trials,
the picks, the hypervolume history, and the summary's file format (search/objectives.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from _searchutil import cli_error

from bss_model.errors import BssError, ConfigError
from search import objectives
from search.config import load_search_config
from search.objectives import Pick, check_pick, choose, parse_pick, summarize_pareto
from search.results import COMPLETED, STOPPED, ParetoSummary, SearchSummary, TrialRow

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "configs" / "smoke.yaml"
MO = ["tune.objectives=[val_mse, params]"]


# -- tune.objectives ---------------------------------------------------------------------------------


def test_the_default_is_val_mse_alone_and_one_cost_is_accepted():
    assert load_search_config(SMOKE).tune.objectives == ["val_mse"]
    for cost in ("params", "macs", "cpu_ms"):
        assert load_search_config(SMOKE, [f"tune.objectives=[val_mse, {cost}]"]).tune.objectives == ["val_mse", cost]
    gpu = load_search_config(SMOKE, ["tune.objectives=[val_mse, gpu_ms]", "tune.gpus_per_trial=0.5"])
    assert gpu.tune.objectives == ["val_mse", "gpu_ms"]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("[val_mse, parms]", "unknown objective 'parms': did you mean 'params'?"),
        ("[val_mse, accuracy]", "unknown objective 'accuracy': use val_mse and one of params, macs, cpu_ms, gpu_ms"),
        ("[val_mse, params, params]", "names params twice"),
        ("[val_mse, val_mse]", "names val_mse twice"),
        ("[params]", "lacks val_mse"),
        ("[val_mse, params, cpu_ms]", "has 2 costs: give val_mse and one cost"),
        ("[val_mse, gpu_ms]", "has gpu_ms but tune.gpus_per_trial=0"),
        ("val_mse", "has the wrong type: expected list"),
        ("[]", "must be a list of names"),
    ],
)
def test_bad_objectives_are_one_line_before_ray_starts(value, message, tmp_path, no_ray, capsys):
    from search.run import main

    argv = ["--config", str(SMOKE), "--storage-path", str(tmp_path), "--set", f"tune.objectives={value}"]
    line = cli_error(main, argv, capsys)
    assert message in line, line
    assert not list(tmp_path.iterdir())  # nothing was written


@pytest.mark.parametrize("how", [["--budget", "10m"], ["--set", "budget=10m"]])
def test_a_budget_with_two_objectives_is_one_line_before_ray_starts(how, tmp_path, no_ray, capsys):
    from search.run import main

    argv = ["--config", str(SMOKE), "--storage-path", str(tmp_path), "--set", "tune.objectives=[val_mse, cpu_ms]", *how]
    line = cli_error(main, argv, capsys)
    assert "budget: 10m with tune.objectives ['val_mse', 'cpu_ms']: a budgeted job searches val_mse alone" in line
    assert "drop budget (and --budget)" in line
    assert not list(tmp_path.iterdir())  # nothing was written
    assert load_search_config(SMOKE, ["budget=10m"]).budget == "10m"  # one objective: the budget stays


def test_gpu_ms_on_a_machine_without_gpus_is_one_line_before_ray_starts(tmp_path, no_ray, capsys, monkeypatch):
    import torch

    from search.run import main

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    argv = ["--config", str(SMOKE), "--storage-path", str(tmp_path), "--set", "tune.objectives=[val_mse, gpu_ms]",
            "--set", "tune.gpus_per_trial=1"]  # fmt: skip
    line = cli_error(main, argv, capsys)
    assert "tune.objectives has gpu_ms but this machine has no GPU" in line and "use cpu_ms" in line
    assert not list(tmp_path.iterdir())
    # On a cluster the same check runs once connected, before any trial (search_retrain_report).
    with pytest.raises(ConfigError, match="the Ray cluster has no GPU"):
        objectives.check_gpus_available(["val_mse", "gpu_ms"], 0.0, "the Ray cluster")
    objectives.check_gpus_available(["val_mse", "gpu_ms"], 2.0, "the Ray cluster")
    objectives.check_gpus_available(["val_mse", "cpu_ms"], 0.0, "the Ray cluster")


# -- retrain.pick ---------------------------------------------------------------------------------------


def test_pick_forms():
    assert parse_pick("best") == Pick("best") and parse_pick(" knee ") == Pick("knee")
    p = parse_pick("params<=50000")
    assert (p.kind, p.cost, p.limit, p.text, p.slug) == ("limit", "params", 50000.0, "params<=50000", "params-le-50000")
    assert parse_pick("cpu_ms <= 2.5").slug == "cpu_ms-le-2.5" and parse_pick("macs<=1e6").text == "macs<=1000000"
    for bad, message in [
        ("fastest", "is not a pick: use best, knee, or a limit"),
        ("params<50000", "is not a pick"),
        ("parms<=5", "limits 'parms', which is not a cost: did you mean 'params'?"),
        ("params<=0", "the limit must be a finite number > 0"),
        ("cpu_ms<=inf", "the limit must be a finite number > 0"),
        (3, "must be text"),
    ]:
        with pytest.raises(ConfigError, match=None) as info:
            parse_pick(bad)
        assert message in str(info.value), (bad, info.value)


def test_a_pick_needs_the_costs_it_names():
    assert load_search_config(SMOKE, [*MO, "retrain.pick=knee"]).retrain.pick == "knee"
    assert load_search_config(SMOKE, [*MO, "retrain.pick=macs<=1e6"]).retrain.pick == "macs<=1e6"
    with pytest.raises(ConfigError, match=r"needs a search with a cost: tune.objectives is \['val_mse'\]"):
        load_search_config(SMOKE, ["retrain.pick=params<=50000"])
    with pytest.raises(ConfigError, match="limits cpu_ms, which the search does not measure"):
        load_search_config(SMOKE, [*MO, "retrain.pick=cpu_ms<=2"])
    check_pick(parse_pick("cpu_ms<=2"), ["val_mse", "cpu_ms"])  # the latency objective is recorded
    check_pick(parse_pick("params<=2"), ["val_mse", "cpu_ms"])  # and so are params and macs, always
    with pytest.raises(ConfigError, match="is not a pick"):
        load_search_config(SMOKE, ["retrain.pick=smallest"])


# -- the front and the picks, on a hand-made search ---------------------------------------------------------


def row(n: int, val: float, status: str = COMPLETED, epochs: int = 4) -> TrialRow:
    return TrialRow(f"t{n}", n, {"model.filters": 4 + n}, epochs, val, status, "", "box", f"/r/search/{n:03d}-t{n}")


# (val MSE, params, status): t0..t4 full budget; t5 stopped early with the lowest cost AND the lowest val MSE;
# t6 diverged. The front of full-budget trials: t1 (cheapest), t2, t4 (best); t0 and t3 are dominated.
TRIALS = [
    (0.020, 40_000, COMPLETED),
    (0.030, 10_000, COMPLETED),
    (0.010, 30_000, COMPLETED),
    (0.015, 60_000, COMPLETED),
    (0.005, 90_000, COMPLETED),
    (0.001, 1_000, STOPPED),
    (math.nan, 5_000, "diverged"),
]


def search(trials=TRIALS, ends=None) -> SearchSummary:
    rows = [row(i, v, s, 4 if s == COMPLETED else 1) for i, (v, _, s) in enumerate(trials)]
    results = [
        SimpleNamespace(
            metrics={
                "params": p,
                "macs": 10 * p,
                "timestamp": 1000.0 + (ends or range(len(trials)))[i] * 60,
                "time_total_s": 30.0,
            }
        )  # fmt: skip
        for i, (_, p, _) in enumerate(trials)
    ]
    best = min((r for r in rows if r.status == COMPLETED), key=lambda r: r.val_mse)
    summary = SearchSummary(best.trial_id, best.params, best.val_mse, {}, 1.0, rows)
    base = {"model": {"variant": "tiny"}}
    summary.pareto = summarize_pareto(["val_mse", "params"], base, rows, results)
    return summary


def test_the_front_holds_full_budget_trials_only():
    p = search().pareto
    assert [pt.trial_id for pt in p.front] == ["t1", "t2", "t4"]  # by cost
    assert [(pt.cost, pt.val_mse) for pt in p.front] == [(10_000, 0.030), (30_000, 0.010), (90_000, 0.005)]
    assert p.front[0].costs == {"params": 10_000, "macs": 100_000} and p.front[0].params == {"model.filters": 5}
    # The stopped trial is cheaper and better than every front point, yet never on the front.
    assert "t5" not in {pt.trial_id for pt in p.front} and p.costs["t5"]["params"] == 1_000
    assert p.objectives == ["val_mse", "params"] and p.cost == "params"


def test_picks_best_limit_and_knee():
    s = search()
    best = choose(s, parse_pick("best"))
    assert best.row.trial_id == "t4" and "lowest validation MSE among the 5 full-budget trials" in best.reason
    within = choose(s, parse_pick("params<=50000"))
    assert within.row.trial_id == "t2" and within.costs["params"] == 30_000  # not t5, stopped at 1,000
    assert "lowest validation MSE among the 3 of 5 full-budget trials with params<=50000" in within.reason
    assert choose(s, parse_pick("params<=10000")).row.trial_id == "t1"  # the limit itself is allowed
    assert choose(s, parse_pick("macs<=300000")).row.trial_id == "t2"  # a limit on the other counted cost
    # The knee of t1 (10k, 0.03), t2 (30k, 0.01), t4 (90k, 0.005) on log scales: t2 bends the front.
    knee = choose(s, parse_pick("knee"))
    assert knee.row.trial_id == "t2" == s.pareto.knee and "knee of the 3-point front" in knee.reason
    assert knee.to_dict()["rule"] == "knee" and knee.to_dict()["trial_id"] == "t2"


def test_a_limit_no_front_point_meets_names_the_smallest_cost_on_the_front():
    with pytest.raises(BssError) as info:
        choose(search(), parse_pick("params<=5000"))  # only the stopped t5 (1,000) and the diverged t6 are below
    assert str(info.value) == (
        "no point of the front has params<=5000: the smallest params on the front is 10,000 (trial t1, val MSE "
        "3.000e-02); raise the limit to at least that"
    )


def test_ties_and_duplicates_on_the_front():
    # t1 and t2 are the same point; t3 ties t1's cost with a worse MSE (dominated).
    trials = [(0.02, 50, COMPLETED), (0.01, 100, COMPLETED), (0.01, 100, COMPLETED), (0.03, 100, COMPLETED)]
    s = search(trials)
    assert [pt.trial_id for pt in s.pareto.front] == ["t0", "t1", "t2"]
    assert choose(s, parse_pick("params<=100")).row.trial_id == "t1"  # a tie: the earlier trial
    assert choose(s, parse_pick("best")).row.trial_id == "t1"


def test_hypervolume_grows_with_each_full_budget_trial_and_stopped_ones_add_nothing():
    # End order: t2 first (minute 0), then t5 (stopped), t0, t3, t1, t4, t6.
    s = search(ends=[2, 4, 0, 3, 5, 1, 6])
    h = s.pareto.hypervolume
    assert [p["trial_id"] for p in h] == ["t2", "t0", "t3", "t1", "t4"]  # full-budget trials, in end order
    assert [p["wall_s"] for p in h] == [30.0, 150.0, 210.0, 270.0, 330.0]  # from the first start (minute 0 - 30 s)
    values = [p["hypervolume"] for p in h]
    assert values == sorted(values) and values[0] > 0
    assert values[1] == values[2]  # t0 and t3 are dominated by t2: no gain
    ref = s.pareto.hypervolume_reference
    assert ref == pytest.approx([math.log10(0.030) + 0.1, math.log10(90_000) + 0.1])


def test_the_reference_shaped_network_is_marked():
    rows = [row(0, 0.01), row(1, 0.02)]
    rows[0].params = {"model.filters": 4, "model.depth": 2, "model.encoder_convs": 2, "model.bottleneck_convs": 2,
                      "model.decoder_convs": 4, "model.decoder_mult": 4}  # the seed topology, 4 filters # fmt: skip
    results = [SimpleNamespace(metrics={"params": 1, "macs": 1}), SimpleNamespace(metrics={"params": 2, "macs": 2})]
    p = summarize_pareto(["val_mse", "params"], {"model": {"variant": "tiny"}}, rows, results)
    assert p.reference_trials == ["t0"]


def test_the_summary_file_keeps_the_front_and_a_single_objective_one_stays_as_it_was():
    s = search()
    data = json.loads(json.dumps(s.to_dict()))
    back = SearchSummary.from_dict(data)
    assert back.pareto == s.pareto and isinstance(back.pareto, ParetoSummary)
    assert json.dumps(back.to_dict()) == json.dumps(s.to_dict())  # (the diverged trial's NaN: not ==)
    s.pareto = None
    assert "pareto" not in s.to_dict() and SearchSummary.from_dict(s.to_dict()).pareto is None


# -- bss-retrain --pick on a finished search, before Ray starts ------------------------------------------


@pytest.fixture
def finished(tmp_path) -> Path:
    """A finished two-objective experiment as the files on disk say it: config and summary (no Ray)."""
    cfg = load_search_config(SMOKE, [*MO, f"tune.storage_path={tmp_path}", "tune.name=mo"])
    exp = tmp_path / "mo"
    exp.mkdir()
    (exp / "search_config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    (exp / "search_summary.json").write_text(json.dumps(search().to_dict()))
    return exp


def test_pick_refusals_are_one_line(finished, no_ray, capsys):
    from search.retrain import main

    before = sorted(p.name for p in finished.iterdir())
    line = cli_error(main, ["--experiment", str(finished), "--pick", "params<=100"], capsys)
    assert "no point of the front has params<=100: the smallest params on the front is 10,000 (trial t1" in line
    assert "limits cpu_ms, which the search does not measure" in cli_error(
        main, ["--experiment", str(finished), "--pick", "cpu_ms<=2"], capsys
    )
    assert "--pick applies only with --experiment" in cli_error(
        main, ["--config", str(ROOT / "configs/seed.yaml"), "--pick", "knee"], capsys
    )
    assert sorted(p.name for p in finished.iterdir()) == before  # nothing was written


def test_a_pick_of_the_first_retrains_trial_retrains_nothing(finished, no_ray, capsys):
    from search.retrain import main

    assert main(["--experiment", str(finished), "--pick", "params<=1000000"]) == 0  # = t4, the best
    out = capsys.readouterr().out
    assert "--pick params<=1000000 selects trial t4, the one the experiment's retrain (best) already trained" in out
    assert not (finished / "picks").exists()


# -- the default job stays today's -----------------------------------------------------------------------------


def built_search(cfg, monkeypatch, tmp_path) -> tuple[dict, object]:
    """What run_search hands Tune: the trainable's parameters and the Tuner's config, without running it."""
    from ray import tune

    from search import tuners

    captured: dict = {}
    monkeypatch.setattr(tune, "with_parameters", lambda fn, **kw: captured.update(kw) or fn)
    monkeypatch.setattr(tuners, "trial_gpus", lambda gpus: 0.0)
    monkeypatch.setattr(tuners, "warn_unschedulable", lambda *args: None)  # (it asks a running Ray)
    monkeypatch.setattr(tuners, "_fit", lambda tuner, *args, **kwargs: tuner)
    tuner = tuners.run_search(cfg, str(tmp_path), resume=False, resume_cmd="x")
    return captured, tuner._local_tuner._tune_config


def test_the_default_job_is_todays_and_two_objectives_change_only_what_they_must(monkeypatch, tmp_path):
    import optuna
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from search.moasha import NonDominatedASHA
    from search.tuners import StoppedAsPrunedSearch

    kw, tc = built_search(load_search_config(SMOKE), monkeypatch, tmp_path)
    assert set(kw) == {"base", "gpu_share", "cpus"}  # the trials measure no cost
    assert (tc.metric, tc.mode) == ("val_mse", "min")
    assert type(tc.search_alg) is OptunaSearch and tc.search_alg.metric is None  # Tune hands it val_mse
    assert (
        isinstance(tc.search_alg._sampler, optuna.samplers.TPESampler) and tc.search_alg._sampler._multivariate is False
    )
    assert isinstance(tc.scheduler, ASHAScheduler) and tc.scheduler._metric is None
    assert "pareto" not in SearchSummary("t", {}, 0.1, {}, 1.0, []).to_dict()

    kw, tc = built_search(load_search_config(SMOKE, ["tune.objectives=[val_mse, cpu_ms]"]), monkeypatch, tmp_path)
    assert kw["costs"] == {"measure": ["cpu_ms"], "batch": 1}
    assert (tc.metric, tc.mode) == (None, None)  # or Tune would replace the searcher's two objectives with one
    assert type(tc.search_alg) is OptunaSearch and not isinstance(tc.search_alg, StoppedAsPrunedSearch)
    assert tc.search_alg.metric == ["val_mse", "cpu_ms"] and tc.search_alg.mode == ["min", "min"]
    # The pinned choices (search/tuners.py, from the replay): MO-TPE with the single-objective job's options,
    # told the Ray way (a stopped trial COMPLETE with its values), the non-dominated rung rule on ASHA's rungs.
    assert (
        isinstance(tc.search_alg._sampler, optuna.samplers.TPESampler) and tc.search_alg._sampler._multivariate is False
    )
    assert tc.search_alg._sampler._n_startup_trials == 4
    assert isinstance(tc.scheduler, NonDominatedASHA) and (tc.scheduler._metric, tc.scheduler._cost) == (
        "val_mse",
        "cpu_ms",
    )
    assert [m for m, _ in tc.scheduler._rungs] == [4, 2, 1] and tc.scheduler._max_t == 4  # Ray's ASHA's rungs
    kw, _ = built_search(load_search_config(SMOKE, MO), monkeypatch, tmp_path)
    assert kw["costs"] == {"measure": [], "batch": 1}  # params and macs are counted, nothing timed
