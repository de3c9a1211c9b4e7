"""Helpers for the tests that run real (tiny) searches in subprocesses and inject real faults.

Every driver runs in its own session (``start_new_session=True``) so a test can signal it like a
terminal would and clean up everything it started -- and only that -- by process group and by the
descendant pids recorded while it ran (Ray workers outlive a SIGKILLed driver only briefly).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
RUN = str(REPO / "search" / "run.py")
FAULTY_RUN = str(REPO / "tests" / "_faulty_run.py")  # run.py with one injected worker fault
SMOKE = str(REPO / "configs" / "smoke.yaml")

# The smallest search that still exercises everything: 3 trials x 2 epochs x 20 steps (x batch 32
# = 640 samples), 2 retrain seeds. grace_period = epochs switches ASHA's early stopping off, so
# "finished" = "ran 2 epochs".
EPOCHS, STEPS = 2, 20
TINY = [
    f"base.train.epochs={EPOCHS}",
    f"base.train.samples_per_epoch={STEPS * 32}",
    f"retrain.epochs={EPOCHS}",  # the retrain's budget: the search's own
    f"retrain.samples_per_epoch={STEPS * 32}",
    "base.data.val_pairs=500",
    "base.eval.draws=2",
    "base.eval.pairs=1000",
    "tune.num_samples=3",
    f"tune.grace_period={EPOCHS}",
    "retrain.seeds=2",
    "tune.verbose=0",
]


def sets(*items: str) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def search_args(storage: Path, name: str, *extra: str, tiny: list[str] = TINY) -> list[str]:
    return [RUN, "--config", SMOKE, "--storage-path", str(storage), "--name", name, *sets(*tiny), *extra]


def env_with(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(BSS_DATA_DIR=str(data_dir), RAY_DEDUP_LOGS="0", **extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Ports:
    """The ports of one test's servers and nodes: none handed out twice, none inside a Ray node's worker-port
    range. (free_port releases the port it found, so two calls can return the same one: a fresh clone's run
    of tests/test_cluster.py once failed with Ray's "client_server is trying to use a port number ... used by
    other components".)"""

    WORKER_PORTS = 41

    def __init__(self) -> None:
        self.taken: set[int] = set()

    def one(self) -> int:
        while (port := free_port()) in self.taken:
            pass
        self.taken.add(port)
        return port

    def worker_range(self) -> int:
        """The first of WORKER_PORTS consecutive ports that no other component of the test uses."""
        while True:
            low = free_port()
            span = set(range(low, low + self.WORKER_PORTS))
            if low + self.WORKER_PORTS <= 65536 and not span & self.taken:
                self.taken |= span
                return low


def children_of(pid: int) -> set[int]:
    """All live descendants of ``pid`` (from /proc; no psutil here)."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parent[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in parent.items() if pp in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class Proc:
    """A subprocess in its own session, its output in files, its descendants remembered."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str], tag: str = "run") -> None:
        self.out_path, self.err_path = cwd / f"{tag}.out", cwd / f"{tag}.err"
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.p = subprocess.Popen(args, cwd=cwd, env=env, stdout=out, stderr=err, start_new_session=True)
        self.pid = self.p.pid
        self.seen: set[int] = set()

    def poll(self) -> int | None:
        if self.p.poll() is None:
            self.seen |= children_of(self.pid)
        return self.p.returncode

    @property
    def out(self) -> str:
        return self.out_path.read_text(errors="replace")

    @property
    def err(self) -> str:
        return self.err_path.read_text(errors="replace")

    def wait_until(self, cond: Callable[[], Any], timeout: float, what: str) -> Any:
        """Poll ``cond`` until truthy; fail (with the driver's output) on timeout or early exit."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if value := cond():
                return value
            if self.poll() is not None:
                raise AssertionError(f"driver exited ({self.p.returncode}) before {what}:\n{self.tail()}")
            time.sleep(0.2)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}:\n{self.tail()}")

    def finish(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"driver still running after {timeout:.0f} s:\n{self.tail()}")
            time.sleep(0.5)
        return self.p.returncode

    def tail(self, n: int = 3000) -> str:
        return f"--- stdout ---\n{self.out[-n:]}\n--- stderr ---\n{self.err[-n:]}"

    def cleanup(self) -> None:
        """SIGKILL whatever this process started and is still alive (never anything else)."""
        self.poll()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        for pid in self.seen:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.p.wait(10)


@contextlib.contextmanager
def running(args: list[str], cwd: Path, env: dict[str, str], tag: str = "run") -> Iterator[Proc]:
    proc = Proc([PY, *args], cwd, env, tag)
    try:
        yield proc
    finally:
        proc.cleanup()


def run_to_end(args: list[str], cwd: Path, env: dict[str, str], tag: str, timeout: float = 240) -> Proc:
    with running(args, cwd, env, tag) as proc:
        proc.finish(timeout)
    return proc


# --------------------------------------------------------------------------------------
# Reading an experiment


def results(exp: Path, phase: str) -> dict[str, list[dict[str, Any]]]:
    """``{trial folder name: [result.json rows]}`` for ``exp/phase`` (search or retrain)."""
    out = {}
    for path in sorted((exp / phase).glob("*/result.json")):
        rows = []
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):  # a line being written right now
                rows.append(json.loads(line))
        out[path.parent.name] = rows
    return out


def saved_statuses(exp: Path, phase: str) -> dict[str, str]:
    """``{trial_id: status}`` from the experiment state Tune last saved to storage (what --resume reads)."""
    states = sorted((exp / phase).glob("experiment_state-*.json"), key=lambda p: p.stat().st_mtime)
    try:
        state = json.loads(states[-1].read_text())
    except (IndexError, OSError, json.JSONDecodeError):  # none yet, or being copied right now
        return {}
    trials = (json.loads(t) if isinstance(t, str) else t for t, _ in state["trial_data"])
    return {t["trial_id"]: t["status"] for t in trials}


def finished(exp: Path, phase: str, epochs: int = EPOCHS) -> dict[str, list[dict[str, Any]]]:
    """Trials whose last result (in storage) is the full budget *and* whose saved state says TERMINATED.

    Tune syncs result.json and the experiment state from the driver to storage lazily; waiting for
    both makes "finished" mean what a resume will see, not what the driver happened to know.
    """
    status = saved_statuses(exp, phase)
    return {
        k: v
        for k, v in results(exp, phase).items()
        if v and v[-1].get("epoch") == epochs and status.get(v[-1].get("trial_id")) == "TERMINATED"
    }


def checkpoints(exp: Path, phase: str) -> list[str]:
    """Every trial checkpoint folder in storage (workers upload these directly, at once)."""
    return sorted(str(p.relative_to(exp)) for p in (exp / phase).glob("*/checkpoint_*"))


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def trial_dirs(exp: Path, phase: str) -> list[Path]:
    """A phase's trial folders, named as search.console names them: ``007-f785168e`` (search), ``seed-1000``."""
    pattern = "[0-9][0-9][0-9]*-*" if phase == "search" else "seed-*"
    return sorted(p for p in (exp / phase).glob(pattern) if p.is_dir())


def trainer_event_files(folder: Path) -> list[Path]:
    """The trial's own event files in its folder (torch's SummaryWriter names them ``...<host>.<pid>.<n>``),
    not Tune's (tensorboardX names those ``...<host>``), which the driver writes beside them."""
    host = socket.gethostname()
    return sorted(p for p in folder.glob("events.out.tfevents.*") if p.name.split(f".{host}", 1)[-1])


# Optuna's state for each trial status of the report (search/study.py's table, restated here on purpose).
OPTUNA_STATE = {"completed": "COMPLETE", "stopped": "PRUNED", "diverged": "FAIL", "errored": "FAIL"}


def study_trials(exp: Path) -> dict[str, Any]:
    """``{tune trial id: FrozenTrial}`` of the experiment's Optuna study, read with ``optuna.load_study``."""
    import optuna

    study = optuna.load_study(study_name=exp.name, storage=f"sqlite:///{exp / 'optuna.db'}")
    ids = [t.user_attrs["tune_trial_id"] for t in study.trials]
    assert len(ids) == len(set(ids)), f"a trial is in the study twice: {sorted(ids)}"
    return dict(zip(ids, study.trials, strict=True))


def check_study_matches_report(exp: Path) -> dict[str, Any]:
    """The study against report.json trial by trial -- state, value, params, one validation MSE per epoch run --
    and those values against the trial's result.json in storage (an epoch's last report; not the divergence
    marker). Tune's result.json of a trial restored after a failure can lack the epochs before the restore;
    the study keeps them, so only the epochs the file has are compared."""
    report = read_json(exp / "report.json")
    trials = study_trials(exp)
    assert sorted(trials) == sorted(t["trial_id"] for t in report["trials"]), "every trial exactly once"
    reported = {rows[-1]["trial_id"]: rows for rows in results(exp, "search").values() if rows}
    for row in report["trials"]:
        t = trials[row["trial_id"]]
        assert t.state.name == OPTUNA_STATE[row["status"]], (row, t.state)
        assert t.user_attrs["status"] == row["status"] and t.user_attrs["epochs"] == row["epochs"]
        assert t.value == (None if t.state.name == "FAIL" else row["val_mse"])
        assert t.params == row["params"]
        epochs = list(t.intermediate_values)
        assert epochs == list(range(1, row["epochs"] + 1)), (row["trial_id"], t.intermediate_values)
        in_file = {r["epoch"]: r["val_mse"] for r in reported.get(row["trial_id"], []) if not r.get("diverged")}
        assert {e: t.intermediate_values.get(e) for e in in_file} == in_file, (row["trial_id"], in_file)
    return trials


def freeze_unfinished(proc: Proc, frozen: set[int] | None = None) -> bool:
    """SIGSTOP every trial process of ``proc`` whose trial has not printed its end (a trial process runs in its
    trial folder, NNN-<id>, the label of the console's lines), adding their pids to ``frozen``. True, so it can
    lead a wait condition.

    Why: Tune saves the state that says a trial is TERMINATED lazily (seconds), and a tiny trial can run in
    less; a test that kills the driver "once a trial has finished, with trials left" freezes the others
    until the saved state catches up, or it may find every trial finished."""
    ended = set(re.findall(r"^trial (\S+) (?:finished|stopped early|errored|diverged)", proc.out, re.M))
    for pid in children_of(proc.pid):
        with contextlib.suppress(OSError):
            folder = Path(os.readlink(f"/proc/{pid}/cwd")).name
            if re.fullmatch(r"\d{3,}-\w+", folder) and folder not in ended:
                os.kill(pid, signal.SIGSTOP)
                if frozen is not None:
                    frozen.add(pid)
    return True


def trial_pids(driver: Proc, exp: Path, phase: str) -> dict[str, int]:
    """``{trial folder name: pid}`` of the live trial workers: a Tune worker's cwd is its trial's dir."""
    out = {}
    for pid in children_of(driver.pid):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
        except OSError:
            continue
        if cmd.startswith(b"ray::ImplicitFunc") and (exp / phase / cwd.name).is_dir():
            out[cwd.name] = pid
    return out


def write_config(path: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    """configs/smoke.yaml with ``edit`` applied, written to ``path``."""
    cfg = yaml.safe_load(Path(SMOKE).read_text())
    edit(cfg)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# --------------------------------------------------------------------------------------
# One search with every worker-side fault, shared by test_reliability and test_tensorboard

FAULT_LRS = {"good": 1.0e-3, "diverges": 1.0e3, "good2": 2.0e-3}


_ONCE: dict[str, Any] = {}


def faulty_search_once(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> dict[str, Any]:
    """:func:`faulty_search`, run once per test session whichever test module asks first.

    (A fixture imported into two modules is two fixtures, each run once: the cache here is shared.)
    """
    if "faults" not in _ONCE:
        try:
            _ONCE["faults"] = faulty_search(tmp_path_factory, data_dir)
        except BaseException as exc:  # fail every user the same way, without running it again
            _ONCE["faults"] = exc
    if isinstance(_ONCE["faults"], BaseException):
        raise _ONCE["faults"]
    return _ONCE["faults"]


def faulty_search(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> dict[str, Any]:
    """A tiny search in which (a) the first trial to reach epoch 2 raises (tests/_faulty_run.py), (b) the
    other healthy trial's worker process is SIGKILLed after its epoch-1 checkpoint, (c) one starting point
    diverges (lr=1e3).

    Returns the experiment folder and what was done to it; every trial and seed must still finish.
    """
    cwd = tmp_path_factory.mktemp("faults")
    marker = cwd / "fault-marker"

    def edit(cfg: dict[str, Any]) -> None:
        cfg["space"]["train.lr"] = {"loguniform": [1.0e-4, 1.0e4]}  # wide enough for the divergent point
        point = cfg["tune"]["points_to_evaluate"][0]
        cfg["tune"]["points_to_evaluate"] = [
            {**point, "train.lr": FAULT_LRS["good"]},
            {**point, "train.lr": FAULT_LRS["diverges"]},
            {**point, "model.filters": 4, "train.lr": FAULT_LRS["good2"]},
        ]

    config = write_config(cwd / "faults.yaml", edit)
    args = search_args(cwd / "results", "faults")
    args[args.index(SMOKE)] = str(config)
    args[args.index(RUN) : args.index(RUN) + 1] = [FAULTY_RUN, "2", str(marker)]
    exp = cwd / "results" / "faults"
    env = env_with(data_dir)
    with running(args, cwd, env, "faults") as proc:
        # Once the injected fault has fired, the next healthy trial to checkpoint epoch 1 (the other healthy
        # trial) waits for its kill (tests/_faulty_run.py): SIGKILL its worker, as a node's OOM killer would.
        victim = marker.with_name(marker.name + ".victim")

        def offered() -> tuple[str, int] | None:
            text = victim.read_text() if victim.exists() else ""
            if not text.endswith("\n"):  # not written yet
                return None
            pid, folder = text.split()
            return folder, int(pid)

        killed_trial, killed_pid = proc.wait_until(
            offered, 180, "a healthy trial to checkpoint epoch 1 after the fault"
        )
        assert (exp / "search" / killed_trial).is_dir() and killed_pid in trial_pids(proc, exp, "search").values()
        os.kill(killed_pid, signal.SIGKILL)
        rc = proc.finish(240)
    assert rc == 0, proc.tail()
    return {"exp": exp, "marker": marker, "killed_trial": killed_trial, "killed_pid": killed_pid, "proc": proc}


# --------------------------------------------------------------------------------------
# A two-node Ray cluster on this machine (run as `python tests/_searchutil.py cluster PORT`)


def _cluster_main(port: int) -> None:
    """Start a head and a worker node (1 CPU each), print their ids, then on the line "kill" on
    stdin SIGKILL every process of the worker node (a lost machine); exit (and stop all) at EOF."""
    from ray.cluster_utils import Cluster

    node_args = {"num_cpus": 1, "include_dashboard": False, "object_store_memory": 80 * 1024**2}
    cluster = Cluster(initialize_head=True, head_node_args={**node_args, "gcs_server_port": port})
    worker = cluster.add_node(**node_args)
    raylet = worker.all_processes["raylet"][0].process.pid
    info = {"address": cluster.address, "head": cluster.head_node.node_id, "worker": worker.node_id}
    print(json.dumps({**info, "worker_raylet": raylet}))
    sys.stdout.flush()
    for line in sys.stdin:
        if line.strip() == "kill":
            cluster.remove_node(worker, allow_graceful=False)
            print("killed", flush=True)
    cluster.shutdown()


if __name__ == "__main__" and sys.argv[1:2] == ["cluster"]:
    _cluster_main(int(sys.argv[2]))


def cli_error(main: Any, argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run a CLI main that must fail on user input; returns its one error line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert info.value.code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]
