"""The search among the tools a Ray Tune / Optuna team runs beside it, each one real and on this machine:

- trials with Ray's RAY_CHDIR_TO_TRIAL_DIR=0 still write into their own folders, named as Ray names them;
- the trackers of ``tune.callbacks``: a real MLflow tracking server (read back with MLflow's client), and W&B in
  its offline mode (files only);
- ``tune.study_storage``: one real PostgreSQL server holding two experiments' studies, one of them killed and
  resumed, and refusing a second experiment under a name already taken;
- an unreachable database, or wrong credentials, is one line before Ray starts.

One search (``tracked``) serves the trial, tracker and study tests; one more (``killed``) is the kill and resume.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests._searchutil import (
    EPOCHS,
    TINY,
    Ports,
    cli_error,
    env_with,
    finished,
    freeze_unfinished,
    read_json,
    run_to_end,
    running,
    search_args,
    sets,
    trainer_event_files,
    trial_dirs,
)
from tests._servers import mlflow_server, postgres

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    ports = Ports()
    with postgres(ports) as pg, mlflow_server(ports, tmp_path_factory.mktemp("mlflow")) as mlflow:
        yield {"pg": pg, "mlflow": mlflow}


def _load_study(pg: dict[str, Any], name: str) -> Any:
    import optuna

    url = pg["url"].replace("bss@", f"bss:{pg['password']}@")
    return optuna.load_study(study_name=name, storage=url)


@pytest.fixture(scope="module")
def tracked(servers: dict[str, Any], tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> dict[str, Any]:
    """A tiny search with every outside tool on, Ray's chdir into trial folders off, and Ray's own console."""
    cwd = tmp_path_factory.mktemp("tracked")
    env = env_with(data_dir, RAY_CHDIR_TO_TRIAL_DIR="0", PGPASSWORD=servers["pg"]["password"], WANDB_SILENT="true")
    extra = sets(
        f"tune.callbacks.mlflow.tracking_uri={servers['mlflow']['url']}",
        "tune.callbacks.wandb.mode=offline",
        f"tune.study_storage={servers['pg']['url']}",
        "retrain.seeds=1",
    )
    proc = run_to_end([*search_args(cwd / "results", "tracked", *extra), "--verbose"], cwd, env, "run", timeout=420)
    assert proc.p.returncode == 0, proc.tail()
    exp = cwd / "results" / "tracked"
    return {"cwd": cwd, "exp": exp, "proc": proc, "report": read_json(exp / "report.json")}


def test_each_trial_writes_into_its_own_folder_with_chdir_off(tracked: dict[str, Any]) -> None:
    exp, report = tracked["exp"], tracked["report"]
    folders = trial_dirs(exp, "search")
    assert len(folders) == len(report["trials"]) == 3
    for folder in folders:
        history = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        assert [m["epoch"] for m in history] == list(range(1, EPOCHS + 1)), folder
        trial = next(t for t in report["trials"] if folder.name.endswith(t["trial_id"]))
        config = yaml.safe_load((folder / "config.yaml").read_text())
        for key, value in trial["params"].items():
            section, name = key.split(".")
            assert config[section][name] == pytest.approx(value), (folder, key)
        assert trainer_event_files(folder), f"{folder} lacks the trial's own TensorBoard events"
    # Nothing of any trial landed in the driver's working directory (where every trial wrote before).
    assert sorted(p.name for p in tracked["cwd"].iterdir()) == ["results", "run.err", "run.out"]


def test_ray_names_each_trial_as_its_folder(tracked: dict[str, Any]) -> None:
    from ray.tune import ExperimentAnalysis

    exp, out = tracked["exp"], tracked["proc"].out
    for phase in ("search", "retrain"):
        trials = ExperimentAnalysis(str(exp / phase)).trials
        assert sorted(str(t) for t in trials) == sorted(p.name for p in trial_dirs(exp, phase))
    for folder in trial_dirs(exp, "search"):
        # Ray's own console (--verbose) and the project's lines say the same name.
        assert re.search(rf"^Trial {folder.name} (started|finished|completed)", out, re.M), folder.name
        assert f"trial {folder.name} finished" in out or f"trial {folder.name} stopped early" in out
    assert "train_trial_" not in out


def test_mlflow_holds_every_trial_with_its_params_and_val_mse_per_epoch(
    tracked: dict[str, Any], servers: dict[str, Any]
) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=servers["mlflow"]["url"])
    experiment = client.get_experiment_by_name("tracked")  # the experiment's name (Ray's default: "Default")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    exp, report = tracked["exp"], tracked["report"]
    assert sorted(runs) == sorted(p.name for p in [*trial_dirs(exp, "search"), *trial_dirs(exp, "retrain")])
    for trial in report["trials"]:
        (name,) = [n for n in runs if n.endswith(trial["trial_id"])]
        run = runs[name]
        assert run.data.tags["bss.phase"] == "search" and run.data.tags["bss.experiment"] == "tracked"
        assert run.info.status == "FINISHED"
        for key, value in trial["params"].items():
            assert float(run.data.params[key]) == pytest.approx(value), (name, key)
        history = [json.loads(line) for line in (exp / "search" / name / "metrics.jsonl").read_text().splitlines()]
        logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val_mse")}
        assert logged == pytest.approx({m["epoch"]: m["val_mse"] for m in history}), name
    seed = runs["seed-1000"]
    assert seed.data.tags["bss.phase"] == "retrain" and float(seed.data.params["train.seed"]) == 1000


def wandb_records(path: Path) -> dict[str, Any]:
    """An offline run's log (``run-<id>.wandb``, what ``wandb sync`` uploads): W&B's record protos in a LevelDB-style
    log (a 7-byte ``:W&B`` header, then 32 KiB blocks of chunks with a 7-byte header: crc, length, type). wandb 0.31
    has no Python reader of its own (wandb-core reads it), so the format's few lines are here."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, chunks, part = 7, [], b""
    while pos + 7 <= len(data):
        room = 32768 - pos % 32768
        if room < 7:  # a block's tail too short for a chunk header is padding
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:  # FULL
            chunks.append(chunk)
        elif kind in (2, 3):  # FIRST, MIDDLE
            part = (part if kind == 3 else b"") + chunk
        elif kind == 4:  # LAST
            chunks.append(part + chunk)
        else:
            break
    out: dict[str, Any] = {"run": None, "config": {}, "history": []}
    for raw in chunks:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["run"] = record.run
        elif kind == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            key = lambda i: i.key or "/".join(i.nested_key)  # noqa: E731
            out["history"].append({key(i): json.loads(i.value_json) for i in record.history.item})
    return out


