"""Entry points: the console scripts, and process-wide state set only by them and given back when they return.

A command run in-process (a test, a notebook) must leave logging, os.environ, Optuna's verbosity and
matplotlib's backend as it found them; library functions must not change them at all.
"""

from __future__ import annotations

import logging
import os
import sys
from importlib import import_module
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def process_state() -> dict[str, Any]:
    import optuna

    bss = logging.getLogger("bss")
    return {
        "bss": (bss.level, bss.propagate, list(bss.handlers)),
        "env": {k: os.environ.get(k) for k in ("RAY_AIR_NEW_OUTPUT", "BSS_DATA_DIR")},
        "optuna": optuna.logging.get_verbosity(),
        "unraisablehook": sys.unraisablehook,
    }


@pytest.mark.parametrize(
    ("script", "target"), [("bss-search", "search.run:main"), ("bss-retrain", "search.retrain:main")]
)
def test_console_scripts_beside_bss_separate(
    script: str, target: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pyproject = (ROOT / "pyproject.toml").read_text().splitlines()  # (tomllib is 3.11+; we support 3.10)
    scripts = pyproject[pyproject.index("[project.scripts]") :]
    assert f'{script} = "{target}"' in scripts and 'bss-separate = "bss_model.separate:main"' in scripts
    module, name = target.split(":")
    monkeypatch.setattr(sys, "argv", [f"/venv/bin/{script}", "--help"])  # as the installed script runs it
    with pytest.raises(SystemExit) as info:
        getattr(import_module(module), name)()
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: {script} ")


def test_the_license_is_an_spdx_string() -> None:
    lines = (ROOT / "pyproject.toml").read_text().splitlines()
    # A table ({text = "MIT"}) makes setuptools warn twice on every install.
    assert [line for line in lines if line.startswith("license")] == ['license = "MIT"', 'license-files = ["LICENSE"]']


def test_a_search_run_in_process_leaves_the_process_as_it_found_it(
    tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """search.run.main up to a user error after its settings were made (a --resume of nothing): nothing stays."""
    import optuna
    import ray

    from search.run import main

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("bad input got as far as ray.init"))
    monkeypatch.delenv("RAY_AIR_NEW_OUTPUT", raising=False)
    monkeypatch.setenv("BSS_DATA_DIR", os.path.relpath(data_dir))
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.INFO)
    before = process_state()
    argv = ["--config", str(ROOT / "configs/smoke.yaml"), "--storage-path", str(tmp_path), "--name", "none",
            "--resume"]  # fmt: skip
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and "cannot --resume" in capsys.readouterr().err
    after = process_state()
    optuna.logging.set_verbosity(verbosity)
    assert after == before


def test_a_logger_test_after_an_in_process_search_still_sees_the_records(
    tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The order dependence: pytest's caplog (on the root logger) after search.run.main had run in-process,
    as far as its log file and then a Ray address with nobody listening."""
    from _searchutil import free_port

    from search.run import main

    argv = ["--config", str(ROOT / "configs/smoke.yaml"), "--storage-path", str(tmp_path), "--name", "new",
            "--address", f"127.0.0.1:{free_port()}"]  # fmt: skip
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and (tmp_path / "new" / "search.log").exists()
    logging.getLogger("bss").warning("after the search")
    assert "after the search" in caplog.text


def test_library_functions_leave_optuna_and_matplotlib_as_they_were(tmp_path: Path) -> None:
    import matplotlib
    import numpy as np
    import optuna

    from bss_model.viz import save_separation_png
    from search.figures import optuna_study
    from search.space import parse_space
    from search.study import open_study

    backend, verbosity = matplotlib.get_backend(), optuna.logging.get_verbosity()
    matplotlib.use("svg")  # a user's choice, which rendering a report must not change
    optuna.logging.set_verbosity(optuna.logging.DEBUG)
    try:
        x = np.zeros((2, 1, 32, 32), dtype=np.float32)
        save_separation_png(x, np.zeros((2, 2, 32, 32), np.float32), np.zeros((2, 2, 32, 32), np.float32),
                            tmp_path / "grid.png")  # fmt: skip
        assert (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"
        open_study(tmp_path / "optuna.db", "s")
        optuna_study([], parse_space({"train.lr": {"loguniform": [1e-4, 1e-2]}}))
        assert matplotlib.get_backend() == "svg"
        assert optuna.logging.get_verbosity() == optuna.logging.DEBUG
    finally:
        matplotlib.use(backend)
        optuna.logging.set_verbosity(verbosity)


def test_train_leaves_the_global_random_generators_as_it_found_them(tmp_path: Path, data_dir: Path) -> None:
    """train() seeds Python's, numpy's and torch's generators for its run; the caller's draws go on unchanged."""
    import random

    import numpy as np
    import torch

    from bss_model.config import load_config
    from bss_model.train import train

    sets = [f"data.dir={data_dir}", "data.download=false", "data.val_pairs=100", "model.variant=tiny",
            "train.device=cpu", "train.threads=1", "train.tensorboard=false", "train.batch_size=16",
            "train.epochs=1", "train.samples_per_epoch=32", "train.seed=7"]  # fmt: skip
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    expected = random.random(), np.random.rand(), torch.rand(1).item()
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    threads = torch.get_num_threads()
    try:
        assert train(load_config(None, sets), out_dir=tmp_path).status == "completed"
    finally:
        torch.set_num_threads(threads)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
