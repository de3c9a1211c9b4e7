"""The report renders typed results: report.json's keys and values, report.md, and the pictures, on synthetic data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from search.report import PICTURES, REFERENCE_TEST_MSE, build_report, render_markdown, write_report
from search.results import RetrainSummary, SearchSummary, SeedResult, Separations, TrialRow
from search.space import parse_dimension

# report.json's format: these keys, in this order.
REPORT_KEYS = [
    "best_config", "best_params", "best_val_mse", "num_trials", "num_completed", "num_stopped_early", "num_errored",
    "num_diverged", "seeds", "test_mse_per_seed", "test_mse_mean", "test_mse_std", "val_mse_per_seed", "best_seed",
    "best_seed_test", "baseline_mix_mse", "reference_test_mse", "protocol", "retrain_errors", "trials",
    "search_wall_s", "wall_s",
]  # fmt: skip
BEST_CONFIG = {"model": {"filters": 12}, "train": {"lr": 2e-3, "epochs": 3}}


def row(number: int, lr: float, val: float, status: str, error: str = "") -> TrialRow:
    return TrialRow(f"t{number}", number, {"train.lr": lr, "model.filters": 8 + 4 * (number % 2)}, 3, val, status,
                    error, "box", f"/r/search/t{number}")  # fmt: skip


def search() -> SearchSummary:
    trials = [
        row(1, 2e-3, 0.010, "completed"),
        row(0, 1e-3, 0.020, "completed"),
        row(2, 3e-3, 0.001, "stopped"),
        row(3, 1e3, math.nan, "diverged", "non-finite loss at step 7"),
    ]
    return SearchSummary("t1", {"train.lr": 2e-3}, 0.010, BEST_CONFIG, search_wall_s=42.0, trials=trials)


def seed(s: int, val: float, test: float | None, error: str = "") -> SeedResult:
    metrics = {} if test is None else {"test_mse_mean": test, "test_mse_std": test / 10, "baseline_mix_mse_mean": 0.05,
                                       "protocol_draws": 10, "protocol_pairs": 20000, "protocol_seed": 0}  # fmt: skip
    return SeedResult(s, val, test, metrics, f"/r/retrain/{s}/checkpoint_000002", error, f"/r/retrain/{s}")


def retrain() -> RetrainSummary:
    seeds = [seed(1000, 0.009, 0.002), seed(1001, 0.008, 0.004), seed(1002, 0.5, None, "RuntimeError: boom")]
    return RetrainSummary(seeds, best=seeds[1])


def test_report_keys_and_values() -> None:
    r = build_report(search(), retrain(), BEST_CONFIG, wall_s=99.0)
    assert list(r) == REPORT_KEYS
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
    assert "**Test MSE 3.000e-03 ± 1.0e-03 over 2 seeds** (reference U-Net 3.677e-04; mix baseline 0.05)." in md
    assert "4 trials: 2 ran their full budget, 1 stopped early by ASHA, 1 errored (1 diverged)." in md
    assert "| # | trial | status | epochs | val MSE | model.filters | train.lr |" in md  # params sorted by key
    assert "| 1 | t1 | completed | 3 | 0.01 | 12 | 2.000e-03 |" in md
    assert "| 4 | t3 | diverged | 3 | nan | 12 | 1000 |" in md
    assert "- t3: non-finite loss at step 7" in md
    assert "| 1001 | 8.000e-03 | 4.000e-03 |" in md and "| 1002 |" not in md  # only evaluated seeds
    assert "Protocol: 10 draws x 20000 test pairs, seed 0." in md
    assert f"This result is {0.003 / 3.677e-4:.2f}x the reference's MSE" in md and "holds seed 1001" in md
    assert "filters: 12" in md  # the best config as YAML
    for name in PICTURES.values():
        assert f"]({name})" in md


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
