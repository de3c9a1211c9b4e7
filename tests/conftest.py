"""Shared fixtures.

Tests run offline against a local copy of the datasets named by ``BSS_DATA_DIR``. A missing or
wrong setting fails the run loudly: skipping would let a misconfigured CI pass without testing
the data path at all.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests._searchutil import REPO


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--shuffle", type=int, default=None, metavar="SEED",
        help="run the collected tests in an order shuffled by SEED: a test that needs another to run first fails",
    )  # fmt: skip


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    seed = config.getoption("--shuffle")
    if seed is not None:
        random.Random(seed).shuffle(items)


def pytest_configure(config: pytest.Config) -> None:
    # The README's `BSS_DATA_DIR=../shared/data` is relative to the repo, but CLI tests run their
    # subprocesses in temp folders, where it would name nothing: every subprocess inherits this
    # environment, so make the setting absolute once, here, for all of them.
    value = os.environ.get("BSS_DATA_DIR")
    if value:
        os.environ["BSS_DATA_DIR"] = str(Path(value).resolve())


@pytest.fixture(scope="session", autouse=True)
def _one_intra_op_thread() -> Iterator[None]:
    """Torch runs on one intra-op thread in every test: the models here are tiny, and on a shared 2-core
    machine two OpenMP threads can be ten times slower than one (tests/test_model.py: 6 s vs 60 s)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _root_entries() -> set[str]:
    # What tools make there (.venv, .pytest_cache, __pycache__, the editable install's egg-info) is not a test's.
    return {n for n in os.listdir(REPO) if not n.startswith(".") and n != "__pycache__" and not n.endswith(".egg-info")}


@pytest.fixture(autouse=True)
def _nothing_written_into_the_checkout() -> Iterator[None]:
    """A test runs the commands in a folder of its own: one that ran them in the checkout left `results/` and
    `runs #1/` in a fresh clone's root (and once a SQLite file, committed by mistake)."""
    before = _root_entries()
    yield
    new = sorted(_root_entries() - before)
    if new:
        pytest.fail(f"this test wrote {new} into the checkout's root ({REPO}): run the command in tmp_path")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Folder holding ``mnist/`` and ``fashion-mnist/`` with the four canonical IDX files each."""
    value = os.environ.get("BSS_DATA_DIR")
    if not value:
        pytest.fail(
            "BSS_DATA_DIR is not set: point it at a folder holding mnist/ and fashion-mnist/ "
            "(e.g. BSS_DATA_DIR=/work/shared/data); tests never download",
            pytrace=False,
        )
    path = Path(value).resolve()  # subprocess tests run in temp folders: a relative setting must not move
    missing = [str(path / ds) for ds in ("mnist", "fashion-mnist") if not (path / ds).is_dir()]
    if missing:
        pytest.fail(
            f"BSS_DATA_DIR={value} lacks {', '.join(missing)}: point it at the offline dataset copy", pytrace=False
        )
    return path


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Bad input must be refused before Ray starts: ray.init fails the test if it is reached. The ``bss``
    logger's handlers are restored afterwards (the commands open their log files in tmp folders)."""
    import logging

    import ray

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("bad input got as far as ray.init")

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    logger = logging.getLogger("bss")
    handlers = list(logger.handlers)
    yield
    for h in set(logger.handlers) - set(handlers):
        logger.removeHandler(h)
        h.close()
