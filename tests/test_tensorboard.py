"""TensorBoard over a finished experiment, through the real server's HTTP API.

The experiment is the tiny search of ``_searchutil.faulty_search`` (shared with test_reliability): it
has a trial retried after an exception, one retried after its worker was SIGKILLed and one that
diverged, so this also checks that retries leave TensorBoard with one consistent curve per trial.
"""

from __future__ import annotations

import json
import math
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _searchutil import (
    EPOCHS,
    PY,
    Proc,
    env_with,
    faulty_search_once,
    free_port,
    read_json,
    results,
)

TENSORBOARD = str(Path(PY).with_name("tensorboard"))


@pytest.fixture(scope="session")
def faulty_search(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> dict[str, Any]:
    return faulty_search_once(tmp_path_factory, data_dir)


def get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def tb(faulty_search: dict[str, Any], data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A real TensorBoard server on the experiment; yields the base URL and the run names it must list."""
    exp = faulty_search["exp"]
    trials = {p.parent.name: p.parent for p in exp.glob("*/*/params.json")}  # search/ and retrain/ trials
    expected = {str(d.relative_to(exp)) for d in trials.values()}  # one run per trial: Tune's events and ours
    port = free_port()
    cwd = tmp_path_factory.mktemp("tb")
    args = [TENSORBOARD, "--logdir", str(exp), "--host", "127.0.0.1", "--port", str(port), "--reload_interval", "2"]
    proc = Proc(args, cwd, env_with(data_dir), "tensorboard")
    url = f"http://127.0.0.1:{port}"

    def all_runs_loaded() -> list[str] | None:
        try:
            runs = get(f"{url}/data/runs")
        except OSError:  # not listening yet
            return None
        return runs if expected <= set(runs) else None

    try:
        runs = proc.wait_until(all_runs_loaded, 90, f"TensorBoard to list {sorted(expected)}")
        yield {"url": url, "exp": exp, "runs": runs, "trials": trials}
    finally:
        proc.cleanup()


def scalars(url: str, run: str, tag: str) -> list[list[float]]:
    query = urllib.parse.urlencode({"run": run, "tag": tag})
    return get(f"{url}/data/plugin/scalars/scalars?{query}")


@pytest.mark.slow
def test_tensorboard_lists_every_trial_and_seed_with_their_curves(tb: dict[str, Any]) -> None:
    url, exp = tb["url"], tb["exp"]
    assert len([t for t in tb["trials"].values() if t.parent.name == "search"]) == 3
    assert len([t for t in tb["trials"].values() if t.parent.name == "retrain"]) == 2
    scalar_tags = get(f"{url}/data/plugin/scalars/tags")
    image_tags = get(f"{url}/data/plugin/images/tags")
    report = {t["trial_id"]: t for t in read_json(exp / "report.json")["trials"]}
    checked = 0
    for name, folder in tb["trials"].items():
        run, phase = str(folder.relative_to(exp)), folder.parent.name
        last = results(exp, phase)[name][-1] if phase == "retrain" else report[name.split("-", 1)[1]]
        if last.get("status") == "diverged":
            assert "mse/val" not in scalar_tags.get(run, {}), "a diverged epoch must log no curve point"
            continue
        # Tune's own logger and ours both wrote the validation MSE, into the same run.
        assert "ray/tune/val_mse" in scalar_tags[run]
        assert {"mse/train", "mse/val"} <= set(scalar_tags[run])
        assert "val/separation" in image_tags[run]
        points = scalars(url, run, "mse/val")
        assert [int(step) for _, step, _ in points] == list(range(1, EPOCHS + 1)), points
        assert math.isclose(points[-1][2], last["val_mse"], rel_tol=1e-5), (run, points, last["val_mse"])
        checked += 1
    assert checked == 4, "two finished search trials and two retrain seeds"
