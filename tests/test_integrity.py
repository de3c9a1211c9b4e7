"""Experiment integrity (issue 21): one driver per experiment, faults that keep the experiment resumable, and
files that are never silently lost, rerun or half-overwritten.

Fast: the resume lines, the lock and the S3 lease (against a real SeaweedFS server, tests/_s3util.py), the
--resume checks on damaged or missing files, gs:// without a network.
Slow (real tiny searches in subprocesses, tests/_searchutil.py): two drivers on one experiment, SIGTERM, a full
disk on a real tmpfs, a folder deleted under a running search, and one finished experiment copied per case of
a damaged file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from _searchutil import (
    PY,
    RUN,
    SMOKE,
    TINY,
    Proc,
    check_study_matches_report,
    checkpoints,
    cli_error,
    env_with,
    finished,
    freeze_unfinished,
    read_json,
    run_to_end,
    running,
    search_args,
    sets,
)

# --------------------------------------------------------------------------------------
# The printed resume command, pasted back into a shell, is the same command


def _captured(monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    def capture(*args: Any) -> dict:
        (seen["resume_cmd"],) = [a for a in args if isinstance(a, str) and a.startswith("python ")]
        return {}

    monkeypatch.setattr(module, name, capture)
    return seen


def test_resume_lines_are_shell_quoted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 21: `resume with ...` joined the arguments with spaces, so one holding a space failed when pasted."""
    import search.pipeline
    import search.retrain
    import search.run

    storage = str(tmp_path / "my results")
    argv = ["--config", SMOKE, "--storage-path", storage, "--name", "exp", *sets(*TINY, "base.train.lr=1e-3")]
    seen = _captured(monkeypatch, search.pipeline, "search_retrain_report")  # imported at run time
    assert search.run.main(argv) == 0
    assert shlex.split(seen["resume_cmd"]) == ["python", "search/run.py", *argv, "--resume"]

    seen = _captured(monkeypatch, search.pipeline, "retrain_report")
    argv = ["--config", str(Path(__file__).parents[1] / "configs" / "seed.yaml"), "--name", "it's mine",
            "--storage-path", storage, "--seeds", "2"]  # fmt: skip
    assert search.retrain.main(argv) == 0
    assert shlex.split(seen["resume_cmd"]) == ["python", "search/retrain.py", *argv, "--resume"]


# --------------------------------------------------------------------------------------
# One experiment, one driver: the lock in the folder (the S3 lease: tests/test_s3.py)

HOLD = """
import sys, time
from search import lock
with lock.hold(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def _holder(root: Path, cwd: Path) -> Proc:
    proc = Proc([PY, "-c", HOLD, str(root)], cwd, env_with(Path(os.environ["BSS_DATA_DIR"])), "holder")
    proc.wait_until(lambda: "held" in proc.out, 60, "the holder to take the lock")
    return proc


def test_a_second_driver_is_refused_naming_the_first_and_a_killed_one_blocks_nothing(
    tmp_path: Path, data_dir: Path, no_ray: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 21: a second driver on one experiment was not refused; both wrote one folder. Now it is refused in
    one line naming the first (host, pid, start time), before it reads or writes anything; and a driver that
    died (kill -9) leaves nothing that blocks the next, since the kernel drops its lock."""
    from search.retrain import main as retrain_main
    from search.run import main

    store = tmp_path / "store"
    argv = ["--config", SMOKE, "--storage-path", str(store), "--name", "exp", *sets(*TINY)]
    holder = _holder(store / "exp", tmp_path)
    try:
        host = socket.gethostname()
        for cmd, args in (
            (main, argv),
            (main, [*argv, "--resume"]),
            (retrain_main, ["--experiment", str(store / "exp")]),
        ):
            line = cli_error(cmd, args, capsys)
            assert f"in use by the driver with pid {holder.pid} on {host}, started 20" in line, line
        assert sorted(p.name for p in (store / "exp").iterdir()) == [".driver.lock"], "the second wrote nothing"
    finally:
        holder.cleanup()  # SIGKILL: no release, the lock file stays behind
    assert (store / "exp" / ".driver.lock").exists()
    # The next driver gets past the lock (to the next check: --resume of an experiment that never started).
    assert "no experiment at" in cli_error(main, [*argv, "--resume"], capsys)
    assert not (store / "exp" / ".driver.lock").exists(), "a released lock leaves no file"


# --------------------------------------------------------------------------------------
# gs:// without a network: one line in seconds (it printed nothing for 500 s)


def test_gs_storage_without_a_network_is_one_line_in_seconds(tmp_path: Path, data_dir: Path) -> None:
    """Issue 21: `--storage-path gs://...` with no network printed nothing for 500 s (GCS's client retries for 15
    minutes). Now the storage check fails in seconds, in one line naming the URI and the fix."""
    # No credentials to find and no metadata server to ask, as on a laptop or a CI runner without a network.
    env = {**env_with(data_dir), "HOME": str(tmp_path), "GCE_METADATA_HOST": "127.0.0.1:1",
           "GCE_METADATA_ROOT": "127.0.0.1:1"}  # fmt: skip
    env.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
    t0 = time.monotonic()
    with running([RUN, "--config", SMOKE, "--storage-path", "gs://bss-test/exp", "--name", "g", *sets(*TINY)],
                 tmp_path, env, "gs") as proc:  # fmt: skip
        rc = proc.finish(120)
    took = time.monotonic() - t0
    lines = proc.err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "Traceback" not in proc.err, proc.tail()
    assert lines[0].startswith("error: storage gs://bss-test/exp/g ") and "credentials" in lines[0], lines[0]
    assert took < 90, f"{took:.0f} s"


