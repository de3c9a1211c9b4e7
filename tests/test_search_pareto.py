"""A real two-objective search (val_mse, cpu_ms), end to end on a local Ray, then a second point of its front retrained
with ``bss-retrain --pick``: one search feeds every assertion here.

Three trials, the first two the starting points filters 2 and filters 12 (so the front has a cheap and a strong
end), two epochs each and no early stop (ASHA's stops and the front's rule that a stopped trial is never on it are
proved without Ray: test_objectives.py, test_search_replay.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from _searchutil import REPO, TINY, env_with, run_to_end, search_args

pytestmark = pytest.mark.slow

POINTS = "[" + ", ".join(
    f"{{model.filters: {f}, model.bottleneck_convs: 1, model.decoder_convs: 1, train.lr: 2.0e-3}}" for f in (2, 12)
) + "]"  # fmt: skip
MO = [
    *TINY,
    "retrain.seeds=1",
    "tune.objectives=[val_mse, cpu_ms]",
    "space.model.filters={choice: [2, 12]}",
    f"tune.points_to_evaluate={POINTS}",
]


def files(folder: Path, skip: str = "picks") -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.relative_to(folder).parts[0] != skip}  # fmt: skip


@pytest.fixture(scope="module")
def experiment(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> dict:
    tmp = tmp_path_factory.mktemp("pareto")
    proc = run_to_end(search_args(tmp / "results", "mo", tiny=MO), tmp, env_with(data_dir), "search", timeout=400)
    assert proc.p.returncode == 0, proc.tail()
    return {"exp": tmp / "results" / "mo", "tmp": tmp, "proc": proc, "data_dir": data_dir}


def test_optuna_db_holds_a_two_objective_study_of_the_search(experiment: dict) -> None:
    import optuna

    exp = experiment["exp"]
    study = optuna.load_study(study_name="mo", storage=f"sqlite:///{exp / 'optuna.db'}")
    assert len(study.directions) == 2 and set(study.directions) == {optuna.study.StudyDirection.MINIMIZE}
    assert study.metric_names == ["val_mse", "cpu_ms"]
    report = json.loads((exp / "report.json").read_text())
    costs = report["pareto"]["costs"]
    by_id = {t.user_attrs["tune_trial_id"]: t for t in study.trials}
    assert sorted(by_id) == sorted(t["trial_id"] for t in report["trials"]) and len(by_id) == 3
    for row in report["trials"]:
        t, c = by_id[row["trial_id"]], costs[row["trial_id"]]
        assert t.state.name == "COMPLETE" and row["status"] == "completed"
        assert t.values == [row["val_mse"], c["cpu_ms"]]
        assert t.user_attrs["params"] == c["params"] and t.user_attrs["cpu_model"] == c["cpu_model"]
    # Optuna's own Pareto front of the study is the report's.
    assert {t.user_attrs["tune_trial_id"] for t in study.best_trials} == {
        p["trial_id"] for p in report["pareto"]["front"]
    }


def test_the_report_holds_the_front_its_costs_and_the_pick(experiment: dict) -> None:
    from PIL import Image

    from search.costs import cpu_model
    from search.pareto import dominates

    exp = experiment["exp"]
    r = json.loads((exp / "report.json").read_text())
    p = r["pareto"]
    assert p["objectives"] == ["val_mse", "cpu_ms"] and p["cost"] == "cpu_ms" and p["cpu_models"] == [cpu_model()]
    for trial_id, c in p["costs"].items():  # measured once per trial, on one thread, for a batch of one
        assert c["params"] > 0 and c["macs"] > 0 and math.isfinite(c["cpu_ms"]) and c["cpu_ms"] > 0, trial_id
        assert c["latency_batch"] == 1 and c["cpu_precision"] in ("bf16", "fp32")
    by_id = {t["trial_id"]: t for t in r["trials"]}
    small = [t for t in r["trials"] if t["params"]["model.filters"] == 2]
    assert small and p["costs"][small[0]["trial_id"]]["params"] < min(
        p["costs"][t["trial_id"]]["params"] for t in r["trials"] if t["params"]["model.filters"] == 12
    )
    points = [(pt["cost"], pt["val_mse"]) for pt in p["front"]]
    assert points and points == sorted(points)
    assert all(by_id[pt["trial_id"]]["status"] == "completed" for pt in p["front"])
    everyone = [(p["costs"][t]["cpu_ms"], by_id[t]["val_mse"]) for t in p["costs"]]
    assert not any(dominates(q, pt) for pt in points for q in everyone)  # nothing dominates a front point
    assert [h["trial_id"] for h in p["hypervolume"]] and len(p["hypervolume"]) == 3
    hv = [h["hypervolume"] for h in p["hypervolume"]]
    assert hv == sorted(hv) and hv[-1] > 0
    assert r["pick"]["rule"] == "best" and r["pick"]["trial_id"] == min(
        r["trials"], key=lambda t: t["val_mse"]
    )["trial_id"]  # fmt: skip
    md = (exp / "report.md").read_text()
    assert "## Accuracy against cpu_ms" in md and "| # | trial | params | macs | cpu_ms | val MSE | |" in md
    assert f"Retrained: trial {r['pick']['trial_id']} (retrain.pick: `best`)" in md
    for name in ("pareto_front.png", "hypervolume.png"):
        assert f"]({name})" in md
        with Image.open(exp / name) as img:
            img.verify()


def test_pick_retrains_a_second_point_and_leaves_the_first_retrain_byte_identical(experiment: dict) -> None:
    import torch

    exp, tmp = experiment["exp"], experiment["tmp"]
    r = json.loads((exp / "report.json").read_text())
    small = next(t for t in r["trials"] if t["params"]["model.filters"] == 2)
    limit = r["pareto"]["costs"][small["trial_id"]]["params"]
    assert r["pick"]["trial_id"] != small["trial_id"], "the best is the small model: no second point to pick"
    before = files(exp)
    args = [str(REPO / "search" / "retrain.py"), "--experiment", str(exp), "--pick", f"params<={limit}"]
    proc = run_to_end(args, tmp, env_with(experiment["data_dir"]), "pick", timeout=300)
    assert proc.p.returncode == 0, proc.tail()
    assert files(exp) == before, "the first retrain's files changed"
    pick = exp / "picks" / f"params-le-{limit}"
    pr = json.loads((pick / "report.json").read_text())
    assert pr["pick"]["rule"] == f"params<={limit}" and pr["pick"]["trial_id"] == small["trial_id"]
    assert "lowest validation MSE among the 1 of 3 full-budget trials with" in pr["pick"]["reason"]
    assert pr["best_config"]["model"]["filters"] == 2 and pr["seeds"] == [1000]
    assert torch.load(pick / "best_model.pt", weights_only=True)["config"]["model"]["filters"] == 2
    first = torch.load(exp / "best_model.pt", weights_only=True)["config"]["model"]["filters"]
    assert first == r["best_config"]["model"]["filters"] == 12  # best_model.pt stays the one report.json names
    assert (pick / "retrain" / "seed-1000").is_dir() and (pick / "search_config.yaml").is_file()
    # Its seeds are scored by the pipeline's joint evaluation (search/best_model.evaluate_seeds), into its own
    # evaluation.json, which the report's test MSE comes from.
    ev = json.loads((pick / "evaluation.json").read_text())
    assert ev["members"] == [1000] and pr["test_mse_mean"] == ev["evaluation"]["seeds"]["1000"]["test_mse_mean"]
    assert "evaluation (" in proc.out and pr["test_mse_mean"] != r["test_mse_mean"]
    assert f"Retrained: trial {small['trial_id']} (retrain.pick: `params<={limit}`)" in (pick / "report.md").read_text()
    # A limit below every front point: one line naming the smallest cost on the front, nothing written.
    proc = run_to_end([*args[:-1], "params<=10"], tmp, env_with(experiment["data_dir"]), "pick-none", timeout=120)
    err = proc.err.strip().splitlines()
    assert proc.p.returncode == 2 and len(err) == 1 and "Traceback" not in proc.err, proc.tail()
    assert err[0].startswith("error: no point of the front has params<=10: the smallest params on the front is ")
    assert files(exp) == before and sorted(p.name for p in (exp / "picks").iterdir()) == [pick.name]


def test_optuna_dashboard_serves_the_two_objective_study_and_its_front(experiment: dict) -> None:
    """What optuna-dashboard's Pareto Front plot draws: the study's two directions, its objective names and its best
    trials, which are the report's front (the plot itself was checked in headless Chromium: see the README)."""
    import os
    import sys
    import urllib.request

    from _searchutil import Proc, free_port

    exp, port = experiment["exp"], free_port()
    args = [str(Path(sys.executable).with_name("optuna-dashboard")), f"sqlite:///{exp / 'optuna.db'}",
            "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    proc = Proc(args, experiment["tmp"], dict(os.environ), "dashboard")

    def get(path: str) -> dict | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
                return json.loads(response.read())
        except OSError:  # not listening yet
            return None

    try:
        (summary,) = proc.wait_until(lambda: (get("/api/studies") or {}).get("study_summaries"), 60, "the dashboard")
        detail = get(f"/api/studies/{summary['study_id']}")
    finally:
        proc.cleanup()
    assert proc.p.poll() is not None, "the dashboard server is still running"
    assert detail["directions"] == ["minimize", "minimize"] and detail["objective_names"] == ["val_mse", "cpu_ms"]
    report = json.loads((exp / "report.json").read_text())
    best = {next(a["value"] for a in t["user_attrs"] if a["key"] == "tune_trial_id"): t for t in detail["best_trials"]}
    assert set(best) == {p["trial_id"] for p in report["pareto"]["front"]}
    for point in report["pareto"]["front"]:
        assert best[point["trial_id"]]["values"] == [point["val_mse"], point["cost"]]
