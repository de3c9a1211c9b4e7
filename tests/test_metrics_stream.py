"""bss-train's metrics as they happen: metrics.jsonl gains a line per epoch as it ends, and with --metrics-stdout
stdout carries the same JSON lines (and the final result) alone, so an outside sweeper can follow a run live."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bss_model.config import load_config
from bss_model.train import train

METRICS_LOG = "metrics.jsonl"  # (bss_model.train.METRICS_LOG)

TINY = ["model.variant=tiny", "model.filters=4", "train.device=cpu", "train.threads=1", "train.precision=fp32",
        "train.tensorboard=false", "data.val_pairs=64", "data.download=false"]  # fmt: skip


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_each_epoch_reaches_stdout_and_metrics_jsonl_while_the_run_trains(tmp_path: Path, data_dir: Path) -> None:
    cmd = [sys.executable, "-m", "bss_model.train", "--out", str(tmp_path / "runs"), "--metrics-stdout",
           "--data-dir", str(data_dir), *TINY, "train.epochs=3", "train.samples_per_epoch=1600"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = json.loads(proc.stdout.readline())
        # Read while the run goes on: epoch 1's line came before epochs 2 and 3 were trained.
        assert proc.poll() is None, proc.stderr.read()
        assert first["epoch"] == 1 and {"val_mse", "train_mse", "samples", "lr"} <= set(first)
        (run,) = (tmp_path / "runs").iterdir()
        assert lines(run / METRICS_LOG)[0] == first
        rest, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    out = [json.loads(line) for line in rest.splitlines()]  # stdout is JSON lines only: the log went to stderr
    assert [m["epoch"] for m in out[:-1]] == [2, 3] and out[-1]["status"] == "completed"
    assert "INFO epoch 1/3" in err
    assert lines(run / METRICS_LOG) == [first, *out[:-1]]
    assert json.loads((run / "metrics.json").read_text())["history"] == lines(run / METRICS_LOG)


def test_a_resumed_run_has_every_epoch_once(tmp_path: Path, data_dir: Path) -> None:
    """Killed between a checkpoint and its line (the line is written after the checkpoint): the resume
    rewrites metrics.jsonl from the checkpoint's history, then goes on appending."""
    cfg = load_config(None, [f"data.dir={data_dir}", *TINY, "train.epochs=2", "train.samples_per_epoch=64"])
    run = tmp_path / "run"
    assert train(cfg, out_dir=run).status == "completed"
    log = run / METRICS_LOG
    done = lines(log)
    assert [m["epoch"] for m in done] == [1, 2]
    log.write_text(json.dumps(done[0]) + "\n")  # epoch 2 checkpointed, its line lost
    cfg.train.epochs = 3
    assert train(cfg, out_dir=run, resume=run / "checkpoint").status == "completed"
    again = lines(log)
    assert [m["epoch"] for m in again] == [1, 2, 3] and again[:2] == done
