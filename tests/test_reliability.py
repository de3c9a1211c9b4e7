"""Reliability under real faults (issue 4): killed drivers, Ctrl-C, failing and killed workers, divergence,
a lost node, crashes mid-write, and bad input.

The fault tests run tiny searches (3 trials x 2 epochs x 20 steps, 2 retrain seeds) in subprocesses and
inject real faults: SIGKILL/SIGINT to real processes, an exception inside train(), a learning rate that
really diverges, a Ray node whose processes are SIGKILLed. The bad-input tests call the real CLI entry
points in-process with ``ray.init`` booby-trapped, so "nothing started" is checked, not assumed.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from _searchutil import (
    EPOCHS,
    FAULT_LRS,
    PY,
    SMOKE,
    STEPS,
    TINY,
    alive,
    check_study_matches_report,
    checkpoints,
    children_of,
    cli_error,
    env_with,
    faulty_search_once,
    finished,
    free_port,
    freeze_unfinished,
    read_json,
    results,
    run_to_end,
    running,
    search_args,
    sets,
    study_trials,
    trainer_event_files,
    write_config,
)

NUM_SAMPLES, SEEDS = 3, [1000, 1001]


def report_rows(exp: Path) -> dict[str, dict[str, Any]]:
    return {t["trial_id"]: t for t in read_json(exp / "report.json")["trials"]}


# --------------------------------------------------------------------------------------
# The driver dies: SIGKILL mid-search, Ctrl-C, SIGKILL mid-retrain -- each followed by --resume


CHAIN_SEEDS = [1000, 1001, 1002]


@pytest.fixture(scope="module")
def crash_chain(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> dict[str, Any]:
    """One experiment taken through three interruptions, resumed after each; returns what was seen.

    1. SIGKILL the driver once a trial has finished (the rest still running);
    2. ``--resume``, then SIGINT to its process group (a terminal's Ctrl-C) once training resumed;
    3. ``--resume``, SIGKILL once one retrain seed has finished (seeds run one at a time here);
    4. ``--resume`` to the end.
    """
    cwd = tmp_path_factory.mktemp("chain")
    env = env_with(data_dir)
    # Three longer seeds, one at a time: "finished" waits for Tune's lazily saved state (seconds),
    # and the kill must still find a seed unfinished after that wait.
    args = search_args(
        cwd / "results",
        "chain",
        *sets(
            "retrain.max_concurrent=1",
            f"retrain.seeds={len(CHAIN_SEEDS)}",
            "retrain.overrides={train.samples_per_epoch: 1920}",  # 60 steps x batch 32
        ),
    )
    exp = cwd / "results" / "chain"
    seen: dict[str, Any] = {"exp": exp}

    with running(args, cwd, env, "1-kill-search") as proc:
        # Once a trial has finished, the others are frozen until the saved state says it finished
        # (freeze_unfinished), so the kill finds trials left however fast they run; they go on at the kill.
        frozen: set[int] = set()
        proc.wait_until(lambda: " finished: val MSE " in proc.out, 180, "a trial to finish its budget")
        done = proc.wait_until(lambda: freeze_unfinished(proc, frozen) and finished(exp, "search"), 120,
                               "the saved state to say a trial finished")  # fmt: skip
        ray_procs = children_of(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)  # the driver only: what its Ray processes do is part of the test
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        proc.p.wait()
        seen["search_done"] = {name: (exp / "search" / name / "result.json").read_bytes() for name in done}
        seen["search_ckpts"] = checkpoints(exp, "search")
        seen["search_results_at_kill"] = results(exp, "search")
        seen["summary_at_kill"] = (exp / "search_summary.json").exists()
        seen["study_at_kill"] = {k: t.state.name for k, t in study_trials(exp).items()}  # written as trials end
        # Ray's own processes must die with their driver, above all the trial workers (a worker left
        # training would write into the trial folders the resumed run uses). Ray's dashboard and
        # runtime-env agents poll for their raylet and exit on their own within about a minute.
        deadline = time.monotonic() + 30
        lingering = ray_procs
        while lingering and time.monotonic() < deadline:
            time.sleep(0.5)
            lingering = {p for p in ray_procs if alive(p) and b"Agent" not in _cmdline(p)}
        seen["lingering"] = {p: _cmdline(p) for p in lingering}

    with running([*args, "--resume"], cwd, env, "2-sigint") as proc:
        before = checkpoints(exp, "search")
        proc.wait_until(lambda: checkpoints(exp, "search") != before, 180, "the resumed search to checkpoint")
        os.killpg(proc.pid, signal.SIGINT)
        seen["sigint_rc"], seen["sigint_err"] = proc.finish(120), proc.err

    with running([*args, "--resume"], cwd, env, "3-kill-retrain") as proc:
        done = proc.wait_until(lambda: finished(exp, "retrain"), 240, "a retrain seed to finish")
        os.kill(proc.pid, signal.SIGKILL)
        proc.p.wait()
        seen["retrain_done"] = {name: (exp / "retrain" / name / "result.json").read_bytes() for name in done}
        seen["retrain_results_at_kill"] = results(exp, "retrain")
        seen["report_at_kill"] = (exp / "report.json").exists()

    seen["final"] = run_to_end([*args, "--resume"], cwd, env, "4-resume")
    return seen


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


@pytest.mark.slow
def test_driver_sigkill_mid_search_then_resume_keeps_finished_trials(crash_chain: dict[str, Any]) -> None:
    exp, done = crash_chain["exp"], crash_chain["search_done"]
    at_kill = crash_chain["search_results_at_kill"]
    assert 1 <= len(done) < NUM_SAMPLES and not crash_chain["summary_at_kill"], "the kill must land mid-search"
    assert not crash_chain["lingering"], f"Ray processes outlived their SIGKILLed driver: {crash_chain['lingering']}"
    final = crash_chain["final"]
    assert final.p.returncode == 0, final.tail()

    report, summary = read_json(exp / "report.json"), read_json(exp / "search_summary.json")
    assert report["num_trials"] == summary["num_trials"] == NUM_SAMPLES == len(report["trials"])
    assert len(list((exp / "search").glob("*/params.json"))) == NUM_SAMPLES, "a resume must not add trials"
    rows = report_rows(exp)
    for name, before in done.items():
        last = at_kill[name][-1]
        # Not rerun: same result file, same checkpoints, the same val MSE in the report.
        assert (exp / "search" / name / "result.json").read_bytes() == before
        assert [c for c in checkpoints(exp, "search") if name in c] == [
            c for c in crash_chain["search_ckpts"] if name in c
        ]
        assert rows[last["trial_id"]]["val_mse"] == last["val_mse"]
        assert rows[last["trial_id"]]["status"] == "completed"


@pytest.mark.slow
def test_the_optuna_study_after_a_kill_and_resumes_holds_every_trial_once(crash_chain: dict[str, Any]) -> None:
    """The study is written while the search runs (the trials finished before the kill are in it at the kill),
    and after three interruptions and resumes it matches report.json trial by trial, each trial once."""
    exp = crash_chain["exp"]
    done_ids = {crash_chain["search_results_at_kill"][name][-1]["trial_id"] for name in crash_chain["search_done"]}
    at_kill = crash_chain["study_at_kill"]
    assert done_ids <= set(at_kill), at_kill
    assert all(at_kill[i] == "COMPLETE" for i in done_ids)
    trials = check_study_matches_report(exp)
    assert len(trials) == NUM_SAMPLES and all(t.state.name == "COMPLETE" for t in trials.values())
    assert all(list(t.intermediate_values) == list(range(1, EPOCHS + 1)) for t in trials.values())


@pytest.mark.slow
def test_sigint_exits_130_with_the_resume_command_and_resume_completes(crash_chain: dict[str, Any]) -> None:
    err = crash_chain["sigint_err"]
    assert crash_chain["sigint_rc"] == 130, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "interrupted" in errors[0] and "--resume" in errors[0], err[-3000:]
    assert "Traceback" not in err
    # The trials Ctrl-C stopped were resumed and ran their budget: none counted as finished early.
    report = read_json(crash_chain["exp"] / "report.json")
    assert report["num_completed"] == NUM_SAMPLES and report["num_stopped_early"] == 0
    assert all(t["status"] == "completed" and t["epochs"] == EPOCHS for t in report["trials"])


@pytest.mark.slow
def test_driver_sigkill_mid_retrain_then_resume_keeps_finished_seeds(crash_chain: dict[str, Any]) -> None:
    exp, done = crash_chain["exp"], crash_chain["retrain_done"]
    assert 1 <= len(done) < len(CHAIN_SEEDS) and not crash_chain["report_at_kill"], "the kill must land mid-retrain"
    report = read_json(exp / "report.json")
    assert report["seeds"] == CHAIN_SEEDS and len(report["test_mse_per_seed"]) == len(CHAIN_SEEDS)
    per_seed = read_json(exp / "evaluation.json")["evaluation"]["seeds"]
    for name, before in done.items():
        assert (exp / "retrain" / name / "result.json").read_bytes() == before, "a finished seed was recomputed"
        seed_result = crash_chain["retrain_results_at_kill"][name][-1]
        seed = seed_result["config"]["train.seed"]
        # Scored once, after every seed finished, by the evaluation step: the report takes the figure from it.
        assert report["test_mse_per_seed"][CHAIN_SEEDS.index(seed)] == per_seed[str(seed)]["test_mse_mean"]
        assert report["val_mse_per_seed"][CHAIN_SEEDS.index(seed)] == seed_result["val_mse"]
    assert not report["retrain_errors"]
    assert (exp / "best_model.pt").stat().st_size > 0


# --------------------------------------------------------------------------------------
# Worker faults and divergence (one search, shared with test_tensorboard: see _searchutil.faulty_search)


@pytest.fixture(scope="session")
def faulty_search(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> dict[str, Any]:
    return faulty_search_once(tmp_path_factory, data_dir)


@pytest.mark.slow
def test_failed_and_killed_workers_resume_from_their_checkpoints(faulty_search: dict[str, Any]) -> None:
    exp = faulty_search["exp"]
    assert faulty_search["marker"].exists(), "the injected fault never fired"
    report = read_json(exp / "report.json")
    assert report["num_trials"] == NUM_SAMPLES
    assert report["num_errored"] == report["num_diverged"] == 1, "only the divergent trial may end errored"
    errors = {p.parent.name: p.read_text() for p in (exp / "search").glob("*/error.txt")}
    faulted = [name for name, text in errors.items() if "injected fault at epoch 2" in text]
    assert len(faulted) == 1, errors
    killed = faulty_search["killed_trial"]
    assert "The actor died unexpectedly" in errors.get(killed, ""), errors.get(killed)
    rows = report_rows(exp)
    for name in {faulted[0], killed}:
        last = results(exp, "search")[name][-1]
        # Retried in a new process from the epoch-1 checkpoint: only epoch 2 ran after the restore.
        assert last["epoch"] == last["training_iteration"] == EPOCHS and last["step"] == EPOCHS * STEPS
        assert last["iterations_since_restore"] == 1
        assert rows[last["trial_id"]]["status"] == "completed"
        # Both attempts are on record: the failed one's epoch-1 row survives the retry (Tune copies the
        # trial's result.json back from storage when it restarts it, and storage may not have that row yet).
        history = results(exp, "search")[name]
        assert [r["epoch"] for r in history] == list(range(1, EPOCHS + 1)), history
        assert history[0]["pid"] != last["pid"]
    assert results(exp, "search")[killed][-1]["pid"] != faulty_search["killed_pid"]


@pytest.mark.slow
def test_the_optuna_study_of_a_search_with_faults(faulty_search: dict[str, Any]) -> None:
    """Retried trials are COMPLETE with one value per epoch; the divergent one is FAIL with its reason."""
    exp = faulty_search["exp"]
    trials = check_study_matches_report(exp)
    failed = [t for t in trials.values() if t.state.name == "FAIL"]
    assert len(failed) == 1 and failed[0].user_attrs["status"] == "diverged"
    assert "non-finite" in failed[0].user_attrs["error"] and failed[0].params["train.lr"] == FAULT_LRS["diverges"]
    complete = [t for t in trials.values() if t.state.name == "COMPLETE"]
    assert len(complete) == NUM_SAMPLES - 1
    assert all(list(t.intermediate_values) == list(range(1, EPOCHS + 1)) for t in complete)


@pytest.mark.slow
def test_divergent_trial_is_reported_and_never_chosen(faulty_search: dict[str, Any]) -> None:
    exp = faulty_search["exp"]
    report = read_json(exp / "report.json")
    diverged = [t for t in report["trials"] if t["status"] == "diverged"]
    assert len(diverged) == 1 and "non-finite" in diverged[0]["error"]
    assert diverged[0]["params"]["train.lr"] == FAULT_LRS["diverges"]
    assert report["best_params"]["train.lr"] != FAULT_LRS["diverges"]
    assert len(report["test_mse_per_seed"]) == len(SEEDS), "the retrain must still run"
    # Tune retried it (max_failures); each retry failed at once on the checkpoint's divergence marker
    # instead of training again: one TensorBoard event file (one training run) and one checkpoint.
    (folder,) = [p for p in (exp / "search").iterdir() if p.name.endswith(f"-{diverged[0]['trial_id']}")]
    assert (folder / "error.txt").read_text().count("TrialDiverged") >= 2
    assert len(trainer_event_files(folder)) == 1
    assert [p.name for p in folder.glob("checkpoint_*")] == ["checkpoint_000000"]


# --------------------------------------------------------------------------------------
# A worker node is lost mid-search


@pytest.mark.slow
def test_losing_a_worker_node_mid_search(tmp_path: Path, data_dir: Path) -> None:
    """Two Ray nodes (1 CPU each) on this machine; SIGKILL every process of the worker node while it
    trains a trial. The trial must be retried on the head and the experiment complete."""
    # Let the GCS notice a dead node in ~3 s instead of ~15 s.
    env = env_with(data_dir, RAY_health_check_period_ms="1000", RAY_health_check_failure_threshold="3")
    cluster = subprocess.Popen(
        [PY, str(Path(__file__).with_name("_searchutil.py")), "cluster", str(free_port())],
        cwd=tmp_path, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        nodes = json.loads(cluster.stdout.readline())
        exp = tmp_path / "results" / "nodes"
        # Four epochs, not two: after the worker's first checkpoint the trial must still have epochs
        # left when the kill lands (with two, a fast worker sometimes finished first: no failure).
        epochs = 2 * EPOCHS
        longer = sets("retrain.seeds=1", f"base.train.epochs={epochs}", f"tune.grace_period={epochs}")
        args = search_args(tmp_path / "results", "nodes", *longer, "--address", nodes["address"])
        with running(args, tmp_path, env, "nodes") as proc:

            def trial_on_worker() -> str | None:
                for pid in children_of(nodes["worker_raylet"]):
                    try:
                        cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
                    except OSError:
                        continue
                    if (exp / "search" / cwd.name / "checkpoint_000000").is_dir():
                        return cwd.name
                return None

            trial = proc.wait_until(trial_on_worker, 240, "a trial on the worker node to checkpoint")
            cluster.stdin.write("kill\n")
            cluster.stdin.flush()
            assert cluster.stdout.readline().strip() == "killed"
            assert not alive(nodes["worker_raylet"])
            rc = proc.finish(300)
        assert rc == 0, proc.tail()
        report = read_json(exp / "report.json")
        assert report["num_trials"] == report["num_completed"] == NUM_SAMPLES and report["num_errored"] == 0
        assert len(report["test_mse_per_seed"]) == 1
        error = (exp / "search" / trial / "error.txt").read_text()
        assert "Failure # 1" in error and "Failure # 2" not in error
        last = results(exp, "search")[trial][-1]
        assert last["epoch"] == epochs and last["node_id"] == nodes["head"], "retried on the surviving head"
    finally:
        cluster.stdin.close()
        try:
            cluster.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(cluster.pid, signal.SIGKILL)
            cluster.wait()


# --------------------------------------------------------------------------------------
# Atomic outputs. (Downloads: tests/test_data.py::test_download_file_bad_checksum_leaves_nothing and
# ::test_download_file_failure_keeps_existing_file cover bss_model.data.download_file.)


def test_a_failed_write_keeps_the_previous_report_and_model(tmp_path: Path) -> None:
    import torch

    from bss_model import checkpoint as ckpt
    from bss_model.io import atomic_write, atomic_write_json

    report, model = tmp_path / "report.json", tmp_path / "best_model.pt"
    atomic_write_json(report, {"test_mse_mean": 1.0})
    ckpt.save({"model": {"w": torch.ones(3)}}, model)
    before = {p: p.read_bytes() for p in (report, model)}

    def half_then_fail(f: Any) -> None:
        f.write(b'{"test_mse_')
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_write(report, half_then_fail)
    with pytest.raises(Exception):  # noqa: B017 - torch.save fails mid-stream on an unpicklable value
        ckpt.save({"model": {"w": torch.zeros(3)}, "oops": lambda: None}, model)
    assert {p: p.read_bytes() for p in (report, model)} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best_model.pt", "report.json"], "temp file left"
    assert torch.equal(ckpt.load(model)["model"]["w"], torch.ones(3))


def test_a_process_killed_mid_write_leaves_the_previous_file(tmp_path: Path) -> None:
    """SIGKILL inside the write (no except clause runs): the target is still the old, whole file."""
    report = tmp_path / "report.json"
    report.write_text('{"good": true}\n')
    code = (
        "import os, signal, sys; from pathlib import Path; from bss_model.io import atomic_write\n"
        "def crash(f):\n    f.write(b'{\"partial'); f.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
        "atomic_write(Path(sys.argv[1]), crash)"
    )
    proc = subprocess.run([PY, "-c", code, str(report)], capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert report.read_text() == '{"good": true}\n'
    # What a kill can leave is a hidden temp file beside it, never a half-written report.json.
    assert all(p.name.startswith(".report.json.") and p.suffix == ".tmp" for p in tmp_path.iterdir() if p != report)


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_outputs_get_the_users_umask(tmp_path: Path, umask: int) -> None:
    """Issue 21: every atomically written output (best_model.pt, the reports, search_config.yaml) was mode 0600
    (tempfile.mkstemp's), so other users of a shared NFS experiment folder could not read them."""
    import torch

    from bss_model.io import atomic_torch_save, atomic_write_all, atomic_write_json, atomic_write_text

    before = os.umask(umask)
    try:
        atomic_write_json(tmp_path / "report.json", {"a": 1})
        atomic_write_text(tmp_path / "search_config.yaml", "a: 1\n")
        atomic_torch_save({"w": torch.ones(1)}, tmp_path / "best_model.pt")
        atomic_write_all([(tmp_path / "panel.png", b"png")])
        (tmp_path / "plain.txt").write_text("as any tool writes it")
    finally:
        os.umask(before)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == dict.fromkeys(modes, 0o666 & ~umask), modes


# --------------------------------------------------------------------------------------
# Bad input: one line "error: ...", exit 2, no traceback, Ray never started, nothing overwritten.
# The real CLI mains run in-process (seconds, not a Python start each) with ray.init booby-trapped.


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def existing(tmp_path: Path, data_dir: Path, no_ray: None) -> Path:
    """The storage folder of an experiment "exp" as a search leaves it: resolved config and outputs."""
    from search import storage
    from search.config import load_search_config
    from search.pipeline import resolve_data_dir

    store = tmp_path / "store"
    cfg = load_search_config(SMOKE, [*TINY, f"tune.storage_path={store}", "tune.name=exp"])
    resolve_data_dir(cfg.base, None)
    root = storage.prepare_experiment(cfg, resume=False)
    storage.save_resolved_config(cfg, root)
    for name, data in {"report.json": b'{"test_mse_mean": 0.01}\n', "best_model.pt": os.urandom(256)}.items():
        (Path(root) / name).write_bytes(data)
    return store


def _space(**dims: Any) -> Any:
    """Extra arguments: a copy of the smoke config with these space dimensions."""

    def edit(cfg: dict[str, Any]) -> None:
        cfg["space"].update(dims)

    return lambda t, d: ["--config", str(write_config(t / "space.yaml", edit))]


def _data_copy(tmp: Path, data_dir: Path, damage: str) -> Path:
    """A data folder of links to the real files, except MNIST's train labels, damaged."""
    for ds in ("mnist", "fashion-mnist"):
        (tmp / "data" / ds).mkdir(parents=True)
        for f in (data_dir / ds).iterdir():
            (tmp / "data" / ds / f.name).symlink_to(f)
    name = "train-labels-idx1-ubyte.gz"
    target, raw = tmp / "data" / "mnist" / name, (data_dir / "mnist" / name).read_bytes()
    target.unlink()
    if damage == "truncated":
        target.write_bytes(raw[: len(raw) // 2])
    else:  # a well-formed file with one label changed: only the checksum can tell
        content = bytearray(gzip.decompress(raw))
        content[-1] = (content[-1] + 1) % 10
        target.write_bytes(gzip.compress(bytes(content)))
        assert hashlib.md5(content).hexdigest() != hashlib.md5(gzip.decompress(raw)).hexdigest()
    return tmp / "data"


# (extra arguments, or a function of (tmp_path, data_dir) giving them; a text the error must contain)
BAD_SEARCH_INPUTS: dict[str, tuple[Any, str]] = {
    "yaml-syntax": (lambda t, d: ["--config", _write(t / "bad.yaml", "base: {train: {epochs: 2\n")], "not valid YAML"),
    "unknown-key": (sets("base.train.epocs=3"), "did you mean 'base.train.epochs'?"),
    "wrong-type": (sets("base.train.epochs=many"), "wrong type"),
    "lr-zero": (sets("base.train.lr=0"), "base.train.lr=0.0 is out of range"),
    "lr-negative": (sets("base.train.lr=-1e-3"), "base.train.lr=-0.001 is out of range"),
    "range-low-above-high": (_space(**{"train.lr": {"loguniform": [3e-3, 3e-4]}}), "low > high"),
    "empty-choice": (_space(**{"model.filters": {"choice": []}}), "empty list"),
    "filters-0-base": (sets("base.model.filters=0"), "model.filters=0 is out of range"),
    "filters-0-space-endpoint": (
        _space(**{"model.filters": {"int": [0, 8]}}),
        "space.model.filters: model.filters=0 is out of range",
    ),
    "depth-6": (sets("base.model.depth=6"), "model.depth=6 is out of range"),
    "num-samples-0": (sets("tune.num_samples=0"), "tune.num_samples=0 is out of range"),
    "data-dir-missing": (["--data-dir", "/nonexistent/bss-data"], "does not exist"),
    "data-truncated-gz": (lambda t, d: ["--data-dir", str(_data_copy(t, d, "truncated"))], "truncated or corrupt gzip"),
    "data-wrong-checksum": (lambda t, d: ["--data-dir", str(_data_copy(t, d, "checksum"))], "checksum mismatch"),
    "resume-other-space": (
        _space(**{"model.filters": {"choice": [4, 8]}}),
        "(space.model.filters.choice: experiment [4, 8, 12], now [4, 8])",
    ),
    "resume-missing": (["--name", "no-such-experiment"], "no experiment at"),
    "storage-under-proc": (["--storage-path", "/proc/bss-search", "--no-resume"], "cannot be written"),
    "storage-under-a-file": (
        lambda t, d: ["--storage-path", _write(t / "a-file", "x") + "/sub", "--no-resume"],
        "cannot be written",
    ),
    "existing-name-without-resume": (["--no-resume"], "already exists"),
    "unreachable-address": (["--address", "127.0.0.1:1"], "cannot reach the Ray cluster at 127.0.0.1:1"),
}


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("case", list(BAD_SEARCH_INPUTS))
def test_bad_search_input_is_one_line_before_ray(
    case: str, existing: Path, tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from search.run import main

    extra, expected = BAD_SEARCH_INPUTS[case]
    extra = extra(tmp_path, data_dir) if callable(extra) else list(extra)
    argv = ["--config", SMOKE, "--storage-path", str(existing), "--name", "exp", *sets(*TINY), "--resume", *extra]
    if "--no-resume" in argv:
        argv = [a for a in argv if a not in ("--resume", "--no-resume")]
    before = snapshot(existing)
    assert expected in cli_error(main, argv, capsys)
    after = snapshot(existing)
    assert {k: after.get(k) for k in before} == before, "an existing file was touched"
    assert set(after) - set(before) <= {"exp/search.log"}, "only the log may grow"


def test_junk_checkpoint_is_refused_in_one_line(tmp_path: Path, no_ray: None, capsys: pytest.CaptureFixture) -> None:
    import torch

    from bss_model.evaluate import main

    junk, foreign = tmp_path / "junk.pt", tmp_path / "foreign.pt"
    junk.write_bytes(b"\x00" + random.Random(0).randbytes(4095))  # fixed garbage: no pickle opcode asks for code
    torch.save({"weights": torch.ones(2)}, foreign)
    line = cli_error(main, ["--checkpoint", str(junk)], capsys)
    assert str(junk) in line and "not a readable checkpoint" in line
    assert "is not a bss-search checkpoint" in cli_error(main, ["--checkpoint", str(foreign)], capsys)
    assert "no checkpoint at" in cli_error(main, ["--checkpoint", str(tmp_path / "absent")], capsys)


def test_resume_with_an_incompatible_config_is_refused_and_leaves_the_run_alone(
    tmp_path: Path, data_dir: Path, no_ray: None, capsys: pytest.CaptureFixture[str]
) -> None:
    from bss_model.config import load_config, save_config
    from bss_model.train import main, train

    run = tmp_path / "runs" / "000-tiny"
    cfg = load_config(None, ["model.variant=tiny", "train.epochs=1", "train.samples_per_epoch=64", "train.threads=1",
                             "data.val_pairs=10", "train.tensorboard=false", f"data.dir={data_dir}"])  # fmt: skip
    train(cfg, out_dir=run)
    save_config(cfg, tmp_path / "tiny.yaml")
    before = snapshot(run)
    argv = ["--config", str(tmp_path / "tiny.yaml"), "--resume", str(run), "--set", "model.filters=16"]
    assert "(model.filters: run 8, asked 16)" in cli_error(main, argv, capsys)
    after = snapshot(run)
    assert {k: after.get(k) for k in before} == before, "the run's files were changed by a refused resume"
    assert set(after) - set(before) <= {"train.log"}


# --------------------------------------------------------------------------------------
# A run that never started a trial leaves nothing that blocks its name


def test_a_run_that_failed_before_its_first_trial_leaves_its_name_free(
    tmp_path: Path, data_dir: Path, no_ray: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ray failing to start, then an ImportError when the search starts: each rerun under the same name
    gets as far as its own failure, never "already exists"; nothing the earlier runs wrote is deleted."""
    import ray

    from search import tuners
    from search.run import main

    store = tmp_path / "store"
    exp = store / "exp"
    argv = ["--config", SMOKE, "--storage-path", str(store), "--name", "exp", *sets(*TINY)]

    def ray_fails(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("Ray failed to start (injected)")

    monkeypatch.setattr(ray, "init", ray_fails)
    with pytest.raises(RuntimeError, match="Ray failed to start"):
        main(argv)
    assert (exp / "search.log").exists(), "the failed run leaves its log"

    def import_error(*args: Any, **kwargs: Any) -> None:
        raise ImportError("No module named 'optuna' (injected)")

    monkeypatch.setattr(ray, "init", lambda *args, **kwargs: None)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(tuners, "run_search", import_error)
    (exp / "search").mkdir()
    (exp / "search" / "tuner.pkl").write_bytes(b"what Tune writes before its first trial")
    for _ in range(2):  # the second rerun finds the config and Tune leftovers of the first
        with pytest.raises(ImportError, match="No module named 'optuna'"):
            main(argv)
    assert (exp / "search_config.yaml").exists() and (exp / "search" / "tuner.pkl").exists()
    assert (exp / "search.log").exists()


@pytest.mark.parametrize(
    "trace",
    ["search/train_trial_ab12c_0_lr=0.001/", "search/experiment_state-2026-01-01_00-00-00.json",
     "retrain/train_trial_ab12c_00000_0_seed=1000/", "search_summary.json", "report.json", "best_model.pt"],
)  # fmt: skip
def test_a_run_that_started_a_trial_keeps_its_name(
    trace: str, tmp_path: Path, data_dir: Path, no_ray: None, capsys: pytest.CaptureFixture[str]
) -> None:
    from search.run import main

    exp = tmp_path / "store" / "exp"
    (exp / trace.rstrip("/")).parent.mkdir(parents=True, exist_ok=True)
    if trace.endswith("/"):
        (exp / trace).mkdir()
    else:
        (exp / trace).write_text("{}")
    before = snapshot(exp)
    argv = ["--config", SMOKE, "--storage-path", str(tmp_path / "store"), "--name", "exp", *sets(*TINY)]
    assert "already exists" in cli_error(main, argv, capsys)
    assert snapshot(exp) == before
