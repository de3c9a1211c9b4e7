"""Experiment integrity (issue 21): one driver per experiment, faults that keep the experiment resumable, and
files that are never silently lost, rerun or half-overwritten.

Fast: the resume lines, the lock and the S3 lease (against a real SeaweedFS server, tests/_s3util.py), the
--resume checks on damaged or missing files, gs:// without a network.
Slow (real tiny searches in subprocesses, tests/_searchutil.py): two drivers on one experiment, SIGTERM, a full
disk on a real tmpfs, a folder deleted under a running search, and one finished experiment copied per case of
a damaged file.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shlex
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from _searchutil import PY, SMOKE, TINY, Proc, cli_error, env_with, sets

# --------------------------------------------------------------------------------------
# The printed resume command, pasted back into a shell, is the same command


def _captured(monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    def capture(*args: Any) -> dict:
        seen["resume_cmd"] = args[-1]
        return {}

    monkeypatch.setattr(module, name, capture)
    return seen


def test_resume_lines_are_shell_quoted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 21: `resume with ...` joined the arguments with spaces, so one holding a space failed when pasted."""
    import search.retrain
    import search.run

    storage = str(tmp_path / "my results")
    argv = ["--config", SMOKE, "--storage-path", storage, "--name", "exp", *sets(*TINY, "base.train.lr=1e-3")]
    seen = _captured(monkeypatch, search.run, "search_retrain_report")
    assert search.run.main(argv) == 0
    assert shlex.split(seen["resume_cmd"]) == ["python", "search/run.py", *argv, "--resume"]

    seen = _captured(monkeypatch, search.retrain, "retrain_report")
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


def test_gs_storage_without_a_network_is_one_line_in_seconds(
    tmp_path: Path, no_ray: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from search.run import main

    # No credentials to find, and no metadata server to ask: as a laptop or a CI runner without a network.
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.setenv("GCE_METADATA_HOST", "127.0.0.1:1")
    monkeypatch.setenv("GCE_METADATA_ROOT", "127.0.0.1:1")
    monkeypatch.chdir(tmp_path)
    t0 = time.monotonic()
    line = cli_error(main, ["--config", SMOKE, "--storage-path", "gs://bss-test/exp", "--name", "g", *sets(*TINY)],
                     capsys)  # fmt: skip
    took = time.monotonic() - t0
    assert line.startswith("error: storage gs://bss-test/exp/g ") and "credentials" in line, line
    assert took < 60, f"{took:.0f} s"


# --------------------------------------------------------------------------------------
# Tune's own files: written whole, and checked before --resume trusts them


COPY_UNDER_LIMIT = """
import resource, signal, sys
import pyarrow.fs
from search.tunefiles import tune_filesystem
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
pyarrow.fs.copy_files(sys.argv[2], sys.argv[3], destination_filesystem=tune_filesystem(sys.argv[3]))
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
