"""Experiment integrity (issue 21): one driver per experiment, faults that keep the experiment resumable, and
files that are never silently lost, rerun or half-overwritten.

Fast: the resume lines, the lock and the S3 lease (against a real SeaweedFS server, tests/_s3util.py), the
--resume checks on damaged or missing files, gs:// without a network.
Slow (real tiny searches in subprocesses, tests/_searchutil.py): two drivers on one experiment, SIGTERM, a full
disk on a real tmpfs, a folder deleted under a running search, and one finished experiment copied per case of
a damaged file.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import pytest
from _searchutil import SMOKE, TINY, sets

# --------------------------------------------------------------------------------------
# The printed resume command, pasted back into a shell, is the same command


def _captured(monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    def capture(*args: Any) -> dict:
        seen["resume_cmd"] = args[-1]
        return {}

    monkeypatch.setattr(module, name, capture)
    return seen


def test_resume_lines_are_shell_quoted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 21: `resume with ...` joined the arguments with spaces, so one holding a space failed when pasted."""
    import search.retrain
    import search.run

    storage = str(tmp_path / "my results")
    argv = ["--config", SMOKE, "--storage-path", storage, "--name", "exp", *sets(*TINY, "base.train.lr=1e-3")]
    seen = _captured(monkeypatch, search.run, "search_retrain_report")
    assert search.run.main(argv) == 0
    assert shlex.split(seen["resume_cmd"]) == ["python", "search/run.py", *argv, "--resume"]

    seen = _captured(monkeypatch, search.retrain, "retrain_report")
    argv = ["--config", str(Path(__file__).parents[1] / "configs" / "seed.yaml"), "--name", "it's mine",
            "--storage-path", storage, "--seeds", "2"]  # fmt: skip
    assert search.retrain.main(argv) == 0
    assert shlex.split(seen["resume_cmd"]) == ["python", "search/retrain.py", *argv, "--resume"]