# --------------------------------------------------------------------------------------
# Tune's own files: written whole, and checked before --resume trusts them


# os._exit, not a normal exit: after a failed copy under RLIMIT_FSIZE, pyarrow's global thread pool can hang in
# its exit-time Shutdown (gdb: arrow::internal::ThreadPool::Shutdown from __run_exit_handlers; 2 of 40 runs under
# load, and once in this suite at -n 2). What is tested is the files the copy leaves, not pyarrow's exit.
COPY_UNDER_LIMIT = """
import os, resource, signal, sys
import pyarrow.fs
from search.tunefiles import tune_filesystem
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
try:
    pyarrow.fs.copy_files(sys.argv[2], sys.argv[3], destination_filesystem=tune_filesystem(sys.argv[3]))
except OSError as exc:
    print(f"{type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
    os._exit(1)
os._exit(0)
"""


def test_tune_writes_a_local_experiment_whole_or_not_at_all(tmp_path: Path) -> None:
    """Issue 21: a full disk left Tune's experiment_state-*.json cut off mid-string (Tune copies its state into
    storage in place). Through tune_filesystem a write that fails leaves the previous file, whole, and no temp
    file; one that succeeds replaces it, with the user's umask. (The failure here is a real one: RLIMIT_FSIZE
    fails every write past 64 KiB with EFBIG, as a full disk fails them with ENOSPC.)"""
    staging, storage = tmp_path / "staging", tmp_path / "storage"
    (staging / "trial").mkdir(parents=True)
    state = {"trial_data": [["x" * 100, {}]] * 2000}  # ~220 KB, as a search's state soon is
    (staging / "experiment_state-1.json").write_text(json.dumps(state))
    (staging / "trial" / "result.json").write_text('{"epoch": 2}\n')
    storage.mkdir()
    old = json.dumps({"trial_data": []})
    (storage / "experiment_state-1.json").write_text(old)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run([PY, "-c", COPY_UNDER_LIMIT, str(64 * 1024), str(staging), str(storage)], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode != 0 and "File too large" in proc.stderr, proc.stderr[-2000:]
    assert (storage / "experiment_state-1.json").read_text() == old, "the state was half-overwritten"
    assert not [p for p in storage.rglob("*") if p.name.endswith(".tmp")], "a temp file was left"
    proc = subprocess.run([PY, "-c", COPY_UNDER_LIMIT, str(1 << 30), str(staging), str(storage)], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((storage / "experiment_state-1.json").read_text()) == state
    assert (storage / "trial" / "result.json").read_text() == '{"epoch": 2}\n'
    mode = (storage / "experiment_state-1.json").stat().st_mode & 0o777
    assert mode == 0o666 & ~current_umask(), oct(mode)


@pytest.mark.parametrize("storage", ["local", "uri"])
def test_a_retried_trial_keeps_the_rows_of_its_failed_attempt(tmp_path: Path, storage: str) -> None:
    """Seen in CI: a trial whose worker node died lost its epoch-1 row. On a retry Tune's loggers copy the
    trial's result.json and progress.csv back from storage over the driver's copy, and storage held an older
    copy (the driver uploads every 10 s or so). KeepTrialHistory uploads the driver's copies as the trial is
    requeued, so Ray's own copy-back (run here, as Tune runs it on the restart) keeps every row."""
    from types import SimpleNamespace

    import pyarrow.fs
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    from search.tunefiles import KeepTrialHistory, tune_filesystem

    staging, remote = tmp_path / "staging" / "trial", tmp_path / "storage" / "trial"
    staging.mkdir(parents=True)
    remote.mkdir(parents=True)
    rows = '{"epoch": 1, "node_id": "worker"}\n'
    (staging / "result.json").write_text(rows)
    (staging / "progress.csv").write_text("epoch,node_id\n1,worker\n")
    (remote / "result.json").write_text("")  # the last upload was before epoch 1
    (remote / "progress.csv").write_text("epoch,node_id\n")
    fs = (
        tune_filesystem(str(tmp_path))
        if storage == "local"
        else pyarrow.fs.SubTreeFileSystem("/", pyarrow.fs.LocalFileSystem())
    )
    trial = SimpleNamespace(
        local_path=str(staging),
        checkpoint=object(),  # Tune copies back only for a trial restarting from a checkpoint
        storage=SimpleNamespace(storage_filesystem=fs, trial_fs_path=str(remote)),
    )

    def restart() -> None:  # what Tune's JSON and CSV loggers do as the retry starts
        JsonLoggerCallback()._restore_from_remote("result.json", trial)
        CSVLoggerCallback()._restore_from_remote("progress.csv", trial)

    KeepTrialHistory().on_trial_recover(iteration=1, trials=[trial], trial=trial)
    restart()
    assert (staging / "result.json").read_text() == rows
    assert (staging / "progress.csv").read_text() == "epoch,node_id\n1,worker\n"

    # Without it (Ray alone), the same restart loses the row: what the test above guards against.
    (remote / "result.json").write_text("")
    restart()
    assert (staging / "result.json").read_text() == ""


def test_both_phases_run_with_keep_trial_history() -> None:
    from search.config import load_search_config
    from search.tunefiles import KeepTrialHistory
    from search.tuners import _run_config

    cfg = load_search_config(SMOKE)
    for name in ("search", "retrain"):
        run = _run_config(cfg, "/tmp/unused-root", name, [])
        assert sum(isinstance(c, KeepTrialHistory) for c in run.callbacks) == 1


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _phase(folder: Path, files: dict[str, bytes], trials: int = 2) -> None:
    folder.mkdir(parents=True)
    for i in range(trials):
        (folder / f"00{i}-abc{i}").mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)


WHOLE = {
    "experiment_state-2026-01-01_00-00-00.json": json.dumps({"trial_data": []}).encode(),
    "searcher-state-2026-01-01_00-00-00.pkl": pickle.dumps({"searcher": 1}),
    "search_gen_state-2026-01-01_00-00-00.json": pickle.dumps({"counter": 2}),
    "callback-states-2026-01-01_00-00-00.pkl": pickle.dumps([]),
    "tuner.pkl": pickle.dumps({"tuner": 3}),
}


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ("none", None),
        ("no-state", "Tune's state of the search (search/experiment_state-*.json) is missing though 2 of its"),
        ("cut-state", "search/experiment_state-2026-01-01_00-00-00.json is damaged (not valid JSON"),
        ("cut-searcher", "search/searcher-state-2026-01-01_00-00-00.pkl is damaged (a cut-off pickle)"),
        ("cut-gen-state", "search/search_gen_state-2026-01-01_00-00-00.json is damaged (a cut-off pickle)"),
        ("no-tuner", None),  # rebuilt from the config (restore_mode), not refused
    ],
)
def test_check_resumable_refuses_what_tune_would_silently_restart(tmp_path: Path, damage: str, expected: str) -> None:
    from bss_model.errors import ConfigError
    from search.tunefiles import check_resumable, restore_mode

    files = dict(WHOLE)
    session = "2026-01-01_00-00-00"
    name = {"cut-state": f"experiment_state-{session}.json", "cut-searcher": f"searcher-state-{session}.pkl",
            "cut-gen-state": f"search_gen_state-{session}.json"}.get(damage)  # fmt: skip
    if name:
        files[name] = files[name][: len(files[name]) // 2]
    if damage == "no-state":
        del files["experiment_state-2026-01-01_00-00-00.json"]
    if damage == "no-tuner":
        del files["tuner.pkl"]
    _phase(tmp_path / "exp" / "search", files)
    if expected is None:
        check_resumable(str(tmp_path / "exp"), "search")
        assert restore_mode(str(tmp_path / "exp"), "search") == ("rebuild" if damage == "no-tuner" else "restore")
        return
    with pytest.raises(ConfigError, match=re.escape(expected)) as info:
        check_resumable(str(tmp_path / "exp"), "search")
    assert "nothing was changed" in str(info.value)


def test_a_damaged_tuner_pkl_is_kept_aside_and_rebuilt(tmp_path: Path) -> None:
    from search.tunefiles import restore_mode

    files = {**WHOLE, "tuner.pkl": WHOLE["tuner.pkl"][:5]}
    _phase(tmp_path / "exp" / "retrain", files)
    assert restore_mode(str(tmp_path / "exp"), "retrain") == "rebuild"
    assert (tmp_path / "exp" / "retrain" / "tuner.pkl.damaged").read_bytes() == WHOLE["tuner.pkl"][:5]
    assert not (tmp_path / "exp" / "retrain" / "tuner.pkl").exists()
    assert restore_mode(str(tmp_path / "nothing"), "search") == "new"


# --------------------------------------------------------------------------------------
# Slow: one experiment through a second driver, SIGTERM, a lost tuner.pkl and the resume; its copies, damaged


def fingerprint(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


def _err_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error: ")]


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> dict[str, Any]:
    """One tiny search (3 trials, 1 retrain seed), taken through:

    1. two more drivers on the same experiment while it runs (a new search, and a --resume): refused;
    2. SIGTERM to the first driver once a trial has finished, with trials left (to the driver only, as
       Kubernetes and `kill` send it);
    3. search/tuner.pkl deleted, then the resume command the driver printed, pasted: the search and the
       retrain complete.

    Copies of the folder after 2 (interrupted) and after 3 (finished) feed the damaged-file cases.
    """
    cwd = tmp_path_factory.mktemp("integrity")
    env = env_with(data_dir)
    args = search_args(cwd / "results", "one", *sets("retrain.seeds=1"))
    exp = cwd / "results" / "one"
    seen: dict[str, Any] = {"exp": exp, "cwd": cwd, "args": args, "env": env}
    with running(args, cwd, env, "1-first") as first:
        first.wait_until(lambda: "experiment:" in first.out, 120, "the first driver to start its experiment")
        seen["first_pid"] = first.pid
        seen["second"] = run_to_end(args, cwd, env, "2-second", timeout=120)
        seen["third"] = run_to_end([*args, "--resume"], cwd, env, "3-third", timeout=120)
        frozen: set[int] = set()
        first.wait_until(lambda: " finished: val MSE " in first.out, 300, "a trial to finish")
        seen["done"] = first.wait_until(lambda: freeze_unfinished(first, frozen) and finished(exp, "search"), 120,
                                        "the saved state to say a trial finished")  # fmt: skip
        os.kill(first.pid, signal.SIGTERM)
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        seen["term_rc"] = first.finish(180)
        seen["term_err"], seen["term_out"] = first.err, first.out
    seen["done_files"] = {name: (exp / "search" / name / "result.json").read_bytes() for name in seen["done"]}
    seen["ckpts_at_term"] = checkpoints(exp, "search")
    seen["interrupted"] = cwd / "interrupted"
    shutil.copytree(exp, seen["interrupted"] / "one", symlinks=True)

    (exp / "search" / "tuner.pkl").unlink()
    pasted = shlex.split(_err_lines(seen["term_err"])[-1].split("resume with `", 1)[1].rstrip("`"))
    seen["pasted"] = pasted
    assert pasted[:2] == ["python", "search/run.py"], pasted
    seen["resumed"] = run_to_end([RUN, *pasted[2:]], cwd, env, "4-resume", timeout=420)
    seen["finished"] = cwd / "finished"
    shutil.copytree(exp, seen["finished"] / "one", symlinks=True)
    return seen


@pytest.mark.slow
def test_two_drivers_on_one_experiment_the_second_is_refused(chain: dict[str, Any]) -> None:
    """Issue 21: a second `run.py --name same` started while the first ran was not refused; both wrote the folder,
    the first then said "interrupted with 2/3 trials finished" though all had, and report.json held only the
    second's trials. Now the second (as a new search, or as --resume) is refused in one line naming the first."""
    host = socket.gethostname()
    for proc in (chain["second"], chain["third"]):
        lines = proc.err.strip().splitlines()
        assert proc.p.returncode == 2 and len(lines) == 1, proc.tail()
        assert f"is in use by the driver with pid {chain['first_pid']} on {host}, started " in lines[0], lines[0]
        assert "Traceback" not in proc.err and "trial " not in proc.out, "the second driver ran nothing"
    report = read_json(chain["exp"] / "report.json")
    assert report["num_trials"] == report["num_completed"] == 3, "one search's trials, every one finished"


@pytest.mark.slow
def test_sigterm_is_ctrl_c_state_saved_resume_command_exit_143(chain: dict[str, Any]) -> None:
    """Issue 21: SIGTERM (Kubernetes' eviction, a spot machine's loss) aborted the driver with exit 134, a C++
    stack dump and no resume command. Now it is Ctrl-C: Tune saves its state, the driver prints the resume
    command (shell-quoted, so it pastes back), exits 143; the resume runs no finished trial again."""
    err = chain["term_err"]
    assert chain["term_rc"] == 143, err[-3000:]
    errors = _err_lines(err)
    # Trials left to resume: 1 or 2 of 3 finished (a second can end while the first one's end is being awaited,
    # before the others are frozen: seen once in a fresh-clone run), never fewer than the state said at the kill.
    said = re.search(r"search interrupted \(SIGTERM\) with (\d)/3 trials finished", errors[0]) if errors else None
    assert len(errors) == 1 and said, err[-3000:]
    assert len(chain["done"]) <= int(said.group(1)) < 3, (errors[0], chain["done"])
    assert "Traceback (most recent call last)" not in err
    # The driver's own stack dump: a line without a worker's "(pid=...)" prefix. (A Ray worker Tune stops while it
    # starts can print absl's SIGTERM notice, prefixed; the driver is the process that must not abort.)
    assert not [line for line in err.splitlines() if "SIGTERM received" in line and "pid=" not in line], err[-3000:]
    assert chain["pasted"][2:] == [*chain["args"][1:], "--resume"], "the printed command is the same command"

    resumed = chain["resumed"]
    assert resumed.p.returncode == 0, resumed.tail()
    exp = chain["exp"]
    for name, before in chain["done_files"].items():  # finished at the SIGTERM: not one epoch run again
        assert (exp / "search" / name / "result.json").read_bytes() == before
        assert [c for c in checkpoints(exp, "search") if name in c] == [c for c in chain["ckpts_at_term"] if name in c]
    report = read_json(exp / "report.json")
    assert report["num_trials"] == report["num_completed"] == 3 and len(report["seeds"]) == 1


@pytest.mark.slow
def test_a_lost_tuner_pkl_is_rebuilt_and_the_search_continues_without_rerunning_a_trial(
    chain: dict[str, Any],
) -> None:
    """Issue 21: --resume with search/tuner.pkl deleted silently restarted the search and reran finished trials
    (optuna.db ended with 6 trials against the report's 4). Tune writes tuner.pkl once, from the config: it is
    rebuilt from the experiment's own, and Tune's saved state restored."""
    exp = chain["exp"]
    assert "search/tuner.pkl is missing: rebuilding it from the experiment's config" in chain["resumed"].out
    assert len(list((exp / "search").glob("*/params.json"))) == 3, "no trial added"
    trials = check_study_matches_report(exp)
    assert len(trials) == 3 and all(t.state.name == "COMPLETE" for t in trials.values())


def _copy(chain: dict[str, Any], which: str, tmp_path: Path) -> Path:
    """A copy of the interrupted or the finished experiment, as results/one under tmp_path."""
    shutil.copytree(chain[which] / "one", tmp_path / "results" / "one", symlinks=True)
    return tmp_path / "results" / "one"


def _argv(tmp_path: Path, *items: str) -> list[str]:
    """The chain's search arguments (without run.py) for its copy under tmp_path, with more --set ``items``."""
    return search_args(tmp_path / "results", "one", *sets("retrain.seeds=1", *items))[1:]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ("search_config.yaml", "its search_config.yaml (the settings the experiment ran with) is missing"),
        ("experiment state", "Tune's state file search/experiment_state-"),
        ("experiment state deleted", "Tune's state of the search (search/experiment_state-*.json) is missing"),
    ],
)
def test_resume_of_a_damaged_experiment_is_refused_in_one_line_and_changes_nothing(
    chain: dict[str, Any], tmp_path: Path, damage: str, expected: str, no_ray: None,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """Issue 21: --resume with search_config.yaml deleted accepted another budget and overwrote the record; with
    Tune's experiment state damaged (a full disk cut it) it failed with Ray's "no search space has been defined"
    after starting the search again. Now each is refused before Ray starts, naming the file and the fix."""
    from search.run import main

    exp = _copy(chain, "interrupted", tmp_path)
    if damage == "search_config.yaml":
        (exp / "search_config.yaml").unlink()
    else:
        (state,) = (exp / "search").glob("experiment_state-*.json")
        if damage == "experiment state":
            state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
        else:
            state.unlink()
    before = fingerprint(exp)
    other = ("tune.num_samples=4",) if damage == "search_config.yaml" else ()  # another budget, with no record
    line = cli_error(main, [*_argv(tmp_path, *other), "--resume"], capsys)
    assert expected in line and "nothing was changed" in line, line
    after = fingerprint(exp)
    assert {k: after.get(k) for k in before} == before and set(after) - set(before) <= {"search.log"}


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["deleted", "cut"])
def test_a_finished_experiment_that_lost_best_model_pt_re_exports_it_exactly(
    chain: dict[str, Any], tmp_path: Path, damage: str, no_ray: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 21: --resume of a finished experiment whose best_model.pt was gone said "already finished" and left
    it gone. Now it is re-exported from the retrain's checkpoint of the report's best seed, as the run exported
    it, and nothing else is touched; a damaged one is kept beside it."""
    import torch

    from bss_model import checkpoint as ckpt
    from search.run import main

    exp = _copy(chain, "finished", tmp_path)
    original = exp / "best_model.pt"
    good = original.read_bytes()
    if damage == "deleted":
        original.unlink()
    else:
        original.write_bytes(good[:1000])
    before = fingerprint(exp)
    assert main([*_argv(tmp_path), "--resume"]) == 0
    out = capsys.readouterr().out
    assert "already finished: nothing was rerun or rewritten; rebuilt best_model.pt" in out, out
    assert "re-exported from the retrain's checkpoint of seed 1000" in out
    state, expected = ckpt.load(original), ckpt.load(chain["finished"] / "one" / "best_model.pt")
    assert state.keys() == expected.keys()
    assert all(torch.equal(state["model"][k], v) for k, v in expected["model"].items())
    assert {k: v for k, v in state.items() if k != "model"} == {k: v for k, v in expected.items() if k != "model"}
    after = fingerprint(exp)
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    assert changed == ({"best_model.pt"} if damage == "deleted" else {"best_model.pt", "best_model.pt.damaged"})
    if damage == "cut":
        assert (exp / "best_model.pt.damaged").read_bytes() == good[:1000]


@pytest.mark.slow
def test_a_finished_experiment_that_lost_its_summary_rebuilds_it_exactly(
    chain: dict[str, Any], tmp_path: Path, no_ray: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """search_summary.json deleted from a finished experiment: `run.py --resume` said "already finished" and
    `retrain.py --experiment` "the search has not finished": each sent the user to the other. It is rebuilt,
    byte for byte, from report.json's trial table."""
    from search.retrain import main as retrain_main
    from search.run import main

    exp = _copy(chain, "finished", tmp_path)
    summary = (exp / "search_summary.json").read_bytes()
    (exp / "search_summary.json").unlink()
    assert main([*_argv(tmp_path), "--resume"]) == 0
    assert "rebuilt search_summary.json (from report.json's trials)" in capsys.readouterr().out
    assert (exp / "search_summary.json").read_bytes() == summary
    assert retrain_main(["--experiment", str(exp)]) == 0


@pytest.mark.slow
def test_retrain_experiment_of_a_finished_search_rewrites_nothing(
    chain: dict[str, Any], tmp_path: Path, no_ray: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 21: `retrain.py --experiment <finished>` retrained nothing, yet rewrote report.json, and the search's
    wall_s was lost (97 s became 19 s). Now it leaves the experiment as the search wrote it; and `--seeds 3` after
    a 1-seed retrain, which printed "retrain interrupted with 1/3 ... resume with ... --seeds 3" forever, is
    refused in one line."""
    from search.retrain import main

    exp = _copy(chain, "finished", tmp_path)
    before = fingerprint(exp)
    wall = read_json(exp / "report.json")["wall_s"]
    assert main(["--experiment", str(exp)]) == 0
    assert "already finished: nothing was rerun or rewritten" in capsys.readouterr().out
    assert fingerprint(exp) == before and read_json(exp / "report.json")["wall_s"] == wall
    line = cli_error(main, ["--experiment", str(exp), "--seeds", "3"], capsys)
    assert "began with 1 seed(s) (1000): --seeds 3 cannot change it" in line, line
    assert f"--config {exp / 'retrain' / 'seed-1000' / 'config.yaml'} --seeds 3" in line, line
    assert fingerprint(exp) == before


# --------------------------------------------------------------------------------------
# Slow: a full disk, and a folder deleted, under a running search

FULL_DISK_RUN = str(Path(__file__).with_name("_full_disk_run.py"))


class SmallDisk:
    """A 64 MB tmpfs as the storage path (as root), else the injected fault of tests/_full_disk_run.py."""

    def __init__(self, path: Path) -> None:
        self.path, self.marker = path, path.parent / "disk-full"
        path.mkdir()
        mount = ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(path)]
        self.real = os.geteuid() == 0 and shutil.which("mount") is not None and subprocess.run(
            mount, capture_output=True).returncode == 0  # fmt: skip

    def args(self, args: list[str]) -> list[str]:
        return args if self.real else [FULL_DISK_RUN, str(self.marker), *args[1:]]

    def fill(self) -> None:
        if not self.real:
            self.marker.touch()
            return
        fd = os.open(self.path / "ballast", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:  # every block the disk has left, unbuffered
            for size in (1 << 20, 4096, 1):
                with contextlib.suppress(OSError):
                    while True:
                        os.write(fd, b"\0" * size)
        finally:
            os.close(fd)

    def free(self) -> None:
        (self.path / "ballast").unlink(missing_ok=True)
        self.marker.unlink(missing_ok=True)

    def unmount(self) -> None:
        if self.real:
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True)


@pytest.mark.slow
def test_a_full_disk_stops_the_search_in_one_line_and_resume_completes(tmp_path: Path, data_dir: Path) -> None:
    """Issue 21: a full disk under the storage path gave 28 tracebacks and exit 1, and left Tune's experiment
    state half-written; once space was freed, --resume failed with Ray's "no search space has been defined".
    Now the search stops at the first "No space left on device" with Tune's state saved whole, in one line
    (exit 75); after space is freed, --resume completes and runs no finished trial again."""
    disk = SmallDisk(tmp_path / "disk")
    try:
        env = env_with(data_dir)
        args = search_args(disk.path, "full", *sets("retrain.seeds=1"))
        exp = disk.path / "full"
        with running(disk.args(args), tmp_path, env, "1-fills") as proc:
            frozen: set[int] = set()
            proc.wait_until(lambda: " finished: val MSE " in proc.out, 300, "a trial to finish")
            done = proc.wait_until(lambda: freeze_unfinished(proc, frozen) and finished(exp, "search"), 120,
                                   "the saved state to say a trial finished")  # fmt: skip
            done_files = {name: (exp / "search" / name / "result.json").read_bytes() for name in done}
            disk.fill()
            for pid in frozen:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
            rc = proc.finish(300)
        errors = _err_lines(proc.err)
        assert rc == 75, proc.tail()
        # (The injected fault fills no real disk: the driver then says a disk is full, not the storage's own.)
        said = f"error: the storage of {exp} is full" if disk.real else "error: a disk the search writes to is full"
        assert len(errors) == 1 and errors[0].startswith(f"{said} (No space left on"), proc.err[-3000:]
        assert "resume with `" in errors[0] and errors[0].endswith("--resume`"), errors[0]
        assert "Traceback (most recent call last)" not in proc.err, proc.err[-3000:]
        assert not (exp / "search_summary.json").exists() and not (exp / "report.json").exists()
        # Tune's saved state is whole (it parses), and still says the trials finished before the fill finished.
        (state,) = (exp / "search").glob("experiment_state-*.json")
        saved = [json.loads(t) if isinstance(t, str) else t for t, _ in json.loads(state.read_text())["trial_data"]]
        status = {t["trial_id"]: t["status"] for t in saved}
        for before in done_files.values():
            assert status[json.loads(before.splitlines()[-1])["trial_id"]] == "TERMINATED"

        disk.free()
        proc = run_to_end([*disk.args(args), "--resume"], tmp_path, env, "2-resume", timeout=420)
        assert proc.p.returncode == 0, proc.tail()
        for name, before in done_files.items():
            assert (exp / "search" / name / "result.json").read_bytes() == before, "a finished trial ran again"
        report = read_json(exp / "report.json")
        assert report["num_trials"] == report["num_completed"] == 3 and len(report["seeds"]) == 1
    finally:
        disk.unmount()


def test_a_log_file_on_a_full_disk_says_so_once_and_closes_without_raising(capsys: pytest.CaptureFixture) -> None:
    """A log line written while the disk is full (/dev/full: every write ENOSPC) stays in the file's buffer, and
    closing the file flushed it again: the OSError came out of the command's `finally`, in place of the error
    it was reporting (the full-disk search above ended "no space left on the device" without its resume line)."""
    import logging

    from bss_model.io import log_file

    logger = logging.getLogger("bss")
    with pytest.raises(RuntimeError, match="the error being reported"), log_file(Path("/dev/full")):
        logger.warning("a line the disk cannot take")
        raise RuntimeError("the error being reported")
    err = capsys.readouterr().err
    assert err.count("notice: /dev/full can no longer be written") == 1, err
    assert all(h.__class__.__name__ != "_LogFile" for h in logger.handlers)


@pytest.mark.slow
def test_a_folder_deleted_under_a_running_search_ends_non_zero_in_one_line(tmp_path: Path, data_dir: Path) -> None:
    """Issue 21: deleting the experiment folder while the search ran ended with exit 0 and a report in which the
    trials had errored on storage. Now the driver notices (its lock file went with the folder), stops the
    search and ends with one line, exit 74, writing no report."""
    args = search_args(tmp_path / "results", "gone", *sets("retrain.seeds=1"))
    exp = tmp_path / "results" / "gone"
    with running(args, tmp_path, env_with(data_dir), "gone") as proc:
        proc.wait_until(lambda: checkpoints(exp, "search"), 300, "a trial to checkpoint")
        while exp.exists():  # Tune writes into it meanwhile: rmtree can meet a file that appeared mid-way
            shutil.rmtree(exp, ignore_errors=True)
        rc = proc.finish(240)
    errors = _err_lines(proc.err)
    assert rc == 74, proc.tail()
    assert len(errors) == 1 and f"the experiment folder {exp} was deleted or moved while this driver ran" in \
        errors[0], proc.err[-3000:]  # fmt: skip
    assert "Traceback (most recent call last)" not in proc.err, proc.err[-3000:]
    assert not (exp / "report.json").exists() and "report:" not in proc.out


# --------------------------------------------------------------------------------------
# SIGTERM and a full disk at the command line (the real signal: the chain below)


def test_sigterm_is_ctrl_c_inside_tune_and_exit_143_outside(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside tuner.fit() SIGTERM calls the SIGINT handler Tune installed (Tune saves its state and stops); outside
    it, it raises Terminated, which the entry points turn into exit 143."""
    from bss_model.errors import Terminated
    from search import guard

    calls = []
    monkeypatch.setitem(guard._state, "in_fit", True)
    before = signal.signal(signal.SIGINT, lambda signum, frame: calls.append(signum))
    try:
        guard.on_sigterm(signal.SIGTERM, None)
    finally:
        signal.signal(signal.SIGINT, before)
    assert calls == [signal.SIGINT] and guard.terminated()
    monkeypatch.setitem(guard._state, "in_fit", False)
    with pytest.raises(Terminated):
        guard.on_sigterm(signal.SIGTERM, None)


def test_the_commands_say_sigterm_and_a_full_disk_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    import errno

    from bss_model.errors import Terminated, cli_entry

    def failing(exc: BaseException) -> Any:
        @cli_entry
        def command() -> int:
            raise exc

        return command

    full = OSError(errno.ENOSPC, "No space left on device", "/x/report.json")
    said = "error: no space left on the device writing /x/report.json (No space left on device)"
    for exc, code, words in ((Terminated(), 143, "interrupted (SIGTERM)"), (full, 75, said)):
        with pytest.raises(SystemExit) as info:
            failing(exc)()
        err = capsys.readouterr().err
        assert info.value.code == code and err.count("\n") == 1 and err.startswith(words), err


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_an_interrupt_outside_tune_says_the_resume_command_once_there_is_an_experiment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], signal_name: str
) -> None:
    """Issue 21: SIGTERM (or Ctrl-C) outside tuner.fit() -- Ray starting, the evaluation after the retrain (which
    takes minutes on CPUs), the report -- printed a bare "interrupted (SIGTERM)", no resume command. Now the
    command is said as inside a fit, once the experiment has its settings; before that, "interrupted" alone."""
    import search.pipeline
    import search.run
    from bss_model.errors import Terminated

    exp = tmp_path / "results" / "exp"
    argv = ["--config", SMOKE, "--storage-path", str(tmp_path / "results"), "--name", "exp", *sets(*TINY)]
    for saved in (False, True):

        def stopped(*args: Any, saved: bool = saved) -> dict:
            if saved:  # as search_retrain_report writes it before the search
                (exp / "search_config.yaml").write_text("tune: {}\n")
            raise Terminated() if signal_name == "SIGTERM" else KeyboardInterrupt()

        monkeypatch.setattr(search.pipeline, "search_retrain_report", stopped)
        with pytest.raises(SystemExit) as info:
            search.run.main(argv)
        err = capsys.readouterr().err.strip()
        assert info.value.code == (143 if signal_name == "SIGTERM" else 130), err
        words = "interrupted (SIGTERM)" if signal_name == "SIGTERM" else "interrupted"
        if not saved:
            assert err == words, err
            continue
        assert err.count("\n") == 0 and err.startswith(f"error: {words}; what had finished is saved"), err
        assert shlex.split(err.split("resume with `", 1)[1].rstrip("`")) == [
            "python", "search/run.py", *argv, "--resume"]  # fmt: skip

    # The retrain of a config named directly, the same way.
    import search.retrain

    monkeypatch.setattr(search.pipeline, "retrain_report", stopped)
    argv = ["--config", str(Path(__file__).parents[1] / "configs" / "seed.yaml"), "--name", "exp",
            "--storage-path", str(tmp_path / "results"), "--seeds", "2"]  # fmt: skip
    with pytest.raises(SystemExit) as info:
        search.retrain.main(argv)
    err = capsys.readouterr().err.strip()
    assert info.value.code == (143 if signal_name == "SIGTERM" else 130), err
    assert shlex.split(err.split("resume with `", 1)[1].rstrip("`")) == [
        "python", "search/retrain.py", *argv, "--resume"]  # fmt: skip


