"""Resume keeps the run's own config: ``python -m bss_model.train --resume <run>``, as the README writes it."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SEED = str(REPO / "configs" / "seed.yaml")
# configs/seed.yaml at a tiny budget on this machine's CPU: 2 steps of 32, 100 validation pairs.
TINY = ["train.epochs=1", "train.samples_per_epoch=64", "data.val_pairs=100", "train.device=cpu",
        "train.precision=fp32", "train.threads=1", "train.tensorboard=false"]  # fmt: skip


def train_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "bss_model.train", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def sets(*items: str) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def fingerprint(run: Path) -> dict[str, str]:
    """Every file of a run folder, by content (and the folder's listing)."""
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in run.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def seed_run(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    cwd = tmp_path_factory.mktemp("resume")
    proc = train_cli(cwd, "--config", SEED, *sets(*TINY))
    assert proc.returncode == 0, proc.stderr
    return cwd


def test_resume_as_the_readme_writes_it_uses_the_runs_config(seed_run: Path) -> None:
    """It was refused for a run made with --config configs/seed.yaml (the defaults are not that config)."""
    run = seed_run / "runs" / "000-seed"
    before = (run / "config.yaml").read_text()
    proc = train_cli(seed_run, "--resume", "runs/000-seed")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["status"] == "completed"
    assert (run / "config.yaml").read_text() == before


@pytest.mark.parametrize(
    ("args", "named"),
    [
        # The run was 1 epoch of 64 samples: the config file says 120 x 161,984.
        (["--config", SEED], ["train.epochs: run 1, asked 120", "train.samples_per_epoch: run 64, asked 161984"]),
        (
            sets("model.filters=8", "train.lr=0.01"),
            ["model.filters: run 32, asked 8", "train.lr: run 0.001, asked 0.01"],
        ),
    ],
    ids=["config", "set"],
)
def test_a_conflicting_resume_is_refused_naming_the_keys_and_writes_nothing(
    seed_run: Path, args: list[str], named: list[str]
) -> None:
    run = seed_run / "runs" / "000-seed"
    before = fingerprint(run)
    proc = train_cli(seed_run, "--resume", "runs/000-seed", *args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and all(n in lines[0] for n in named), proc.stderr
    assert "ModelConfig(" not in lines[0] and "Traceback" not in proc.stderr
    assert fingerprint(run) == before, "a refused resume rewrites nothing the run wrote"


def test_more_epochs_is_allowed_and_stated_in_the_log(seed_run: Path, tmp_path: Path) -> None:
    import shutil

    run = tmp_path / "runs" / "000-seed"
    shutil.copytree(seed_run / "runs" / "000-seed", run)
    proc = train_cli(tmp_path, "--resume", "runs/000-seed", *sets("train.epochs=2"))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["epoch"] == 2 and result["samples"] == 128
    assert "resuming with changes asked for: train.epochs: was 1, now 2" in (run / "train.log").read_text()
    # Fewer epochs than done is refused.
    proc = train_cli(tmp_path, "--resume", "runs/000-seed", *sets("train.epochs=1"))
    assert proc.returncode == 2 and "already trained 2 epochs" in proc.stderr, proc.stderr
