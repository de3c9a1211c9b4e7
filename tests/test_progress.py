"""Tests for the training progress bar (bss_model.progress) and its hook in bss_model.train.

The bar itself is tested directly on a text stream that claims to be a terminal, with tqdm's clock faked so
the rate and ETA are exact; the CLI is run for real on a pipe (no bar) and on a pseudo-terminal (bar).
"""

from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path

import pytest
import tqdm.std

import bss_model.train as train_module
from bss_model.config import DataConfig, load_config
from bss_model.data import Splits, load_splits
from bss_model.progress import EpochProgress
from bss_model.train import FINITE_CHECK_EVERY, train

REPO = Path(__file__).resolve().parents[1]
# Today's per-epoch log line, which must stay as it is wherever the bar is off.
EPOCH_LINE = re.compile(r"INFO epoch 1/1 train \S+ val \S+ lr \S+ \d+ samples/s$", re.M)


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """tqdm's clock, under the test's control: ``clock[0]`` is the time in seconds."""
    now = [1000.0]
    monkeypatch.setattr(tqdm.std, "time", lambda: now[0])
    return now


def screen(stream: io.StringIO) -> str:
    """What the terminal shows now: the text after the last carriage return."""
    return stream.getvalue().split("\r")[-1]


def test_bar_renders_samples_per_s_loss_and_eta(clock: list[float]) -> None:
    term = FakeTerminal()
    bar = EpochProgress(epoch=3, epochs=120, steps=100, batch_size=32, enabled=True, stream=term, mininterval=0)
    for step in range(1, 26):  # 25 steps of 0.5 s: 64 samples/s, 12.5 s elapsed, 75 steps (37.5 s) to go
        clock[0] += 0.5
        bar.update(step, 0.0123 if step == 25 else None)
    shown = screen(term)
    assert shown.startswith("epoch 3/120  25%|")
    assert shown.endswith("| 800/3.20k [00:12, ETA 00:37, 64.0 samples/s, loss 1.230e-02]")
    # Steps without a loss keep the last one shown; the (smoothed) rate follows the clock down to 32 samples/s.
    for step in range(26, 51):
        clock[0] += 1.0
        bar.update(step)
    assert screen(term).endswith(" samples/s, loss 1.230e-02]")
    rate = float(re.search(r", ([\d.]+) samples/s", screen(term)).group(1))
    assert 32 <= rate < 40
    bar.close()
    assert screen(term).strip() == ""  # cleared, so the epoch's log line starts on a clean line


def test_bar_off_writes_nothing(clock: list[float]) -> None:
    term = FakeTerminal()
    bar = EpochProgress(epoch=1, epochs=1, steps=10, batch_size=8, enabled=False, stream=term, mininterval=0)
    for step in range(1, 11):
        clock[0] += 1
        bar.update(step, 0.5)
    bar.close()
    assert term.getvalue() == ""


@pytest.fixture(scope="module")
def splits(data_dir: Path) -> Splits:
    return load_splits(DataConfig(dir=str(data_dir), download=False))


@pytest.mark.parametrize("progress", [True, False])
def test_train_feeds_the_bar_step_counts_and_synced_losses(
    data_dir: Path, splits: Splits, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, progress: bool
) -> None:
    calls: list[tuple] = []

    class Recorder(EpochProgress):
        def __init__(self, epoch, epochs, steps, batch_size, enabled, **kw) -> None:
            calls.append(("open", epoch, epochs, steps, batch_size, enabled))
            super().__init__(epoch, epochs, steps, batch_size, enabled=False)
            self.enabled = enabled  # as if drawing, without drawing

        def update(self, step_done: int, loss: float | None = None) -> None:
            calls.append(("update", step_done, loss))

        def close(self) -> None:
            calls.append(("close",))

    monkeypatch.setattr(train_module, "EpochProgress", Recorder)
    steps = 2 * FINITE_CHECK_EVERY + 7
    cfg = load_config(
        None,
        [f"data.dir={data_dir}", "data.download=false", "data.val_pairs=200", "model.variant=tiny",
         "train.device=cpu", "train.threads=1", "train.tensorboard=false", "train.batch_size=8",
         "train.epochs=1", f"train.samples_per_epoch={steps * 8}", "eval.batch_size=200"],
    )  # fmt: skip
    result = train(cfg, out_dir=tmp_path, splits=splits, progress=progress)
    assert result.status == "completed"
    assert calls[0] == ("open", 1, 1, steps, 8, progress) and calls[-1] == ("close",)
    updates = calls[1:-1]
    assert [u[1] for u in updates] == list(range(1, steps + 1))  # every step, in order
    with_loss = [u[1] for u in updates if u[2] is not None]
    # The loss only where the loop checks for non-finite values anyway (and so has already synced),
    # bar or no bar: showing it costs no extra device wait.
    assert with_loss == [FINITE_CHECK_EVERY, 2 * FINITE_CHECK_EVERY, steps]
    assert updates[-1][2] == pytest.approx(result.metrics["train_mse"], rel=1e-6)  # the epoch's running mean


def _train_cli(tmp_path: Path, data_dir: Path, stderr) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "bss_model.train", "--out", str(tmp_path / "runs"), "--data-dir", str(data_dir)]
    for s in ("model.variant=tiny", "train.device=cpu", "train.threads=1", "train.tensorboard=false",
              "train.epochs=1", "train.samples_per_epoch=1920", "train.batch_size=16", "data.val_pairs=200",
              "data.download=false", "eval.batch_size=200"):  # fmt: skip
        cmd += ["--set", s]
    return subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)


def test_cli_without_a_terminal_keeps_plain_log_lines(tmp_path: Path, data_dir: Path) -> None:
    proc = _train_cli(tmp_path, data_dir, subprocess.PIPE)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert "\r" not in stderr and "ETA" not in stderr and "%|" not in stderr  # no bar, no control characters
    assert "\r" not in stdout and "ETA" not in stdout
    assert len(EPOCH_LINE.findall(stdout)) == 1


def test_cli_on_a_terminal_shows_the_bar(tmp_path: Path, data_dir: Path) -> None:
    leader, follower = pty.openpty()
    # A new pty is 0x0 characters, where tqdm draws nothing: give it a real terminal's size (rows, cols).
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    proc = _train_cli(tmp_path, data_dir, follower)
    os.close(follower)  # the child holds its own copy; reading ends (EIO) when the child exits
    chunks: list[bytes] = []

    def drain() -> None:  # read as it comes, so a full pty buffer never blocks the child
        while True:
            try:
                data = os.read(leader, 4096)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    stdout, _ = proc.communicate(timeout=300)
    reader.join(timeout=10)
    os.close(leader)
    terminal = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, terminal
    assert re.search(r"epoch 1/1 +\d+%\|", terminal), terminal
    assert "ETA" in terminal and "samples/s" in terminal, terminal
    assert len(EPOCH_LINE.findall(stdout)) == 1  # the log line is still there, on stdout
