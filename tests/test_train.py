"""Tests for bss_model.train and checkpoints, on the real data (a tiny U-Net, so they run on a 2-core CPU).

Every run uses one intra-op thread: on a shared 2-core machine two OpenMP threads can be many times
slower than one, and a fixed thread count keeps the runs bit-for-bit reproducible.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from bss_model import checkpoint as ckpt
from bss_model.config import Config, DataConfig, load_config
from bss_model.data import Splits, draw_pairs, load_splits
from bss_model.errors import CheckpointError
from bss_model.evaluate import batched_mse, mix_baseline, model_predictor
from bss_model.runtime import resolve_runtime
from bss_model.train import train

REPO = Path(__file__).resolve().parents[1]
# Metrics that must reproduce exactly (the timing ones cannot).
EXACT_KEYS = ("epoch", "step", "samples", "train_mse", "val_mse", "val_mse_digit", "val_mse_fashion", "lr")


@pytest.fixture(scope="module", autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def splits(data_dir: Path) -> Splits:
    return load_splits(DataConfig(dir=str(data_dir), download=False))


def make_config(data_dir: Path, *sets: str) -> Config:
    base = [
        f"data.dir={data_dir}",
        "data.download=false",
        "data.val_pairs=500",
        "model.variant=tiny",
        "train.device=cpu",
        "train.threads=1",
        "train.tensorboard=false",
        "train.batch_size=16",
        "eval.batch_size=500",
    ]
    return load_config(None, [*base, *sets])


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def one_epoch_run(data_dir: Path, splits: Splits, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 1-epoch run folder; tests copy it before writing into it."""
    out = tmp_path_factory.mktemp("one_epoch")
    result = train(make_config(data_dir, "train.epochs=1", "train.samples_per_epoch=160"), out_dir=out, splits=splits)
    assert result.status == "completed"
    return out


# --------------------------------------------------------------------------------------
# Learning, outputs and the on_epoch contract


def test_tiny_unet_learns_well_below_the_mix_baseline(data_dir: Path, splits: Splits, tmp_path: Path) -> None:
    cfg = make_config(
        data_dir,
        "train.epochs=3",
        "train.samples_per_epoch=3200",  # 100 steps x 32
        "train.batch_size=32",
        "data.val_pairs=2000",
        "train.tensorboard=true",
    )
    calls: list[tuple[dict[str, Any], Path]] = []

    def on_epoch(metrics: dict[str, Any], checkpoint_dir: Path) -> None:
        # The checkpoint is on disk, for this very epoch, when the callback runs (a Ray trial reports it).
        state = ckpt.load(Path(checkpoint_dir) / ckpt.FILENAME)
        assert state["epoch"] == metrics["epoch"]
        calls.append((dict(metrics), Path(checkpoint_dir)))

    out = tmp_path / "run"
    result = train(cfg, on_epoch=on_epoch, out_dir=out, splits=splits)

    assert result.status == "completed" and result.reason == "" and result.epochs_done == 3
    assert [m["epoch"] for m, _ in calls] == [1, 2, 3]
    assert [m for m, _ in calls] == result.history
    assert all(d == out / "checkpoint" for _, d in calls)
    assert result.metrics == result.history[-1]
    assert [m["step"] for m in result.history] == [100, 200, 300]
    assert [m["samples"] for m in result.history] == [3200, 6400, 9600]  # cumulative, steps x batch

    # The mix baseline on exactly the validation pairs the trainer scores.
    val_digit, val_fashion = torch.as_tensor(splits.val_digit), torch.as_tensor(splits.val_fashion)
    idx = draw_pairs(len(splits.val_digit), len(splits.val_fashion), cfg.data.val_pairs, cfg.data.val_seed)
    baseline = batched_mse(mix_baseline, val_digit, val_fashion, *idx, 1000)["mse"]
    val_mse = result.metrics["val_mse"]
    assert np.isfinite(val_mse) and val_mse < 0.8 * baseline, (val_mse, baseline)
    assert result.metrics["val_mse"] == pytest.approx(
        (result.metrics["val_mse_digit"] + result.metrics["val_mse_fashion"]) / 2, rel=1e-12
    )

    # Files: metrics.json, checkpoint + its config, TensorBoard events.
    metrics = read_json(out / "metrics.json")
    assert metrics["status"] == "completed" and metrics["epochs_done"] == 3
    assert metrics["final"]["val_mse"] == val_mse and len(metrics["history"]) == 3
    assert (metrics["samples"], metrics["samples_per_epoch"], metrics["steps_per_epoch"]) == (9600, 3200, 100)
    assert metrics["n_params"] == sum(p.numel() for p in ckpt.load(out)["model"].values())
    assert (out / "checkpoint" / "checkpoint.pt").is_file()
    assert load_config(out / "checkpoint" / "config.yaml") == cfg
    assert load_config(out / "config.yaml") == cfg
    events = list((out / "tb").glob("events.out.tfevents.*"))
    assert events

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    logged = [e.value for e in acc.Scalars("mse/val")]
    np.testing.assert_allclose(logged, [m["val_mse"] for m in result.history], rtol=1e-6)
    assert "val/separation" in acc.Tags()["images"]

    # The checkpoint holds the final weights: re-scoring it reproduces the last val MSE.
    model, saved_cfg = ckpt.load_model(out)
    assert saved_cfg == cfg
    rt = resolve_runtime(cfg.train)
    model = rt.prepare_model(model).eval()
    rescored = batched_mse(model_predictor(model, rt), val_digit, val_fashion, *idx, cfg.eval.batch_size)["mse"]
    assert rescored == pytest.approx(val_mse, rel=1e-6)


