"""The report renders typed results: report.json's keys and values, report.md, and the pictures, on synthetic data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from search.figures import param_importances
from search.report import PICTURES, REFERENCE_TEST_MSE, build_report, render_markdown, write_report
from search.results import EnsembleResult, RetrainSummary, SearchSummary, SeedResult, Separations, TrialRow
from search.space import parse_dimension

# report.json's format: these keys, in this order.
REPORT_KEYS = [
    "best_config", "best_params", "best_val_mse", "num_trials", "num_completed", "num_stopped_early", "num_errored",
    "num_diverged", "num_cut", "param_importances", "seeds", "test_mse_per_seed", "test_mse_mean", "test_mse_std",
    "test_mse_ensemble", "test_mse_ensemble_std", "test_mse_ensemble_per_draw", "ensemble_seeds",
    "ensemble_checkpoints", "ensemble_error",
    "val_mse_per_seed", "samples_per_seed", "best_seed",
    "best_seed_test", "baseline_mix_mse", "reference_test_mse", "protocol", "retrain_errors", "trials",
    "search_wall_s", "wall_s", "budget",
]  # fmt: skip
# The keys report.json had before the ensemble and the samples were added: still there, in the same order.
EARLIER_KEYS = [
    "best_config", "best_params", "best_val_mse", "num_trials", "num_completed", "num_stopped_early", "num_errored",
    "num_diverged", "seeds", "test_mse_per_seed", "test_mse_mean", "test_mse_std", "val_mse_per_seed", "best_seed",
    "best_seed_test", "baseline_mix_mse", "reference_test_mse", "protocol", "retrain_errors", "trials",
    "search_wall_s", "wall_s",
]  # fmt: skip
ROW_KEYS = ["trial_id", "number", "params", "epochs", "val_mse", "status", "error", "node", "path", "samples",
            "samples_per_s", "epoch_tail_s"]  # fmt: skip
BEST_CONFIG = {"model": {"filters": 12}, "train": {"lr": 2e-3, "epochs": 3}}


def row(number: int, lr: float, val: float, status: str, error: str = "", epochs: int = 3) -> TrialRow:
    return TrialRow(f"t{number}", number, {"train.lr": lr, "model.filters": 8 + 4 * (number % 2)}, epochs, val,
                    status, error, "box", f"/r/search/t{number}", samples=epochs * 1920)  # fmt: skip


def search() -> SearchSummary:
    trials = [
        row(1, 2e-3, 0.010, "completed"),
        row(0, 1e-3, 0.020, "completed"),
        row(2, 3e-3, 0.001, "stopped", epochs=1),
        row(3, 1e3, math.nan, "diverged", "non-finite loss at step 7"),
    ]
    return SearchSummary("t1", {"train.lr": 2e-3}, 0.010, BEST_CONFIG, search_wall_s=42.0, trials=trials)


def seed(s: int, val: float, test: float | None, error: str = "") -> SeedResult:
    metrics = {} if test is None else {"test_mse_mean": test, "test_mse_std": test / 10, "baseline_mix_mse_mean": 0.05,
                                       "protocol_draws": 10, "protocol_pairs": 20000, "protocol_seed": 0}  # fmt: skip
    return SeedResult(s, val, test, metrics, f"/r/retrain/{s}/checkpoint_000002", error, f"/r/retrain/{s}",
                      samples=19_438_080 if test is not None else 1_000_000)  # fmt: skip


ENSEMBLE = EnsembleResult(
    [1000, 1001], 0.0025, 2.5e-5, [0.002475, 0.002525], ["/r/retrain/1000/c", "/r/retrain/1001/c"]
)


def retrain(ensemble: EnsembleResult | None = ENSEMBLE) -> RetrainSummary:
    seeds = [seed(1000, 0.009, 0.002), seed(1001, 0.008, 0.004), seed(1002, 0.5, None, "RuntimeError: boom")]
    return RetrainSummary(seeds, best=seeds[1], ensemble=ensemble)


def test_report_keys_and_values() -> None:
    r = build_report(search(), retrain(), BEST_CONFIG, wall_s=99.0)
    assert list(r) == REPORT_KEYS
    assert [k for k in r if k in EARLIER_KEYS] == EARLIER_KEYS  # only added keys, none renamed or moved
    assert all(list(t) == ROW_KEYS for t in r["trials"])
    assert [t["samples"] for t in r["trials"]] == [5760, 5760, 1920, 5760]  # epochs x 1,920 samples
    assert r["samples_per_seed"] == [19_438_080, 19_438_080]  # the evaluated seeds, in the order of "seeds"
    assert (r["test_mse_ensemble"], r["test_mse_ensemble_std"]) == (0.0025, 2.5e-5)
    assert r["test_mse_ensemble_per_draw"] == [0.002475, 0.002525] and r["ensemble_seeds"] == [1000, 1001]
    assert r["ensemble_checkpoints"] == ["/r/retrain/1000/c", "/r/retrain/1001/c"] and r["ensemble_error"] == ""
    assert r["seeds"] == [1000, 1001] and r["test_mse_per_seed"] == [0.002, 0.004]  # the errored seed is left out
    assert r["test_mse_mean"] == pytest.approx(0.003) and r["test_mse_std"] == pytest.approx(0.001)  # ddof=0
    assert r["val_mse_per_seed"] == [0.009, 0.008] and r["best_seed"] == 1001
    assert r["best_seed_test"]["test_mse_mean"] == 0.004 and r["baseline_mix_mse"] == 0.05
    assert r["reference_test_mse"] == REFERENCE_TEST_MSE == 3.677e-4
    assert r["protocol"] == {"draws": 10, "pairs": 20000, "seed": 0}
    assert r["retrain_errors"] == ["RuntimeError: boom"]
    assert (r["num_trials"], r["num_completed"], r["num_stopped_early"], r["num_errored"], r["num_diverged"]) == (
        4, 2, 1, 1, 1,
    )  # fmt: skip
    assert r["best_params"] == {"train.lr": 2e-3} and r["best_val_mse"] == 0.010 and r["search_wall_s"] == 42.0
    assert [t["trial_id"] for t in r["trials"]] == ["t1", "t0", "t2", "t3"] and r["wall_s"] == 99.0


def test_report_of_a_retrain_without_a_search() -> None:
    r = build_report(None, retrain(), BEST_CONFIG, wall_s=5.0)
    assert list(r) == REPORT_KEYS
    assert r["best_params"] == {} and r["trials"] == [] and r["search_wall_s"] is None
    assert r["num_trials"] == r["num_completed"] == r["num_errored"] == 0
    assert r["best_val_mse"] == 0.008  # the best seed's, as there was no search
    md = render_markdown(r)
    assert "0 trials: 0 ran their full budget" in md and "| # | trial |" not in md


def test_markdown_shows_the_headline_trials_errors_seeds_and_pictures() -> None:
    r = build_report(search(), retrain(), BEST_CONFIG, wall_s=99.0)
    md = render_markdown(r)
    assert md.startswith("# bss-search report\n")
    # The single-model mean and the ensemble, each named for what it is, with what its ± is over.
    single = "single model (mean ± std over 2 seeds)"
    ensemble = "ensemble of 2 seeds (averaged predictions; ± std over the protocol's draws)"
    assert f"**Test MSE 3.000e-03 ± 1.0e-03: {single}** (reference U-Net 3.677e-04; mix baseline 0.05)." in md
    assert f"Test MSE of the {ensemble}: 2.500e-03 ± 2.5e-05." in md
    assert f"| {single} | 3.000e-03 ± 1.0e-03 |" in md and f"| {ensemble} | 2.500e-03 ± 2.5e-05 |" in md
    assert "4 trials: 2 ran their full budget, 1 stopped early by ASHA, 1 errored (1 diverged)." in md
    assert "every trial saw 1,920 training samples per epoch whatever its batch size" in md
    assert "| # | trial | status | epochs | samples | val MSE | model.filters | train.lr |" in md  # params by key
    assert "| 1 | t1 | completed | 3 | 5,760 | 0.01 | 12 | 2.000e-03 |" in md
    assert "| 3 | t2 | stopped | 1 | 1,920 | 1.000e-03 | 8 | 3.000e-03 |" in md
    assert "| 4 | t3 | diverged | 3 | 5,760 | nan | 12 | 1000 |" in md
    assert "- t3: non-finite loss at step 7" in md
    assert "| seed | samples | val MSE | test MSE |" in md
    assert "| 1001 | 19,438,080 | 8.000e-03 | 4.000e-03 |" in md and "| 1002 |" not in md  # only evaluated seeds
    assert "Protocol: 10 draws x 20000 test pairs, seed 0." in md
    assert f"The single-model mean is {0.003 / 3.677e-4:.2f}x the reference's MSE" in md
    assert "predictions of seeds 1000, 1001" in md and "`best_model.pt` is one model, not the ensemble: seed 1001" in md
    assert "filters: 12" in md  # the best config as YAML
    for name in PICTURES.values():
        assert f"]({name})" in md


def test_an_ensemble_that_could_not_be_evaluated_is_said_so() -> None:
    failed = EnsembleResult([1000, 1001], math.nan, math.nan, [], ["a", "b"], error="CheckpointError: gone")
    for ensemble, why in ((failed, "CheckpointError: gone"), (None, "no seed finished its retrain")):
        r = build_report(search(), retrain(ensemble), BEST_CONFIG, wall_s=1.0)
        assert r["test_mse_ensemble"] is None and r["test_mse_ensemble_std"] is None and r["ensemble_error"] == why
        assert r["test_mse_ensemble_per_draw"] == []  # None, not NaN: report.json stays plain JSON here
        assert f"not evaluated ({why})" in render_markdown(r)


def test_summaries_written_before_samples_were_recorded_still_load() -> None:
    old = row(1, 2e-3, 0.01, "completed").to_dict()
    del old["samples"]
    summary = SearchSummary.from_dict({**search().to_dict(), "trials": [old]})
    assert summary.trials[0].samples is None
    r = build_report(summary, retrain(), BEST_CONFIG, wall_s=1.0)
    assert "| 1 | t1 | completed | 3 |  | 0.01 |" in render_markdown(r)


def test_write_report_writes_every_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.random((2, 1, 28, 28), dtype=np.float32)
    sep = Separations(x=x, target=np.concatenate([x, x], 1), pred=np.concatenate([x, x], 1), mse=0.0)
    dims = {"train.lr": parse_dimension("train.lr", {"loguniform": [1e-4, 1e4]}),
            "model.filters": parse_dimension("model.filters", {"choice": [8, 12]})}  # fmt: skip
    report = write_report(tmp_path, search(), retrain(), BEST_CONFIG, dims, sep, wall_s=1.0)
    assert json.loads((tmp_path / "report.json").read_text()) == json.loads(json.dumps(report))
    assert (tmp_path / "report.md").read_text() == render_markdown(report)
    for name in PICTURES.values():
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_importances_rest_on_the_full_budget_trials_only() -> None:
    # Full budget: only the weight decay matters. Stopped early: rows whose *partial* runs look best
    # whenever the lr is high. Counted in, they would make the lr look important.
    rng = np.random.default_rng(0)
    dims = {"train.lr": parse_dimension("train.lr", {"loguniform": [1e-4, 1e-2]}),
            "train.weight_decay": parse_dimension("train.weight_decay", {"uniform": [0.0, 0.1]})}  # fmt: skip
    trials = []
    for i in range(60):
        lr, wd = float(10 ** rng.uniform(-4, -2)), float(rng.uniform(0, 0.1))
        full = i % 2 == 0
        val = 1e-3 + 1e-2 * wd if full else (1e-5 if lr > 1e-3 else 1e-1)
        trials.append(TrialRow(f"t{i}", i, {"train.lr": lr, "train.weight_decay": wd}, 3 if full else 1, val,
                               "completed" if full else "stopped", "", "box", f"/r/t{i}", samples=1))  # fmt: skip
    imp = param_importances(trials, dims)
    assert imp.trials == 30 and not imp.note
    assert set(imp.values) == set(dims)
    assert imp.values["train.weight_decay"] > 0.8 > imp.values["train.lr"], imp.values
    assert list(imp.values) == ["train.weight_decay", "train.lr"]  # most important first

    r = build_report(SearchSummary("t0", {}, 1e-3, BEST_CONFIG, 1.0, trials), retrain(), BEST_CONFIG, 1.0, imp)
    assert r["param_importances"]["method"] == "PED-ANOVA" and r["param_importances"]["trials"] == 30
    md = render_markdown(r)
    wd = imp.values["train.weight_decay"]
    assert f"(PED-ANOVA, over the 30 full-budget trials): `train.weight_decay` {wd:.2f}, `train.lr`" in md


def test_importances_say_why_when_there_are_none() -> None:
    dims = {"train.lr": parse_dimension("train.lr", {"loguniform": [1e-4, 1e4]})}
    one = [row(1, 2e-3, 0.01, "completed"), row(2, 3e-3, 0.001, "stopped", epochs=1)]
    imp = param_importances(one, dims)
    assert imp.values == {} and imp.trials == 1 and "1 trial(s) ran the full budget" in imp.note
    assert param_importances(one, {}).note == "the search had no space"
    r = build_report(search(), retrain(), BEST_CONFIG, 1.0, imp)
    assert f"Importances: none ({imp.note})." in render_markdown(r)
    assert build_report(None, retrain(), BEST_CONFIG, 1.0)["param_importances"]["note"] == "no search"


# -- a two-objective search: the front, the pick, the hypervolume -----------------------------------------------


def mo_search() -> SearchSummary:
    """search()'s trials with costs: t1 (0.010, 30k params) and t0 (0.020, 10k) are the front; t2, stopped early at
    0.001 with 1k params, is cheaper and better than both and is still off it."""
    from types import SimpleNamespace

    from search.objectives import summarize_pareto

    s = search()
    params = {"t1": 30_000, "t0": 10_000, "t2": 1_000, "t3": 5_000}
    results = [SimpleNamespace(metrics={"params": params[t.trial_id], "macs": 7 * params[t.trial_id], "timestamp":
                                        100.0 + 60 * t.number, "time_total_s": 10.0}) for t in s.trials]  # fmt: skip
    s.pareto = summarize_pareto(["val_mse", "params"], {"model": {"variant": "tiny"}}, s.trials, results)
    return s


def test_a_two_objective_report_adds_the_front_and_the_pick_after_todays_keys(tmp_path: Path) -> None:
    from search.objectives import choose, parse_pick
    from search.pareto_report import PICTURES as MO_PICTURES

    s = mo_search()
    pick = choose(s, parse_pick("params<=20000")).to_dict()
    r = build_report(s, retrain(), BEST_CONFIG, wall_s=1.0, pick=pick)
    assert list(r) == [*REPORT_KEYS, "pareto", "pick"]  # today's keys first, unchanged
    assert [p["trial_id"] for p in r["pareto"]["front"]] == ["t0", "t1"]
    assert r["pick"]["trial_id"] == "t0" and r["pick"]["rule"] == "params<=20000"
    md = render_markdown(r)
    assert "## Accuracy against params" in md and "| # | trial | params | macs | val MSE | |" in md
    assert (
        "| 1 | t0 | 10,000 | 70,000 | 2.000e-02 | retrained |" in md
        and "| 2 | t1 | 30,000 | 210,000 | 1.000e-02 |" in md
    )
    assert "Retrained: trial t0 (retrain.pick: `params<=20000`), lowest validation MSE among the 1 of 2" in md
    # The config shown is the pick's, not the search's best (best_params, the search's fact, is t1's).
    assert "## Retrained configuration (`params<=20000`: trial t0)" in md and "## Best configuration" not in md
    best = build_report(s, retrain(), BEST_CONFIG, wall_s=1.0, pick=choose(s, parse_pick("best")).to_dict())
    assert "## Best configuration" in render_markdown(best)
    assert (
        "The front is built from the 2 trials that ran their full budget: a trial stopped early is never on it." in md
    )
    rng = np.random.default_rng(0)
    x = rng.random((2, 1, 28, 28), dtype=np.float32)
    sep = Separations(x=x, target=np.concatenate([x, x], 1), pred=np.concatenate([x, x], 1), mse=0.0)
    dims = {"train.lr": parse_dimension("train.lr", {"loguniform": [1e-4, 1e4]})}
    write_report(tmp_path, s, retrain(), BEST_CONFIG, dims, sep, wall_s=1.0, pick=pick)
    for name in MO_PICTURES.values():
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({name})" in md


def test_a_single_objective_report_has_no_pareto_part(tmp_path: Path) -> None:
    from search.pareto_report import PICTURES as MO_PICTURES

    r = build_report(search(), retrain(), BEST_CONFIG, wall_s=1.0)
    assert list(r) == REPORT_KEYS and "Accuracy against" not in render_markdown(r)
    rng = np.random.default_rng(0)
    x = rng.random((2, 1, 28, 28), dtype=np.float32)
    sep = Separations(x=x, target=np.concatenate([x, x], 1), pred=np.concatenate([x, x], 1), mse=0.0)
    write_report(tmp_path, search(), retrain(), BEST_CONFIG, {}, sep, wall_s=1.0)
    assert not [name for name in MO_PICTURES.values() if (tmp_path / name).exists()]
