"""Security: untrusted checkpoints and configs cannot run code, and the local Ray stays on localhost."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from _searchutil import PY, REPO, RUN


class Payload:
    """Unpickling this runs ``touch <path>``: what a malicious checkpoint would do."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return os.system, (f"touch {self.path}",)


def one_line_refusal(cmd: list[str], cwd: Path) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_a_checkpoint_that_runs_code_is_refused(tmp_path: Path) -> None:
    pwned = tmp_path / "pwned"
    model = tmp_path / "experiment" / "best_model.pt"
    model.parent.mkdir()
    torch.save({"format": "bss-checkpoint-v1", "config": {}, "model": Payload(pwned)}, model)
    line = one_line_refusal([PY, "-m", "bss_model.evaluate", "--checkpoint", str(model.parent)], REPO)
    assert "refused by the safe loader" in line and str(model) in line
    assert not pwned.exists(), "the payload ran"
    # Control: the file really is malicious -- an unsafe load runs the payload.
    torch.load(model, weights_only=False)
    assert pwned.exists()


@pytest.mark.parametrize("entry", ["bss_model.train", "search/run.py"])
def test_a_config_with_a_python_tag_is_refused(entry: str, tmp_path: Path) -> None:
    pwned = tmp_path / "pwned"
    section = "train" if entry == "bss_model.train" else "base"
    config = tmp_path / "evil.yaml"
    config.write_text(f'{section}: !!python/object/apply:os.system ["touch {pwned}"]\n')
    if entry == "bss_model.train":
        cmd = [PY, "-m", "bss_model.train", "--config", str(config), "--out", str(tmp_path / "runs")]
    else:
        cmd = [PY, RUN, "--config", str(config), "--storage-path", str(tmp_path / "results")]
    assert "uses a YAML tag that is not allowed" in one_line_refusal(cmd, tmp_path)
    assert not pwned.exists(), "the payload ran"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.yaml"], "nothing may be created"
    # Control: an unsafe YAML load runs it.
    yaml.unsafe_load(config.read_text())
    assert pwned.exists()


def test_the_local_ray_keeps_its_dashboard_on_localhost(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    from search.cluster import init_ray

    calls: list[dict[str, Any]] = []
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    init_ray(None)
    (kwargs,) = calls
    assert kwargs.get("address") == "local", "no --address: always a new local Ray, never an attached one"
    assert kwargs["dashboard_host"] == "127.0.0.1"
    assert kwargs["include_dashboard"] is False


def test_make_dashboard_binds_to_localhost_and_names_a_missing_study(tmp_path: Path) -> None:
    """`make dashboard NAME=...` (dry run, setup skipped) serves results/<NAME>/optuna.db on 127.0.0.1 only,
    and a name without a study is one line naming the file and the experiments that have one."""
    makefile = str(REPO / "Makefile")
    (tmp_path / "results" / "exp").mkdir(parents=True)
    (tmp_path / "results" / "exp" / "optuna.db").touch()

    def make(name: str) -> subprocess.CompletedProcess:
        cmd = ["make", "-s", "-f", makefile, "-n", "-o", "setup", "dashboard", f"NAME={name}"]
        return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=60)

    ok = make("exp")
    assert ok.returncode == 0, ok.stderr
    (line,) = ok.stdout.strip().splitlines()
    assert line.split()[1:] == [f"sqlite:///{tmp_path / 'results/exp/optuna.db'}", "--host", "127.0.0.1"]
    missing = make("nope")
    assert missing.returncode != 0 and missing.stdout == ""
    (error,) = missing.stderr.strip().splitlines()
    assert "results/nope/optuna.db does not exist" in error and "(with a study: exp)" in error
