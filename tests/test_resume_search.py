"""``search/run.py --resume`` with changed settings: an evaluation-only fix completes a late-failed retrain
without rerunning the search; any other change, or any change to a finished experiment, is refused by name."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from bss_model.config import MAX_SEED
from tests._searchutil import EPOCHS, REPO, env_with, finished, results, run_to_end, search_args, sets

pytestmark = pytest.mark.slow

EVAL_FAULT_RUN = str(REPO / "tests" / "_eval_fault_run.py")


def fingerprint(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


def faulty(args: list[str]) -> list[str]:
    """search_args through tests/_eval_fault_run.py, which fails evaluations with eval.batch_size > 500."""
    return [EVAL_FAULT_RUN, "500", *args[1:]]


# The search settings' accepted extremes (tests/test_validation.py walks them), run here for real: the largest
# seeds, "never" for the startup trials, ASHA's grace and the checkpoints kept, no retry on failure.
EXTREMES = (
    f"tune.seed={MAX_SEED}",
    "tune.n_startup_trials=1000000000000",
    "tune.grace_period=1000000000000",
    "tune.reduction_factor=1.0e12",
    "tune.checkpoints_to_keep=1000000000000",
    "tune.max_concurrent=1000000000000",
    "retrain.max_concurrent=1000000000000",
    f"retrain.first_seed={MAX_SEED - 1}",  # seeds MAX_SEED - 1 and MAX_SEED
    "tune.max_failures=0",
)


def test_an_eval_fix_completes_a_late_failed_retrain_without_rerunning_the_search(
    tmp_path: Path, data_dir: Path
) -> None:
    env = env_with(data_dir)
    exp = tmp_path / "results" / "late"
    first = search_args(tmp_path / "results", "late", *sets("base.eval.batch_size=1000", *EXTREMES))
    proc = run_to_end(faulty(first), tmp_path, env, "first", timeout=420)
    assert proc.p.returncode != 0, proc.tail()
    assert (exp / "search_summary.json").exists() and not (exp / "report.json").exists(), proc.tail()
    search_before = fingerprint(exp / "search")
    trials = sorted(results(exp, "search"))
    assert len(finished(exp, "search", EPOCHS)) == len(trials) == 3

    # Any change but an evaluation setting is refused by name, before Ray starts.
    proc = run_to_end(faulty([*first, *sets("base.train.lr=0.002"), "--resume"]), tmp_path, env, "refused")
    assert proc.p.returncode == 2, proc.tail()
    assert proc.err.strip().count("\n") == 0 and "base.train.lr: experiment 0.001, now 0.002" in proc.err, proc.err

    fixed = search_args(tmp_path / "results", "late", *sets("base.eval.batch_size=500", *EXTREMES))
    proc = run_to_end(faulty([*fixed, "--resume"]), tmp_path, env, "fixed", timeout=420)
    assert proc.p.returncode == 0, proc.tail()
    assert "base.eval.batch_size: was 1000, now 500" in (exp / "search.log").read_text()
    # The search's trials were not rerun: not one of their files changed, no trial was added.
    assert sorted(results(exp, "search")) == trials
    assert fingerprint(exp / "search") == search_before
    report = json.loads((exp / "report.json").read_text())
    assert report["seeds"] == [MAX_SEED - 1, MAX_SEED] and len(report["test_mse_per_seed"]) == 2, report["seeds"]
    assert (exp / "best_model.pt").exists()

    # A finished experiment is left as it is: resumed unchanged, or refused when a setting changed.
    done = fingerprint(exp)
    proc = run_to_end([*fixed, "--resume"], tmp_path, env, "again")
    assert proc.p.returncode == 0 and "already finished" in proc.out, proc.tail()
    proc = run_to_end([*fixed, *sets("tune.num_samples=12"), "--resume"], tmp_path, env, "more")
    assert proc.p.returncode == 2 and "tune.num_samples: experiment 3, now 12" in proc.err, proc.tail()
    other_data = tmp_path / "data-elsewhere"  # the same files from another folder (resolve() keeps its name)
    other_data.mkdir()
    for ds in ("mnist", "fashion-mnist"):
        (other_data / ds).symlink_to(data_dir / ds)
    proc = run_to_end([*fixed, "--data-dir", str(other_data), "--resume"], tmp_path, env, "data")
    assert proc.p.returncode == 2 and "base.data.dir" in proc.err, proc.tail()
    assert fingerprint(exp) == done, "report.json, figures and everything else as they were"