def test_train_loss_and_optimizer_keys_are_used(data_dir: Path, one_epoch_run: Path, splits: Splits, tmp_path):
    # The reference objective: the logged loss is the MSE itself.
    mse_run = read_json(one_epoch_run / "metrics.json")["final"]
    assert mse_run["train_loss"] == mse_run["train_mse"]
    cfg = make_config(
        data_dir, "train.epochs=1", "train.samples_per_epoch=160", "train.loss=l1", "train.optimizer=adamw",
        "train.weight_decay=1e-2",
    )  # fmt: skip
    result = train(cfg, out_dir=tmp_path, splits=splits)
    m = result.metrics
    assert result.status == "completed"
    # An L1 objective's value differs from the MSE it is scored by (|d| > d^2 for small residuals).
    assert m["train_loss"] > m["train_mse"] > 0 and np.isfinite(m["val_mse"])
    groups = ckpt.load(tmp_path)["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [1e-2, 0.0]  # AdamW: conv weights decayed, biases not


# --------------------------------------------------------------------------------------
# Exact resume


class Interrupted(Exception):
    pass


def _stop_after_first_epoch(metrics: dict[str, Any], checkpoint_dir: Path) -> None:
    if metrics["epoch"] == 1:
        raise Interrupted  # like a pre-empted trial: the epoch-1 checkpoint is already saved


@pytest.mark.parametrize("schedule", ["plateau", "cosine"])
def test_resume_is_exact(data_dir: Path, splits: Splits, tmp_path: Path, schedule: str) -> None:
    cfg = make_config(
        data_dir,
        "train.epochs=2",
        "train.samples_per_epoch=480",  # 30 steps x 16
        "train.precision=fp32",
        f"train.schedule={schedule}",
        "train.plateau_patience=0",
        "train.warmup_epochs=0.5",
        "train.lr=3e-3",
    )
    straight = train(cfg, out_dir=tmp_path / "straight", splits=splits)

    with pytest.raises(Interrupted):
        train(cfg, on_epoch=_stop_after_first_epoch, out_dir=tmp_path / "first", splits=splits)
    first_ckpt = tmp_path / "first" / "checkpoint" / "checkpoint.pt"
    first_state = ckpt.load(first_ckpt)
    assert first_state["epoch"] == 1 and first_state["step"] == 30 and first_state["samples"] == 480
    resumed = train(cfg, out_dir=tmp_path / "resumed", resume=first_ckpt, splits=splits)

    assert straight.status == resumed.status == "completed"
    assert straight.epochs_done == resumed.epochs_done == 2
    assert len(resumed.history) == 2  # the epoch-1 entry comes from the checkpoint
    for epoch in range(2):
        for key in EXACT_KEYS:
            assert resumed.history[epoch][key] == straight.history[epoch][key], (epoch, key)

    a = ckpt.load(tmp_path / "straight")
    b = ckpt.load(tmp_path / "resumed")
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
        assert a["model"][name].dtype == torch.float32
    for pid, sa in a["optimizer"]["state"].items():
        for key, value in sa.items():
            assert torch.equal(value, b["optimizer"]["state"][pid][key]), (pid, key)
    assert torch.equal(a["sampler"]["generator"], b["sampler"]["generator"])
    assert a["scheduler"] == b["scheduler"]
    # The resumed run really trained: its weights moved away from the epoch-1 checkpoint.
    assert any(not torch.equal(first_state["model"][n], b["model"][n]) for n in b["model"])
    # The two schedules really differ in what they do with the learning rate.
    if schedule == "cosine":
        assert straight.history[1]["lr"] < 3e-3 / 2
    else:
        assert straight.history[0]["lr"] == 3e-3


def test_ema_resume_is_exact(data_dir: Path, splits: Splits, tmp_path: Path) -> None:
    # Plateau with patience 0: the EMA's validation MSE drives the learning rate, so a resume that
    # restored the average inexactly would change the schedule as well as the weights.
    cfg = make_config(
        data_dir, "train.epochs=2", "train.samples_per_epoch=480", "train.precision=fp32", "train.ema_decay=0.95",
        "train.plateau_patience=0", "train.lr=3e-3",
    )  # fmt: skip
    straight = train(cfg, out_dir=tmp_path / "straight", splits=splits)
    with pytest.raises(Interrupted):
        train(cfg, on_epoch=_stop_after_first_epoch, out_dir=tmp_path / "first", splits=splits)
    first = ckpt.load(tmp_path / "first")
    assert int(first["ema"]["num_updates"]) == 30
    resumed = train(cfg, out_dir=tmp_path / "resumed", resume=tmp_path / "first", splits=splits)
    assert straight.status == resumed.status == "completed"
    for epoch in range(2):
        for key in EXACT_KEYS:
            assert resumed.history[epoch][key] == straight.history[epoch][key], (epoch, key)
    a, b = ckpt.load(tmp_path / "straight"), ckpt.load(tmp_path / "resumed")
    assert int(a["ema"]["num_updates"]) == int(b["ema"]["num_updates"]) == 60
    for weights in ("model", "train_model"):  # the EMA and the raw weights, bitwise
        assert a[weights].keys() == b[weights].keys()
        for name in a[weights]:
            assert torch.equal(a[weights][name], b[weights][name]), (weights, name)
    # The average really moved since epoch 1, and it is not the raw weights.
    assert any(not torch.equal(first["model"][n], b["model"][n]) for n in b["model"])
    assert any(not torch.equal(b["model"][n], b["train_model"][n]) for n in b["model"])


def test_ema_is_what_validation_and_the_checkpoint_score(data_dir: Path, splits: Splits, tmp_path: Path) -> None:
    # Cosine: the schedule ignores validation, so with and without an EMA the raw weights follow
    # exactly the same trajectory -- the EMA only watches.
    common = ["train.epochs=1", "train.samples_per_epoch=480", "train.precision=fp32", "train.schedule=cosine"]
    off = train(make_config(data_dir, *common), out_dir=tmp_path / "off", splits=splits)
    cfg = make_config(data_dir, *common, "train.ema_decay=0.9")
    on = train(cfg, out_dir=tmp_path / "on", splits=splits)
    a, b = ckpt.load(tmp_path / "off"), ckpt.load(tmp_path / "on")
    assert "train_model" not in a and "ema" not in a
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["train_model"][name]), name
    assert on.metrics["train_mse"] == off.metrics["train_mse"]
    assert on.metrics["val_mse"] != off.metrics["val_mse"]

    # load_model (evaluation, best_model.pt) returns the EMA weights, and they score the logged val MSE.
    model, _ = ckpt.load_model(tmp_path / "on")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, b["model"][name]), name
    rt = resolve_runtime(cfg.train)
    model = rt.prepare_model(model).eval()
    val_digit, val_fashion = torch.as_tensor(splits.val_digit), torch.as_tensor(splits.val_fashion)
    idx = draw_pairs(len(splits.val_digit), len(splits.val_fashion), cfg.data.val_pairs, cfg.data.val_seed)
    rescored = batched_mse(model_predictor(model, rt), val_digit, val_fashion, *idx, cfg.eval.batch_size)["mse"]
    assert rescored == pytest.approx(on.metrics["val_mse"], rel=1e-6)