def test_a_trial_traceback_from_a_deleted_folder_stops_the_experiment_as_lost(tmp_path: Path) -> None:
    """Issue 21 (a folder deleted under a running search): a trial whose checkpoint found no folder could be
    reported, with Ray's traceback, before the guard's watch (every 2 s) looked again, so the driver printed the
    trial's traceback before its one line. The guard now looks when a traceback comes, and drops it."""
    import logging

    from search import guard, lock

    root = tmp_path / "exp"
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep()
    ray_log = logging.getLogger("ray")
    ray_log.addHandler(handler)
    try:
        with lock.hold(str(root)):
            watch = guard.FitGuard(str(root))
            watch._asked = True  # no Tune here to interrupt
            with watch:
                logging.getLogger("ray.tune").error("a trial failed: Traceback (most recent call last): a fault")
                assert watch.reason is None and len(records) == 1  # the folder is there: the trial's own fault
                shutil.rmtree(root)
                logging.getLogger("ray.tune").error("Traceback (most recent call last): Unable to set up storage")
            assert watch.reason == "lost" and "was deleted or moved while this driver ran" in watch.detail
            assert len(records) == 1, [r.getMessage() for r in records]
    finally:
        ray_log.removeHandler(handler)


def test_a_temp_file_renamed_under_tunes_sync_is_not_a_console_traceback() -> None:
    """Tune's sync listed a trial's folder while bss_model.io wrote metrics.json through a temp file beside it, then
    failed to copy the temp file (renamed meanwhile) and logged that with a traceback: seen in a retrain's console
    (tests/test_search_e2e.py). That record is dropped; any other failed sync is not."""
    from search.guard import vanished_temp_file

    text = (
        "Saving experiment state to storage at '/r/e2e/retrain' failed with exception: \nTraceback (most recent call "
        "last):\n  ...\nFileNotFoundError: [Errno 2] Failed to open local file '/tmp/ray/session_1/artifacts/x/"
        "retrain/driver_artifacts/seed-1001/.metrics.json.55840c07.tmp'. Detail: [errno 2] No such file or directory"
    )
    assert vanished_temp_file(text)
    assert not vanished_temp_file(text.replace(".55840c07.tmp", ""))  # a real file gone: said
    assert not vanished_temp_file(text.replace("No such file or directory", "Permission denied"))
    assert not vanished_temp_file(text.replace("Saving experiment state to storage", "Uploading checkpoint"))


