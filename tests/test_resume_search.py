"""``search/run.py --resume`` with changed settings: an evaluation-only fix completes a late-failed retrain
without rerunning the search; any other change, or any change to a finished experiment, is refused by name."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests._searchutil import EPOCHS, REPO, env_with, finished, run_to_end, search_args, sets

pytestmark = pytest.mark.slow

EVAL_FAULT_RUN = str(REPO / "tests" / "_eval_fault_run.py")


def fingerprint(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


def faulty(args: list[str]) -> list[str]:
    """search_args through tests/_eval_fault_run.py, which fails evaluations with eval.batch_size > 500."""
    return [EVAL_FAULT_RUN, "500", *args[1:]]


def test_an_eval_fix_completes_a_late_failed_retrain_without_rerunning_the_search(
    tmp_path: Path, data_dir: Path
) -> None:
    env = env_with(data_dir)
    exp = tmp_path / "results" / "late"
    first = search_args(tmp_path / "results", "late", *sets("base.eval.batch_size=1000", "tune.max_failures=0"))
    proc = run_to_end(faulty(first), tmp_path, env, "first", timeout=420)
    assert proc.p.returncode != 0, proc.tail()
    assert (exp / "search_summary.json").exists() and not (exp / "report.json").exists(), proc.tail()
    search_before = fingerprint(exp / "search")
    trials = sorted(p.name for p in (exp / "search").glob("train_trial*"))
    assert len(finished(exp, "search", EPOCHS)) == len(trials) == 3

    # Any change but an evaluation setting is refused by name, before Ray starts.
    proc = run_to_end(faulty([*first, *sets("base.train.lr=0.002"), "--resume"]), tmp_path, env, "refused")
    assert proc.p.returncode == 2, proc.tail()
    assert proc.err.strip().count("\n") == 0 and "base.train.lr: experiment 0.001, now 0.002" in proc.err, proc.err

    fixed = search_args(tmp_path / "results", "late", *sets("base.eval.batch_size=500", "tune.max_failures=0"))
    proc = run_to_end(faulty([*fixed, "--resume"]), tmp_path, env, "fixed", timeout=420)
    assert proc.p.returncode == 0, proc.tail()
    assert "base.eval.batch_size: was 1000, now 500" in (exp / "search.log").read_text()
    # The search's trials were not rerun: not one of their files changed, no trial was added.
    assert sorted(p.name for p in (exp / "search").glob("train_trial*")) == trials
    assert fingerprint(exp / "search") == search_before
    report = (exp / "report.json").read_text()
    assert '"test_mse_mean"' in report and (exp / "best_model.pt").exists()

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