def test_wandb_offline_writes_every_trial_as_files(tracked: dict[str, Any]) -> None:
    exp, report = tracked["exp"], tracked["report"]
    runs = {p.name.split("-", 3)[-1]: p for p in (exp / "wandb").glob("offline-run-*")}  # (W&B id = Tune's id)
    assert len(runs) == len(report["trials"]) + 1, runs  # + the retrain seed
    for trial in report["trials"]:
        (log,) = runs[trial["trial_id"]].glob("run-*.wandb")
        records = wandb_records(log)
        assert records["run"].display_name.endswith(trial["trial_id"]) and records["run"].run_group == "tracked"
        assert records["run"].job_type == "search"
        for key, value in trial["params"].items():
            assert records["config"][key] == pytest.approx(value), key
        folder = next(p for p in trial_dirs(exp, "search") if p.name.endswith(trial["trial_id"]))
        history = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        logged = {h["epoch"]: h["val_mse"] for h in records["history"] if "val_mse" in h}
        assert len(logged) == len(records["history"]) == EPOCHS, records["history"]  # one record per epoch
        assert logged == pytest.approx({m["epoch"]: m["val_mse"] for m in history}), trial["trial_id"]


@pytest.fixture(scope="module")
def killed(
    servers: dict[str, Any], tracked: dict[str, Any], tmp_path_factory: pytest.TempPathFactory, data_dir: Path
) -> dict[str, Any]:
    """A second experiment in the same database: its driver SIGKILLed once a trial is in the study, then resumed."""
    cwd = tmp_path_factory.mktemp("killed")
    env = env_with(data_dir, PGPASSWORD=servers["pg"]["password"])
    args = search_args(
        cwd / "results", "killed", *sets(f"tune.study_storage={servers['pg']['url']}", "retrain.seeds=1")
    )
    exp = cwd / "results" / "killed"
    with running(args, cwd, env, "1-kill") as proc:
        frozen: set[int] = set()
        proc.wait_until(lambda: " finished: val MSE " in proc.out, 240, "a trial to finish its budget")
        proc.wait_until(lambda: freeze_unfinished(proc, frozen) and finished(exp, "search")
                        and len(_load_study(servers["pg"], "killed").trials) >= 1, 120,
                        "the saved state and the study to hold a finished trial")  # fmt: skip
        at_kill = {t.user_attrs["tune_trial_id"] for t in _load_study(servers["pg"], "killed").trials}
        os.kill(proc.pid, signal.SIGKILL)
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        proc.p.wait()
    assert 1 <= len(at_kill) < 3
    final = run_to_end([*args, "--resume"], cwd, env, "2-resume", timeout=420)
    assert final.p.returncode == 0, final.tail()
    return {"exp": exp, "at_kill": at_kill, "args": args, "cwd": cwd, "report": read_json(exp / "report.json")}