def test_ctrl_c_after_a_fit_is_an_interrupt_not_swallowed_by_tunes_stale_handler(tmp_path: Path) -> None:
    """CI (stop 26): a Ctrl-C that landed just after the budgeted search's fit ended (its last trial had finished)
    ended the job with exit 0. ``tune.run`` installs its SIGINT handler at the start of a fit and puts the old one
    back only when a signal comes: after a fit that ended by itself, Tune's handler stays, and the next Ctrl-C
    (the retrain being set up) only set the finished fit's event. The guard around each fit now puts back the
    handlers it found, so that Ctrl-C is a KeyboardInterrupt, which the commands turn into exit 130 and the
    resume line (search/guard.py: resume_said)."""
    from ray.tune.tune import _setup_signal_catching  # what tune.run calls to install its handlers

    from search import guard, lock

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGUSR1)
    try:
        with lock.hold(str(tmp_path / "exp")), guard.FitGuard(str(tmp_path / "exp")):
            interrupted = _setup_signal_catching()  # a fit's start; the fit then ends with no signal
        assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGUSR1)) == before
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
        assert not interrupted.is_set()  # the finished fit was not told
    finally:  # this pytest process keeps its own handlers whatever happened
        signal.signal(signal.SIGINT, before[0])
        signal.signal(signal.SIGUSR1, before[1])
