"""A Ray cluster whose nodes share nothing but S3 (issue 17), driven the README's way: `ray start --head`,
`ray start --address=...` for a worker, and the search sent with `ray job submit --working-dir .`.

Two nodes on this machine, each with its own temp dir (--temp-dir), working directory, TMPDIR and copy of the
data, with token authentication as the README sets it up: the head and the client share the user's HOME, which
has Ray's token, and the worker has a copy of it in its own; the experiment on a real S3 server (SeaweedFS,
tests/_s3util.py). Trials run on the
worker and write their checkpoints to S3 from there; the worker node is then lost (every process of it
SIGKILLed) mid-trial, and its trial resumes on the head from its checkpoint in S3 -- the head never sees
the worker's disk. Then the driver itself is SIGKILLed mid-search (the job fails), and the README's
resubmission with --resume completes the search from S3, running no finished trial again. Every node
and server is stopped by PID (found by its unique temp dir too) even when the test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _s3util import BUCKET, checkpoint_dirs, s3_finished, s3_json_lines, s3_tree, weed_server
from _searchutil import PY, REPO, TINY, Ports, Proc, children_of, env_with, sets

RAY = str(Path(PY).with_name("ray"))
EPOCHS = 4  # after the worker's first checkpoint its trial still has epochs left when the kill lands


def processes_under(folder: Path) -> set[int]:
    """The pids whose command line names ``folder`` (a node's unique temp dir): what is left of a node."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if str(folder).encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    found.add(int(entry))
    return found


class Node:
    """One `ray start --block` node in its own session, with its own folders and ports; ``env`` names its HOME."""

    def __init__(self, name: str, work: Path, env: dict[str, str], args: list[str], ports: Ports) -> None:
        # Short: Ray's unix sockets live under the temp dir, and socket paths are limited to 107 bytes.
        self.temp = Path(tempfile.mkdtemp(prefix=f"bss-{name}-", dir="/tmp"))
        self.work = work / name
        (self.work / "tmp").mkdir(parents=True)
        env = {**env, "TMPDIR": str(self.work / "tmp"), "RAY_USAGE_STATS_ENABLED": "0"}
        own = [(flag, ports.one()) for flag in ("--node-manager-port", "--object-manager-port",
               "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port",
               "--metrics-export-port")]  # fmt: skip
        low = ports.worker_range()
        high = low + Ports.WORKER_PORTS - 1
        argv = [RAY, "start", "--block", "--num-cpus=1", "--node-ip-address=127.0.0.1", f"--temp-dir={self.temp}",
                f"--min-worker-port={low}", f"--max-worker-port={high}", "--disable-usage-stats",
                *[f"{flag}={port}" for flag, port in own], *args]  # fmt: skip
        self.proc = Proc(argv, self.work, env, "ray")

    def pids(self) -> set[int]:
        self.proc.poll()
        return self.proc.seen | processes_under(self.temp)

    def kill(self) -> None:
        """SIGKILL every process of this node: a lost machine."""
        for _ in range(3):  # a dying raylet's workers can outlive the first pass by a moment
            for pid in self.pids():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            self.proc.cleanup()
            time.sleep(0.5)

    def stop(self) -> None:
        self.kill()
        left = processes_under(self.temp)
        shutil.rmtree(self.temp, ignore_errors=True)
        assert not left, f"processes of {self.temp} survived: {left}"


@contextlib.contextmanager
def nodes(work: Path, head_env: dict[str, str], worker_env: dict[str, str], token: str) -> Iterator[dict[str, Any]]:
    ports = Ports()
    gcs, dashboard = ports.one(), ports.one()
    started: list[Node] = []
    try:
        head_args = ["--head", f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                     f"--ray-client-server-port={ports.one()}"]  # fmt: skip
        head = Node("head", work, head_env, head_args, ports)
        started.append(head)
        address = f"http://127.0.0.1:{dashboard}"
        wait_for_nodes(address, token, 1, head)
        worker = Node("worker", work, worker_env, [f"--address=127.0.0.1:{gcs}"], ports)
        started.append(worker)
        ids = wait_for_nodes(address, token, 2, worker)
        yield {"address": address, "head": head, "worker": worker, **ids}
    finally:
        for node in reversed(started):
            node.stop()


def list_nodes(address: str, token: str) -> list[dict[str, Any]]:
    """The cluster's nodes from the dashboard's state API, authenticated with the cluster's token (this process
    has its own HOME, and Ray caches the token it first loads, so ray.util.state is not used here)."""
    request = urllib.request.Request(f"{address}/api/v0/nodes?limit=100&timeout=10&detail=false",
                                     headers={"Authorization": f"Bearer {token}"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=15) as response:
        return json.loads(response.read())["data"]["result"]["result"]


def wait_for_nodes(address: str, token: str, count: int, node: Node, timeout: float = 120) -> dict[str, str]:
    """``{"head_id": ..., "worker_id": ...}`` once ``count`` nodes are alive (from the dashboard's state API)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if node.proc.poll() is not None:
            raise AssertionError(f"ray start exited ({node.proc.p.returncode}):\n{node.proc.tail()}")
        with contextlib.suppress(Exception):  # the dashboard is still starting
            alive = [n for n in list_nodes(address, token) if n["state"] == "ALIVE"]
            if len(alive) >= count:
                return {("head_id" if n["is_head_node"] else "worker_id"): n["node_id"] for n in alive}
        time.sleep(1)
    raise AssertionError(f"{count} Ray node(s) not alive after {timeout:.0f} s:\n{node.proc.tail()}")


def user_home(folder: Path) -> str:
    """A HOME as a user's machine has it after any local Ray run: ~/.ray/auth_token (made the README's way,
    `ray get-auth-token --generate`); returns the token."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    folder.mkdir(parents=True)
    proc = subprocess.run([RAY, "get-auth-token", "--generate"], env={**env, "HOME": str(folder)},
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    token = (folder / ".ray" / "auth_token").read_text().strip()
    assert token and token == proc.stdout.strip()
    return token


def drivers_on(node: Node) -> set[int]:
    """The job's driver on ``node``: the `python search/run.py` a job supervisor started (with its shell)."""
    return {pid for pid in children_of(node.proc.pid) if b"search/run.py" in _cmdline(pid)}


def _cmdline(pid: int) -> bytes:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    return b""


def repo_copy(dest: Path) -> Path:
    """The project as a clone has it (tracked and new files), plus what a job must not ship: a virtualenv,
    results, data and git history."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    for name in files:
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    for junk in (".venv/bin/junk", "results/old-run/junk", "data/mnist/junk", ".git/junk"):
        (dest / junk).parent.mkdir(parents=True, exist_ok=True)
        (dest / junk).write_bytes(b"must not be shipped")
    return dest


@pytest.mark.slow
def test_job_submit_on_nodes_that_share_only_s3_survives_losing_the_worker(tmp_path: Path, data_dir: Path) -> None:
    with weed_server(tmp_path / "weed") as s3:
        s3.make_bucket()
        base = {k: v for k, v in env_with(data_dir, **s3.env()).items() if k not in ("BSS_DATA_DIR", "PYTHONPATH")}
        base.update(RAY_health_check_period_ms="1000", RAY_health_check_failure_threshold="3")
        # As `source .venv/bin/activate` leaves it (the README's recipe): a job's `python` is the venv's.
        base.update(PATH=f"{Path(PY).parent}:{base['PATH']}", VIRTUAL_ENV=str(Path(PY).parent.parent))
        own = {}
        for name in ("head", "worker"):  # each node's own copy of the data
            own[name] = tmp_path / f"data-{name}"
            shutil.copytree(data_dir, own[name])
        # Token authentication the README's way: RAY_AUTH_MODE=token in every shell. The head and the client
        # share the user's HOME, which has a token (as any machine that ran Ray locally has: without the
        # README's RAY_AUTH_MODE, `ray job submit` failed there with "Missing authentication token"); the
        # worker, another machine, has a copy of it in its own HOME.
        readme = (REPO / "README.md").read_text()
        assert "export RAY_AUTH_MODE=token" in readme and "ray get-auth-token --generate" in readme
        home = tmp_path / "home"
        token = user_home(home)
        (tmp_path / "worker" / ".ray").mkdir(parents=True)
        shutil.copy2(home / ".ray" / "auth_token", tmp_path / "worker" / ".ray" / "auth_token")
        base.update(RAY_AUTH_MODE="token")
        with nodes(tmp_path, {**base, "BSS_DATA_DIR": str(own["head"]), "HOME": str(home)},
                   {**base, "BSS_DATA_DIR": str(own["worker"]), "HOME": str(tmp_path / "worker")},
                   token) as cluster:  # fmt: skip
            repo = repo_copy(tmp_path / "repo")
            name, prefix = "nodes", f"{BUCKET}/cluster/nodes"
            longer = [
                *TINY,
                f"base.train.epochs={EPOCHS}",
                f"tune.grace_period={EPOCHS}",
                "base.train.samples_per_epoch=2560",  # epochs of a few seconds: time to act between checkpoints
                "retrain.seeds=1",
                "tune.verbose=2",  # the driver prints each result it takes in
            ]
            # The README's command (its smoke-sized variant), run from the repo the way it says.
            job = [RAY, "job", "submit", "--address", cluster["address"], "--working-dir", ".", "--",
                   "python", "search/run.py", "--config", "configs/smoke.yaml", "--storage-path", f"s3://{BUCKET}/cluster",
                   "--name", name, *sets(*longer)]  # fmt: skip
            client_env = {k: v for k, v in base.items() if not k.startswith("AWS_")}  # the client needs no storage
            client_env["HOME"] = str(home)
            # Run in the repo, its output kept outside (Ray hashes the folder while the job starts).
            in_repo = ["/bin/sh", "-c", 'cd "$0" && exec "$@"', str(repo)]
            submit = Proc([*in_repo, *job], tmp_path, client_env, "submit")
            try:
                worker = cluster["worker"]

                def trial_on_worker() -> str | None:
                    """A trial running on the worker whose epoch-1 checkpoint is in S3 *and* known to the driver
                    (tune.verbose=2: the driver prints each result it took in, and a result comes with its
                    checkpoint), with epochs left. Before the driver knows it, Tune restarts a trial from scratch."""
                    worker.pids()
                    out = submit.out
                    for pid in children_of(worker.proc.pid):
                        with contextlib.suppress(OSError):
                            trial = Path(os.readlink(f"/proc/{pid}/cwd")).name
                            tid = trial  # the folder NNN-<id> is Tune's name for the trial too
                            told = f"Trial {tid} finished iteration 1 " in out
                            left = f"Trial {tid} finished iteration 3 " not in out
                            keys = s3_tree(s3, f"{prefix}/search") if told and left else {}
                            if any(k.startswith(f"{trial}/checkpoint_000000/") for k in keys):
                                return trial
                    return None

                trial = submit.wait_until(trial_on_worker, 300, "a trial on the worker to checkpoint to S3")
                worker.kill()

                def driver_to_kill() -> dict[str, Any]:
                    """Once a trial has finished in S3 (TERMINATED in Tune's saved state) and the driver has
                    recorded the worker's loss (error.txt), while trials are still left."""
                    done = s3_finished(s3, f"{prefix}/search", EPOCHS)
                    lost = f"{trial}/error.txt" in s3_tree(s3, f"{prefix}/search")
                    return done if lost and 0 < len(done) < 3 else {}

                done = submit.wait_until(driver_to_kill, 300, "a finished trial in S3 with trials left")
                done_ckpts = {c for c in checkpoint_dirs(s3, f"{prefix}/search") if c.split("/")[0] in done}
                driver = drivers_on(cluster["head"])
                assert driver, "the job's driver runs on the head"
                for pid in driver:
                    os.kill(pid, signal.SIGKILL)
                killed_rc = submit.finish(120)
            finally:
                submit.cleanup()
            assert killed_rc != 0, submit.tail()
            assert "report:" not in submit.out, "the driver was killed before the end of the search"

            # The README's recovery: resubmit the same command with --resume; the experiment continues from S3.
            resume = Proc([*in_repo, *job, "--resume"], tmp_path, client_env, "resume")
            try:
                rc = resume.finish(400)
            finally:
                resume.cleanup()
            assert rc == 0, resume.tail()
            assert "report:" in resume.out and "test MSE" in resume.out, resume.tail()

            tree = s3_tree(s3, prefix)
            assert {"report.json", "best_model.pt", "optuna.db", "search_summary.json"} <= set(tree)
            with s3.filesystem().open_input_stream(f"{prefix}/report.json") as f:
                report = json.loads(f.read())
            assert report["num_trials"] == report["num_completed"] == 3 and report["num_errored"] == 0
            for folder, rows in done.items():  # finished before the kill: not one epoch run again
                assert s3_json_lines(s3, f"{prefix}/search/{folder}/result.json") == rows
            assert {c for c in checkpoint_dirs(s3, f"{prefix}/search") if c.split("/")[0] in done} == done_ckpts
            rows = s3_json_lines(s3, f"{prefix}/search/{trial}/result.json")
            assert rows[-1]["epoch"] == EPOCHS and rows[-1]["node_id"] == cluster["head_id"], "finished on the head"
            on_head = [r["epoch"] for r in rows if r["node_id"] == cluster["head_id"]]
            assert on_head and min(on_head) > 1, f"resumed from its S3 checkpoint, not from scratch: {on_head}"
            # Its attempt on the worker stays on record (search.tunefiles.KeepTrialHistory: CI once saw Tune's
            # retry copy an older result.json back from S3 over the row of epoch 1).
            assert rows[0]["epoch"] == 1 and rows[0]["node_id"] == cluster["worker_id"], rows[0]
            with s3.filesystem().open_input_stream(f"{prefix}/search/{trial}/error.txt") as f:
                assert b"Failure # 1" in f.read()
            placed = {
                r["node_id"] for t in tree if t.endswith("/result.json") for r in s3_json_lines(s3, f"{prefix}/{t}")
            }
            assert cluster["worker_id"] in placed, "trials ran on the worker"

            # The job shipped the code and nothing else (the head unpacked it under its own temp dir).
            folders = cluster["head"].temp.glob("session_2*/runtime_resources/working_dir_files/_ray_pkg_*")
            shipped = [p for p in folders if p.is_dir()]
            assert shipped and all((p / "search" / "run.py").is_file() for p in shipped)
            for p in shipped:
                assert not any((p / junk).exists() for junk in (".venv", "results/old-run", "data", ".git")), p


# --------------------------------------------------------------------------------------
# Fast: what the driver sends to a cluster


def test_the_driver_ships_its_packages_in_a_form_a_job_can_merge(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside a `ray job submit` job, ray.init merges its runtime env with the job's by deep copy: module
    objects in py_modules made the README's job fail (TypeError: cannot pickle 'module' object)."""
    import copy

    import ray

    import bss_model
    import search
    from search.cluster import init_ray

    seen: dict[str, Any] = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: seen.update(kwargs))
    init_ray("auto")
    env = copy.deepcopy(seen["runtime_env"])  # what Ray does to it inside a job
    assert [Path(m) for m in env["py_modules"]] == [Path(bss_model.__file__).parent, Path(search.__file__).parent]


def test_on_a_cluster_each_node_reads_its_own_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The driver's $BSS_DATA_DIR names its own machine's disk: on a cluster it stays out of the config (and
    each trial reads its node's $BSS_DATA_DIR); with a local Ray it goes into the config as before."""
    from bss_model.config import load_config
    from search.pipeline import resolve_data_dir

    monkeypatch.setenv("BSS_DATA_DIR", str(tmp_path))
    cfg = load_config(None, [])
    resolve_data_dir(cfg, None, cluster=True)
    assert cfg.data.dir == ""
    resolve_data_dir(cfg, None)
    assert cfg.data.dir == str(tmp_path)


def test_resume_accepts_another_data_dir_but_not_another_base(tmp_path: Path) -> None:
    """An experiment started with a local Ray (data.dir set from $BSS_DATA_DIR) resumes on a cluster (data.dir
    left to each node): where the data lives is not what the experiment trains. Any other change is refused."""
    from _searchutil import SMOKE

    from bss_model.errors import ConfigError
    from search import storage
    from search.config import load_search_config

    def cfg(*extra: str) -> Any:
        return load_search_config(SMOKE, [*TINY, f"tune.storage_path={tmp_path}", "tune.name=exp", *extra])

    first = cfg(f"base.data.dir={tmp_path / 'data'}")
    root = storage.prepare_experiment(first, resume=False)
    storage.save_resolved_config(first, root)
    assert storage.prepare_experiment(cfg(), resume=True) == root
    with pytest.raises(ConfigError, match=r"base\.train\.lr: experiment 0\.001, now 0\.002"):
        storage.prepare_experiment(cfg("base.train.lr=0.002"), resume=True)