def test_two_experiments_in_one_database_each_its_own_study(
    tracked: dict[str, Any], killed: dict[str, Any], servers: dict[str, Any]
) -> None:
    for run in (tracked, killed):
        name, report = run["exp"].name, run["report"]
        study = _load_study(servers["pg"], name)
        ids = [t.user_attrs["tune_trial_id"] for t in study.trials]
        assert len(ids) == len(set(ids)), f"a trial is in study {name} twice: {sorted(ids)}"  # none added twice
        assert sorted(ids) == sorted(t["trial_id"] for t in report["trials"])
        assert study.user_attrs["bss_experiment"] == str(run["exp"])
        for t in study.trials:
            row = next(r for r in report["trials"] if r["trial_id"] == t.user_attrs["tune_trial_id"])
            assert t.params == row["params"] and list(t.intermediate_values) == list(range(1, row["epochs"] + 1))
        assert not (run["exp"] / "optuna.db").exists()  # the database, not a file beside the results
    assert killed["at_kill"] < {t.user_attrs["tune_trial_id"] for t in _load_study(servers["pg"], "killed").trials}


def test_a_second_experiment_under_a_taken_name_is_refused(
    killed: dict[str, Any], servers: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    no_ray: None, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    from search.run import main

    monkeypatch.setenv("PGPASSWORD", servers["pg"]["password"])
    args = search_args(tmp_path / "elsewhere", "killed", *sets(f"tune.study_storage={servers['pg']['url']}"))
    line = cli_error(main, args[1:], capsys)
    assert f"optuna study 'killed' in {servers['pg']['url']} belongs to another experiment ({killed['exp']}" in line
    assert "choose another --name" in line
    assert len(_load_study(servers["pg"], "killed").trials) == 3  # nothing merged


def test_an_unreachable_database_or_wrong_credentials_is_one_line_before_ray(
    servers: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_ray: None,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    from search.run import main

    pg = servers["pg"]
    monkeypatch.setenv("PGPASSWORD", "not-the-password")
    args = search_args(tmp_path, "creds", *sets(f"tune.study_storage={pg['url']}"), tiny=TINY)
    line = cli_error(main, args[1:], capsys)
    assert line.startswith(f"error: tune.study_storage {pg['url']}: the server refused the credentials"), line
    assert "not-the-password" not in line
    closed = Ports().one()  # nobody listens there
    args = search_args(tmp_path, "down", *sets(f"tune.study_storage=postgresql://bss@127.0.0.1:{closed}/studies"))
    line = cli_error(main, args[1:], capsys)
    assert "the database server cannot be reached" in line and "start it, or fix the host and port" in line
    # A password in the URL would be saved with the results: refused, with the way to pass it instead.
    args = search_args(tmp_path, "pw", *sets(f"tune.study_storage=postgresql://bss:secret@127.0.0.1:{pg['port']}/s"))
    line = cli_error(main, args[1:], capsys)
    assert "holds a password" in line and "secret" not in line and "PGPASSWORD" in line