def test_switching_the_ema_on_at_a_resume_starts_it_from_the_weights(data_dir: Path, one_epoch_run: Path, splits,
                                                                     tmp_path: Path) -> None:  # fmt: skip
    before = ckpt.load(one_epoch_run)
    cfg = make_config(data_dir, "train.epochs=2", "train.samples_per_epoch=160", "train.ema_decay=0.5")
    assert train(cfg, out_dir=tmp_path, resume=one_epoch_run, splits=splits).status == "completed"
    after = ckpt.load(tmp_path)
    assert int(after["ema"]["num_updates"]) == 10  # one epoch of 160 / 16 updates, counted from the resume
    # The average started at the epoch-1 weights and followed the training away from them.
    assert any(not torch.equal(before["model"][n], after["model"][n]) for n in before["model"])


# --------------------------------------------------------------------------------------
# Divergence


def test_diverging_run_reports_instead_of_raising(data_dir: Path, splits: Splits, tmp_path: Path) -> None:
    cfg = make_config(data_dir, "train.epochs=2", "train.samples_per_epoch=160", "train.batch_size=8", "train.lr=1e6")
    calls = []
    result = train(cfg, on_epoch=lambda m, d: calls.append(m), out_dir=tmp_path, splits=splits)
    assert result.status == "diverged"
    assert "non-finite" in result.reason
    assert result.epochs_done == 0 and result.history == [] and calls == []
    metrics = read_json(tmp_path / "metrics.json")
    assert metrics["status"] == "diverged" and "non-finite" in metrics["reason"] and metrics["epochs_done"] == 0
    assert not (tmp_path / "checkpoint" / "checkpoint.pt").exists(), "a diverged epoch must not be checkpointed"


