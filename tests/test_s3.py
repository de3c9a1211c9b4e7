"""Object storage (issue 17), against a real S3-compatible server: SeaweedFS on 127.0.0.1 (tests/_s3util.py),
configured only through the standard AWS_* environment variables.

Fast: URIs from Ray's scheme-less paths, the export of best_model.pt from an s3:// checkpoint, the
experiment's files read back from storage with an empty local mirror, and bad storage settings
(unreachable endpoint, missing bucket, wrong or missing credentials) as one line before Ray starts.
Slow: a search on S3 whose driver is SIGKILLed, resumed from another folder, then loses its S3 server
mid-trial, and completes on a resume once the server is back -- no finished trial run again.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _s3util import BUCKET, WeedServer, checkpoint_dirs, s3_finished, s3_json_lines, s3_tree, weed_server
from _searchutil import (
    EPOCHS,
    PY,
    SMOKE,
    TINY,
    Proc,
    cli_error,
    env_with,
    free_port,
    freeze_unfinished,
    run_to_end,
    search_args,
    sets,
)

NUM_SAMPLES = 3


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WeedServer]:
    with weed_server(tmp_path_factory.mktemp("weed")) as server:
        server.make_bucket()
        yield server


@pytest.fixture
def aws_env(s3: WeedServer, monkeypatch: pytest.MonkeyPatch) -> WeedServer:
    """This process pointed at the server the standard way (the environment), and nothing else."""
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    return s3


# --------------------------------------------------------------------------------------
# URIs


def test_uri_of_gives_ray_paths_on_object_storage_their_scheme() -> None:
    import pyarrow.fs

    from search.storage import uri_of

    s3 = pyarrow.fs.S3FileSystem(region="us-east-1", endpoint_override="http://127.0.0.1:1")
    assert uri_of("bkt/exp/retrain/t/checkpoint_000001", s3) == "s3://bkt/exp/retrain/t/checkpoint_000001"
    assert uri_of("s3://bkt/x", s3) == "s3://bkt/x"
    assert uri_of("/tmp/exp/retrain/t", pyarrow.fs.LocalFileSystem()) == "/tmp/exp/retrain/t"
    assert uri_of("/tmp/exp", None) == "/tmp/exp"


class _Result:
    """What selection reads of a tune.Result."""

    def __init__(self, checkpoint: Any, filesystem: Any, path: str, config: dict, metrics: dict) -> None:
        self.checkpoint, self.filesystem, self.path = checkpoint, filesystem, path
        self.config, self.metrics, self.error = config, metrics, None


def test_best_model_is_exported_from_a_checkpoint_on_s3(aws_env: WeedServer, tmp_path: Path) -> None:
    """The bug of issue 17: the retrain's checkpoint on S3 reached export_best_model without its s3:// scheme,
    and pyarrow failed with `URI has empty scheme` -- after the whole search and retrain had run."""
    import pyarrow.fs
    import torch
    from ray import tune

    from bss_model import checkpoint as ckpt
    from bss_model.config import load_config
    from bss_model.model import build_model
    from search.best_model import export_best_model
    from search.selection import retrain_summary, summarize_retrain

    cfg = load_config(None, ["model.variant=tiny"])
    model = build_model(cfg.model)
    local = tmp_path / "checkpoint_000001"
    local.mkdir()
    ckpt.save({"config": cfg.to_dict(), "model": model.state_dict(), "epoch": 2}, local / ckpt.FILENAME)
    key = f"{BUCKET}/exp-bug/retrain/train_trial_0_seed=1000/checkpoint_000001"
    fs = pyarrow.fs.FileSystem.from_uri(f"s3://{key}")[0]  # as Ray holds it: AWS_* resolved, path without scheme
    pyarrow.fs.copy_files(str(local), key, destination_filesystem=fs)
    result = _Result(tune.Checkpoint(key, filesystem=fs), fs, key.rsplit("/", 1)[0], {"train.seed": 1000},
                     {"val_mse": 0.05, "test_mse_mean": 0.04, "epoch": 2})  # fmt: skip
    best = retrain_summary(summarize_retrain([result])).best
    export_best_model(best, tmp_path / "best_model.pt")
    assert best.checkpoint == f"s3://{key}" and best.path.startswith("s3://")
    state = ckpt.load(tmp_path / "best_model.pt")
    assert state["seed"] == 1000 and state["val_mse"] == 0.05
    assert all(torch.equal(state["model"][k], v) for k, v in model.state_dict().items())


def test_separate_with_an_s3_checkpoint_says_to_download_it(capsys: pytest.CaptureFixture[str]) -> None:
    from bss_model.separate import main

    line = cli_error(main, ["--checkpoint", f"s3://{BUCKET}/exp/best_model.pt", "--demo", "2"], capsys)
    assert f"s3://{BUCKET}/exp/best_model.pt is a URI" in line and "download it first" in line


# --------------------------------------------------------------------------------------
# The experiment's files: storage is the truth, the local mirror a cache


def test_an_empty_mirror_reads_the_experiment_back_from_storage(
    aws_env: WeedServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A driver on another machine (another folder: an empty results/ mirror) finds the config, the summary
    and the study in storage; a summary only in the mirror (its upload failed) does not count."""
    from search import storage
    from search.config import load_search_config

    root = f"s3://{BUCKET}/mirror/exp"
    cfg = load_search_config(SMOKE, [*TINY, f"tune.storage_path=s3://{BUCKET}/mirror", "tune.name=exp"])
    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    assert storage.prepare_experiment(cfg, resume=False) == root
    storage.save_resolved_config(cfg, root)
    (storage.local_dir(root) / storage.SUMMARY_FILE).write_text("{}")  # written, never uploaded
    assert storage.load_summary(root) is None
    (storage.local_dir(root) / "optuna.db").write_bytes(b"study")
    storage.upload(root, storage.local_dir(root), ["optuna.db"])

    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "b")  # the other machine
    assert not storage.local_dir(root).exists()
    saved = storage.load_saved_config(root)
    assert saved is not None and saved.space == cfg.space and saved.base == cfg.base
    assert storage.download(root, storage.local_dir(root), ["optuna.db", "absent"], missing_only=True) == {"optuna.db"}
    assert (storage.local_dir(root) / "optuna.db").read_bytes() == b"study"
    assert not storage.has_started(root)
    s3_write(aws_env, f"{BUCKET}/mirror/exp/report.json", b"{}")
    assert storage.has_started(root), "results in storage keep the name taken, whatever the mirror holds"