def test_divergence_keeps_the_last_good_checkpoint(data_dir: Path, one_epoch_run: Path, splits: Splits, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(one_epoch_run, run)
    good = ckpt.load(run)
    # Same model, a second epoch at an absurd learning rate (cosine sets the lr every step).
    cfg = make_config(
        data_dir, "train.epochs=2", "train.samples_per_epoch=160", "train.schedule=cosine", "train.lr=1e6",
        "train.warmup_epochs=0",
    )  # fmt: skip
    result = train(cfg, out_dir=run, resume=run / "checkpoint" / "checkpoint.pt", splits=splits)
    assert result.status == "diverged" and "non-finite" in result.reason
    assert result.epochs_done == 1 and len(result.history) == 1
    kept = ckpt.load(run)
    assert kept["epoch"] == 1
    for name, tensor in good["model"].items():
        assert torch.equal(kept["model"][name], tensor) and torch.isfinite(tensor).all(), name
    assert read_json(run / "metrics.json")["status"] == "diverged"


# --------------------------------------------------------------------------------------
# Checkpoint safety


def test_resume_with_a_different_model_config_is_refused(data_dir: Path, one_epoch_run: Path, splits, tmp_path):
    cfg = make_config(data_dir, "train.epochs=2", "train.samples_per_epoch=160", "model.filters=4")
    with pytest.raises(CheckpointError, match=r"another model \(model\.filters: checkpoint 8, asked 4\)"):
        train(cfg, out_dir=tmp_path, resume=one_epoch_run / "checkpoint" / "checkpoint.pt", splits=splits)
    # The same model config resumes fine from the same checkpoint.
    cfg = make_config(data_dir, "train.epochs=2", "train.samples_per_epoch=160")
    assert train(cfg, out_dir=tmp_path / "ok", resume=one_epoch_run, splits=splits).epochs_done == 2


def test_loading_weights_into_another_model_is_refused(one_epoch_run: Path) -> None:
    from bss_model.model import build_model

    state = ckpt.load(one_epoch_run)
    other = build_model(load_config(None, ["model.variant=tiny", "model.filters=4"]).model)
    with pytest.raises(CheckpointError, match="does not fit"):
        ckpt.load_weights(other, state["model"], "ckpt")


def _random_bytes(seed: int) -> bytes:
    return np.random.default_rng(seed).bytes(int(np.random.default_rng(seed).integers(1, 5000)))


# Garbage makes torch's safe unpickler raise more than UnpicklingError; these cases cover the others
# (found by trying seeds): IndexError (4096 bytes, seeds 17, 21, 58), UnicodeDecodeError (seed 54),
# KeyError (_random_bytes 62, 172, 237); the remaining seeds give UnpicklingError.
RANDOM_FILES = {
    **{f"4096-{s}": (lambda s=s: np.random.default_rng(s).bytes(4096)) for s in (0, 1, 17, 21, 54, 58)},
    **{f"var-{s}": (lambda s=s: _random_bytes(s)) for s in (2, 3, 62, 172, 237)},
    "one-byte": lambda: b"\x80",
    "zip-magic": lambda: b"PK\x03\x04" + bytes(200),
}


@pytest.mark.parametrize("case", sorted(RANDOM_FILES))
def test_random_bytes_are_not_a_checkpoint(tmp_path: Path, case: str) -> None:
    path = tmp_path / "random.pt"
    path.write_bytes(RANDOM_FILES[case]())
    with pytest.raises(CheckpointError) as info:
        ckpt.load(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


class _RunsCode:
    """Unpickling this calls os.system: exactly what weights_only=True must refuse."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_a_pickle_that_runs_code_is_refused(tmp_path: Path, writer: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"format": ckpt.FORMAT, "model": _RunsCode(marker)}
    if writer == "pickle":
        path.write_bytes(pickle.dumps(payload, protocol=2))
        # The payload is live: an unsafe load really runs it.
        pickle.loads(path.read_bytes())
        assert marker.exists()
        marker.unlink()
    else:
        torch.save(payload, path)
    with pytest.raises(CheckpointError, match="refused|not a readable"):
        ckpt.load(path)
    assert not marker.exists(), "the checkpoint loader ran code from the file"
    with pytest.raises(CheckpointError):
        ckpt.load_model(path)
    assert not marker.exists()


def test_other_non_checkpoints_are_refused(tmp_path: Path) -> None:
    torch.save({"model": {"w": torch.zeros(3)}}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="not a bss-search checkpoint"):
        ckpt.load(tmp_path / "plain.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError):
        ckpt.load(tmp_path / "empty.pt")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        ckpt.load(tmp_path / "missing")


# --------------------------------------------------------------------------------------
# Command line


def _run(args: list[str], cwd: Path, data_dir: Path) -> subprocess.CompletedProcess:
    # data_dir is absolute; the raw $BSS_DATA_DIR may be relative to another folder than cwd.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "BSS_DATA_DIR": str(data_dir)}
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_cli_trains_into_numbered_run_folders_and_evaluates(data_dir: Path, tmp_path: Path) -> None:
    config = {
        "data": {"dir": str(data_dir), "download": False, "val_pairs": 1000},
        "model": {"variant": "tiny"},
        "train": {
            "epochs": 1,
            "samples_per_epoch": 3200,  # 100 steps x 32
            "batch_size": 32,
            "lr": "3e-3",
            "device": "cpu",
            "threads": 1,
            "tensorboard": False,
        },
    }
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(config))
    runs = tmp_path / "runs"
    train_cmd = ["-m", "bss_model.train", "--config", "tiny.yaml", "--out", str(runs)]

    first = _run([*train_cmd, "--set", "train.samples_per_epoch=160"], tmp_path, data_dir)
    second = _run(train_cmd, tmp_path, data_dir)
    assert sorted(p.name for p in runs.iterdir()) == ["000-tiny", "001-tiny"]
    for proc, run in ((first, runs / "000-tiny"), (second, runs / "001-tiny")):
        summary = json.loads(proc.stdout.strip().splitlines()[-1])
        assert summary["status"] == "completed" and Path(summary["run_dir"]) == run
        metrics = read_json(run / "metrics.json")
        assert metrics["status"] == "completed" and metrics["epochs_done"] == 1
        assert (run / "checkpoint" / "checkpoint.pt").is_file() and (run / "train.log").is_file()
    assert read_json(runs / "000-tiny" / "metrics.json")["final"]["step"] == 5  # the --set applied
    assert read_json(runs / "001-tiny" / "metrics.json")["final"]["step"] == 100

    proc = _run(
        ["-m", "bss_model.evaluate", "--checkpoint", str(runs / "001-tiny"), "--draws", "2", "--pairs", "1000"],
        tmp_path,
        data_dir,
    )
    result = json.loads(proc.stdout)
    assert (result["draws"], result["pairs"]) == (2, 1000)
    assert len(result["test_mse_per_draw"]) == 2
    assert 0 < result["test_mse_mean"] < result["baseline_mix_mse_mean"]