def s3_write(server: WeedServer, key: str, data: bytes) -> None:
    with server.filesystem().open_output_stream(key) as f:
        f.write(data)


# --------------------------------------------------------------------------------------
# Bad storage settings: one line naming the fix, before Ray starts


def _unreachable(server: WeedServer) -> dict[str, str]:
    return {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}


BAD_STORAGE: dict[str, tuple[Any, str, str]] = {
    # (AWS_* changes, bucket, the words of the fix)
    "unreachable-endpoint": (_unreachable, BUCKET, "cannot be reached"),
    "missing-bucket": (lambda s: {}, "no-such-bucket", "bucket 'no-such-bucket' does not exist"),
    "wrong-secret": (lambda s: {"AWS_SECRET_ACCESS_KEY": "wrong"}, BUCKET, "access denied"),
    "no-credentials": (lambda s: {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None}, BUCKET, "access denied"),
}


@pytest.mark.parametrize("case", list(BAD_STORAGE))
def test_bad_storage_is_one_line_before_ray(
    case: str,
    aws_env: WeedServer,
    tmp_path: Path,
    data_dir: Path,
    no_ray: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from search.run import main

    change, bucket, fix = BAD_STORAGE[case]
    for key, value in change(aws_env).items():
        if value is None:
            monkeypatch.delenv(key)
        else:
            monkeypatch.setenv(key, value)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.aws credentials to fall back on
    monkeypatch.chdir(tmp_path)
    before = s3_tree(aws_env, BUCKET)
    argv = ["--config", SMOKE, "--storage-path", f"s3://{bucket}/bad", "--name", case, *sets(*TINY)]
    line = cli_error(main, argv, capsys)
    assert fix in line and f"s3://{bucket}/bad/{case}" in line, line
    if case == "unreachable-endpoint":
        assert "AWS_ENDPOINT_URL" in line
    if case in ("wrong-secret", "no-credentials"):
        assert "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in line
    assert s3_tree(aws_env, BUCKET) == before, "nothing was written"


# --------------------------------------------------------------------------------------
# One experiment, one driver, on object storage: a lease with an expiry (search/lock.py)

LEASE_HOLDER = """
import sys, time
from search import lock
lock.LEASE_TTL_S, lock.RENEW_EVERY_S = float(sys.argv[2]), 1.0
with lock.hold(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def test_the_lease_refuses_a_second_driver_until_the_first_ends_or_its_lease_lapses(
    aws_env: WeedServer, tmp_path: Path, data_dir: Path, no_ray: None, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """Issue 21: nothing stopped a second driver on one experiment. On S3 nothing can be locked: the driver holds
    a lease that it renews. A driver that crashed (kill -9) blocks nothing for long: on its own machine its
    lease is taken over at once, elsewhere once it lapses (it is no longer renewed)."""
    import socket
    import time

    from search import lock
    from search.run import main

    monkeypatch.chdir(tmp_path)
    root = f"s3://{BUCKET}/lease/exp"
    holder = Proc([PY, "-c", LEASE_HOLDER, root, "6"], tmp_path, env_with(data_dir, **aws_env.env()), "holder")
    try:
        holder.wait_until(lambda: "held" in holder.out, 60, "the holder to take the lease")
        lease = json.loads(s3_read(aws_env, f"{BUCKET}/lease/exp/{lock.LEASE_FILE}"))
        assert lease["pid"] == holder.pid and lease["host"] == socket.gethostname()
        argv = ["--config", SMOKE, "--storage-path", f"s3://{BUCKET}/lease", "--name", "exp", *sets(*TINY)]
        line = cli_error(main, [*argv, "--resume"], capsys)
        assert f"in use by the driver with pid {holder.pid} on {socket.gethostname()}, started " in line, line
        assert "its lease lapses at" in line, line
        time.sleep(2.5)  # renewed meanwhile: the expiry moved on
        renewed = json.loads(s3_read(aws_env, f"{BUCKET}/lease/exp/{lock.LEASE_FILE}"))
        assert renewed["expires"] > lease["expires"]
    finally:
        holder.cleanup()  # SIGKILL: it never releases the lease
    assert lock.LEASE_FILE in s3_tree(aws_env, f"{BUCKET}/lease/exp"), "a crashed driver leaves its lease"
    # On the machine it ran on, its process is seen to be gone: the lease is taken over at once (and the next
    # driver gets as far as its next check).
    assert "no experiment at" in cli_error(main, [*argv, "--resume"], capsys)
    assert lock.LEASE_FILE not in s3_tree(aws_env, f"{BUCKET}/lease/exp"), "a released lease is deleted"

    # A driver on another machine that stopped renewing: its lease holds until it lapses, then it is taken over.
    expires = time.time() + 4
    elsewhere = {"host": "elsewhere", "pid": 1, "started": "then", "proc": "1", "token": "x", "expires": expires}
    s3_write(aws_env, f"{BUCKET}/lease/exp/{lock.LEASE_FILE}", json.dumps(elsewhere).encode())
    line = cli_error(main, [*argv, "--resume"], capsys)
    assert "in use by the driver with pid 1 on elsewhere, started then" in line and "lapses at" in line, line
    time.sleep(max(0.0, expires - time.time()) + 0.5)
    assert "no experiment at" in cli_error(main, [*argv, "--resume"], capsys)


def test_a_driver_whose_lease_is_deleted_knows_it_lost_the_experiment(
    aws_env: WeedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The experiment's prefix deleted under a running driver (or its lease taken): lock.lost says so, and the
    search stops on it (search/guard.py) instead of ending "successfully"."""
    import time

    from search import lock

    monkeypatch.setattr(lock, "RENEW_EVERY_S", 0.5)
    root = f"s3://{BUCKET}/lease/lost"
    with lock.hold(root):
        assert lock.lost(root) is None
        aws_env.filesystem().delete_file(f"{BUCKET}/lease/lost/{lock.LEASE_FILE}")
        deadline = time.monotonic() + 20
        while lock.lost(root) is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "was deleted while this driver ran" in (lock.lost(root) or ""), lock.lost(root)
        with pytest.raises(lock.ExperimentLost):
            lock.check(root)


def s3_read(server: WeedServer, key: str) -> bytes:
    with server.filesystem().open_input_stream(key) as f:
        return f.read()


# --------------------------------------------------------------------------------------
# Slow: the smoke search on S3, a killed driver, a storage outage, and the resumes


@pytest.mark.slow
def test_search_on_s3_survives_a_killed_driver_and_a_storage_outage(tmp_path: Path, data_dir: Path) -> None:
    """The smoke search with its experiment on S3 (AWS_* only): SIGKILL the driver after a trial finished;
    resume it from another folder (nothing local); stop the S3 server mid-trial: the driver stops with one
    line saying to resume; restart the server: --resume completes search, retrain and report -- every file
    in S3 -- and reruns no trial that had finished. Then retrain.py --experiment s3://... reads it back."""
    import pyarrow.fs

    from bss_model import checkpoint as ckpt

    with weed_server(tmp_path / "weed") as server:
        server.make_bucket()
        name, prefix = "s3exp", f"{BUCKET}/exp/s3exp"
        env = env_with(data_dir, **server.env())
        # No retries: in the outage each trial fails at its first upload instead of three times over (faster;
        # Tune's own retries of its state uploads still run).
        # One retrain seed: the retrain's S3 path is the same for one seed as for many.
        # Epochs of a few seconds (4x the smoke's): on an idle machine 640-sample trials all finished before the
        # driver was killed, leaving the resumed run no search trial to checkpoint while S3 goes down.
        tune_sets = ("tune.max_failures=0", "retrain.seeds=1", "base.train.samples_per_epoch=2560")
        args = search_args("s3://bss/exp", name, *sets(*tune_sets))
        search = f"{prefix}/search"
        first, second = tmp_path / "first", tmp_path / "second"
        first.mkdir(), second.mkdir()

        # 1. SIGKILL the driver once a trial has finished in S3, with trials left: the trials still training
        # are frozen until the state in S3 says one finished (freeze_unfinished). Without it, a fresh clone's
        # run once saw all 3 trials finish first (the last ran in 3 s), leaving the resume nothing to train.
        proc = Proc([PY, *args], first, env, "first")
        try:
            proc.wait_until(lambda: " finished: val MSE " in proc.out, 240, "a trial to finish")
            done = proc.wait_until(lambda: freeze_unfinished(proc) and s3_finished(server, search, EPOCHS), 120,
                                   "the state in S3 to say a trial finished")  # fmt: skip
            os.killpg(proc.pid, signal.SIGKILL)
        finally:
            proc.cleanup()
        assert len(done) < NUM_SAMPLES, "trials are left for the resume"
        done_ckpts = {c for c in checkpoint_dirs(server, search) if c.split("/")[0] in done}

        # 2. Resume from another folder (an empty local mirror); stop S3 once the resumed trials checkpoint.
        before = checkpoint_dirs(server, search)
        proc = Proc([PY, *args, "--resume"], second, env, "second")
        try:
            proc.wait_until(lambda: checkpoint_dirs(server, search) - before, 240, "a checkpoint of the resumed run")
            server.stop()
            rc = proc.finish(300)
        finally:
            proc.cleanup()
        last = proc.err.strip().splitlines()[-1]
        assert rc == 75, proc.tail()
        assert last.startswith(f"error: the storage of s3://{prefix} failed during the "), last
        assert "resume with `python search/run.py" in last and last.endswith("--resume`"), last

        # 3. The server is back: --resume finishes everything.
        server.start()
        proc = run_to_end([*args, "--resume"], second, env, "third", timeout=300)
        assert proc.p.returncode == 0, proc.tail()
        tree = s3_tree(server, prefix)
        for f in (
            "search_config.yaml",
            "search_summary.json",
            "optuna.db",
            "report.json",
            "report.md",
            "best_model.pt",
        ):
            assert f in tree, f
        for trial, rows in done.items():  # finished before the kill: not one epoch run again
            assert s3_json_lines(server, f"{search}/{trial}/result.json") == rows
        assert {c for c in checkpoint_dirs(server, search) if c.split("/")[0] in done} == done_ckpts
        fs = server.filesystem()
        with fs.open_input_stream(f"{prefix}/report.json") as f:
            report = json.loads(f.read())
        assert report["num_trials"] == report["num_completed"] == NUM_SAMPLES and report["num_errored"] == 0
        local = tmp_path / "download"
        pyarrow.fs.copy_files(prefix, str(local), source_filesystem=fs)
        model, _ = ckpt.load_model(local / "best_model.pt")
        # The README's way to TensorBoard from S3 (a local copy): every trial's event files are in it.
        trials = [t for t in (local / "search").iterdir() if (t / "result.json").is_file()]
        assert len(trials) == NUM_SAMPLES and all(list(t.glob("events.out.tfevents.*")) for t in trials)
        assert sum(p.numel() for p in model.parameters()) > 0

        import optuna

        study = optuna.load_study(study_name=name, storage=f"sqlite:///{local / 'optuna.db'}")
        ids = sorted(t.user_attrs["tune_trial_id"] for t in study.trials)
        assert ids == sorted(t["trial_id"] for t in report["trials"]), "the study holds every trial once"

        # 4. retrain.py --experiment s3://...: the finished retrain is restored, not run again.
        (tmp_path / "third").mkdir()
        retrain = [str(Path(args[0]).with_name("retrain.py")), "--experiment", f"s3://{prefix}"]
        proc = run_to_end(retrain, tmp_path / "third", env, "retrain", timeout=240)
        assert proc.p.returncode == 0, proc.tail()
        assert "report:" in proc.out and "test MSE" in proc.out
        assert not any("epoch 1/" in line for line in proc.out.splitlines()), "no seed trained again"
