"""End to end: the smoke search, smaller, on real data with a local Ray.

One session-scoped run of ``search/run.py`` feeds every assertion here (a Ray search
is the expensive part); a second run checks that ``--resume`` of the finished
experiment loses no trial and recomputes nothing.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _searchutil import trial_dirs

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "--set", "base.train.epochs=2",
    "--set", "base.train.samples_per_epoch=1920",  # 60 steps x batch 32
    "--set", "retrain.epochs=2",  # the retrain's budget: the search's own, 2 x 1,920 samples
    "--set", "retrain.samples_per_epoch=1920",
    "--set", "base.data.val_pairs=500",
    "--set", "base.eval.draws=2",
    "--set", "base.eval.pairs=1000",
    "--set", "tune.num_samples=4",
    "--set", "retrain.seeds=2",
]  # fmt: skip
REPORT_KEYS = {
    "best_config", "best_val_mse", "num_trials", "num_completed", "num_errored", "seeds", "test_mse_per_seed",
    "test_mse_mean", "test_mse_std", "baseline_mix_mse", "reference_test_mse",
}  # fmt: skip

pytestmark = pytest.mark.slow


def run_search(tmp: Path, data_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "BSS_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(ROOT / "search/run.py"), "--config", str(ROOT / "configs/smoke.yaml"),
           "--storage-path", str(tmp / "results"), "--name", "e2e", *TINY, *extra]  # fmt: skip
    return subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)


def result_lines(trial_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def experiment(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> tuple[Path, subprocess.CompletedProcess]:
    tmp = tmp_path_factory.mktemp("e2e")
    proc = run_search(tmp, data_dir)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    return tmp / "results" / "e2e", proc


def test_search_completes_without_errors(experiment: tuple[Path, subprocess.CompletedProcess]) -> None:
    exp, proc = experiment
    report = json.loads((exp / "report.json").read_text())
    trials = trial_dirs(exp, "search")
    assert len(trials) == report["num_trials"] == 4
    assert report["num_errored"] == 0
    assert not [d for d in trials if (d / "error.txt").exists()], "a trial errored"
    assert report["num_completed"] + report["num_stopped_early"] == 4
    assert report["num_completed"] >= 1
    # The console ends with the report path, the headline (one model) and the seed ensemble, each named.
    lines = proc.stdout.strip().splitlines()
    assert lines[-3] == f"report: {exp / 'report.md'}"
    assert lines[-2].startswith("test MSE ") and lines[-2].endswith(": single model, mean ± std over 2 seeds")
    assert lines[-1].startswith("test MSE ") and "ensemble of 2 seeds (predictions averaged)" in lines[-1]


def test_report_keys_and_consistency(experiment: tuple[Path, subprocess.CompletedProcess]) -> None:
    exp, _ = experiment
    r = json.loads((exp / "report.json").read_text())
    assert REPORT_KEYS <= set(r)
    assert len(r["seeds"]) == len(r["test_mse_per_seed"]) == 2
    assert r["test_mse_mean"] == pytest.approx(np.mean(r["test_mse_per_seed"]), rel=1e-12)
    assert r["test_mse_std"] == pytest.approx(np.std(r["test_mse_per_seed"]), rel=1e-12, abs=1e-15)
    assert r["reference_test_mse"] == pytest.approx(3.677e-4)
    # A tiny U-Net after 120 steps must still beat predicting the mixture for both components.
    assert 0 < r["test_mse_mean"] < r["baseline_mix_mse"]
    # The winner ran the full budget and has the lowest validation MSE among those that did.
    numbers = sorted(t["number"] for t in r["trials"])  # Tune's creation order, for the history plot
    assert numbers == list(range(numbers[0], numbers[0] + 4)) and numbers[0] >= 0
    full = [t for t in r["trials"] if t["status"] == "completed"]
    assert r["best_val_mse"] == min(t["val_mse"] for t in full)
    assert r["best_config"]["train"]["epochs"] == 2
    for key, value in r["best_params"].items():
        section, name = key.split(".")
        assert r["best_config"][section][name] == value
    md = (exp / "report.md").read_text()
    assert f"{r['test_mse_mean']:.3e}" in md and "reference" in md and "mix baseline" in md
    for png in ("separations.png", "optimization_history.png", "param_importances.png"):
        assert f"]({png})" in md


def test_report_states_the_samples_each_trial_and_seed_saw(
    experiment: tuple[Path, subprocess.CompletedProcess],
) -> None:
    exp, _ = experiment
    r = json.loads((exp / "report.json").read_text())
    # 1,920 samples per epoch (60 steps x batch 32), whatever ASHA did: a stopped trial saw fewer epochs.
    assert all(t["samples"] == t["epochs"] * 1920 and t["epochs"] >= 1 for t in r["trials"])
    assert r["samples_per_seed"] == [2 * 1920, 2 * 1920]  # the retrain budget: retrain.epochs x samples_per_epoch
    md = (exp / "report.md").read_text()
    assert "every trial saw 1,920 training samples per epoch" in md and "| seed | samples |" in md


def test_report_ensemble_equals_numpy_averaged_predictions_of_the_final_seeds(
    experiment: tuple[Path, subprocess.CompletedProcess], data_dir: Path
) -> None:
    """test_mse_ensemble: the retrain seeds' final checkpoints (never search trials), each model run as the
    protocol runs it, the predictions averaged and scored in numpy on the protocol's draws written out again."""
    import torch

    from bss_model import checkpoint as ckpt
    from bss_model.data import load_test
    from bss_model.evaluate import model_predictor
    from bss_model.runtime import resolve_runtime

    exp, _ = experiment
    r = json.loads((exp / "report.json").read_text())
    assert r["ensemble_seeds"] == r["seeds"] == [1000, 1001] and r["ensemble_error"] == ""
    paths = [Path(p) for p in r["ensemble_checkpoints"]]
    assert len(paths) == 2 and all(p.parent.parent == exp / "retrain" for p in paths), paths
    predictors, cfg = [], None
    for path in paths:
        state = ckpt.load(path / ckpt.FILENAME)
        assert state["epoch"] == 2 and state["config"]["train"]["seed"] in r["seeds"]  # the final checkpoint
        model, cfg = ckpt.load_model(path / ckpt.FILENAME)
        cfg.train.device, cfg.train.cuda_graphs = "cpu", "off"
        runtime = resolve_runtime(cfg.train)  # each seed's own precision, as the protocol scored it
        predictors.append(model_predictor(runtime.prepare_model(model).eval(), runtime))
    assert (cfg.eval.draws, cfg.eval.pairs) == (2, 1000)
    digit, fashion = load_test(cfg.data)
    rng = np.random.default_rng(cfg.eval.seed)
    expected = []
    for _ in range(cfg.eval.draws):
        i_digit, i_fashion = rng.integers(0, len(digit), cfg.eval.pairs), rng.integers(0, len(fashion), cfg.eval.pairs)
        d, f = digit[i_digit].astype(np.float64) / 255, fashion[i_fashion].astype(np.float64) / 255
        x = torch.as_tensor(((d + f) / 2)[:, None], dtype=torch.float32)
        with torch.no_grad():
            average = np.mean([p(x).double().numpy() for p in predictors], axis=0)
        expected.append((np.mean((average[:, 0] - d) ** 2) + np.mean((average[:, 1] - f) ** 2)) / 2)
    np.testing.assert_allclose(r["test_mse_ensemble_per_draw"], expected, rtol=1e-4)
    assert r["test_mse_ensemble"] == pytest.approx(np.mean(expected), rel=1e-4)
    assert r["test_mse_ensemble_std"] == pytest.approx(np.std(expected), rel=1e-2, abs=1e-9)
    assert r["test_mse_ensemble"] <= r["test_mse_mean"] * (1 + 1e-4)  # convexity: never above the single mean
    md = (exp / "report.md").read_text()
    assert f"{r['test_mse_ensemble']:.3e}" in md and "ensemble of 2 seeds (averaged predictions" in md
    assert "single model (mean ± std over 2 seeds)" in md


def test_search_trials_never_touch_the_test_set(experiment: tuple[Path, subprocess.CompletedProcess]) -> None:
    exp, _ = experiment
    for trial in trial_dirs(exp, "search"):
        for line in result_lines(trial):
            assert not [k for k in line if k.startswith(("test_", "baseline_"))], trial.name
    # Nor do the retrain's seeds: the evaluation step scores every finished seed and their ensemble in one pass
    # over the protocol, after the retrain (evaluation.json), and the report takes each seed's figure from it.
    seeds = trial_dirs(exp, "retrain")
    for trial in seeds:
        assert not [k for k in result_lines(trial)[-1] if k.startswith(("test_", "baseline_"))], trial.name
    evaluation = json.loads((exp / "evaluation.json").read_text())
    r = json.loads((exp / "report.json").read_text())
    per_seed = evaluation["evaluation"]["seeds"]
    assert sorted(map(int, per_seed)) == r["seeds"] and len(seeds) == len(r["seeds"])
    assert [per_seed[str(s)]["test_mse_mean"] for s in r["seeds"]] == r["test_mse_per_seed"]
    assert evaluation["evaluation"]["ensemble"]["test_mse"] == r["test_mse_ensemble"]
    assert evaluation["eval"]["draws"] == r["protocol"]["draws"] == 2


def test_best_model_reloads_and_reproduces_test_mse(experiment: tuple[Path, subprocess.CompletedProcess]) -> None:
    import torch

    from bss_model.evaluate import evaluate_checkpoint

    exp, _ = experiment
    r = json.loads((exp / "report.json").read_text())
    state = torch.load(exp / "best_model.pt", weights_only=True)
    assert state["seed"] == r["best_seed"]
    assert state["config"]["model"] == r["best_config"]["model"]
    result = evaluate_checkpoint(exp / "best_model.pt", device="cpu")
    assert result["test_mse_mean"] == pytest.approx(r["best_seed_test"]["test_mse_mean"], rel=1e-4)
    best_index = r["seeds"].index(r["best_seed"])
    assert result["test_mse_mean"] == pytest.approx(r["test_mse_per_seed"][best_index], rel=1e-4)


def test_tensorboard_event_files(experiment: tuple[Path, subprocess.CompletedProcess]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    exp, _ = experiment
    for phase in ("search", "retrain"):
        trials = trial_dirs(exp, phase)
        assert trials
        for trial in trials:
            # One folder, one run: the trial's own events and Tune's.
            ours = EventAccumulator(str(trial))
            ours.Reload()
            tags = set(ours.Tags()["scalars"])
            assert {"mse/train", "mse/val", "lr", "perf/samples_per_s"} <= tags, trial.name
            last_val = ours.Scalars("mse/val")[-1].value
            assert last_val == pytest.approx(result_lines(trial)[-1]["val_mse"], rel=1e-5)
            tune = EventAccumulator(str(trial))
            tune.Reload()
            assert "ray/tune/val_mse" in tune.Tags()["scalars"], trial.name
    # Tune's events carry each trial's hyperparameters (the HPARAMS tab), keyed by space dimension.
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    trial = trial_dirs(exp, "search")[0]
    hparams = [
        v
        for f in trial.glob("events.out.tfevents*")
        for event in EventFileLoader(str(f)).Load()
        for v in event.summary.value
        if v.metadata.plugin_data.plugin_name == "hparams"
    ]
    assert hparams, "no hparams summary in Tune's event file"
    blob = b"".join(v.metadata.plugin_data.content for v in hparams)
    assert b"model.filters" in blob and b"train.lr" in blob
    first = trial_dirs(exp, "retrain")[0]
    ours = EventAccumulator(str(first))
    ours.Reload()
    assert "val/separation" in ours.Tags()["images"]


def test_pictures_are_valid_pngs(experiment: tuple[Path, subprocess.CompletedProcess]) -> None:
    from PIL import Image

    exp, _ = experiment
    for name in ("separations.png", "optimization_history.png", "param_importances.png"):
        data = (exp / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", name
        with Image.open(exp / name) as img:
            img.verify()
            assert img.size[0] > 100 and img.size[1] > 100


def test_resume_of_finished_experiment_loses_nothing(
    experiment: tuple[Path, subprocess.CompletedProcess], data_dir: Path
) -> None:
    exp, _ = experiment
    before = json.loads((exp / "report.json").read_text())
    lines_before = {t.name: (t / "result.json").read_text() for t in trial_dirs(exp, "search")}
    seeds_before = {t.name: (t / "result.json").read_text() for t in trial_dirs(exp, "retrain")}
    proc = run_search(exp.parent.parent, data_dir, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = json.loads((exp / "report.json").read_text())
    assert {t.name: (t / "result.json").read_text() for t in trial_dirs(exp, "search")} == lines_before
    assert {t.name: (t / "result.json").read_text() for t in trial_dirs(exp, "retrain")} == seeds_before
    assert after["num_trials"] == before["num_trials"]
    assert after["test_mse_per_seed"] == before["test_mse_per_seed"]
    assert after["test_mse_ensemble"] == before["test_mse_ensemble"]  # the same checkpoints, the same draws
    assert after["best_params"] == before["best_params"]
    assert not math.isnan(after["test_mse_mean"])


def test_retrain_progress_lines(experiment: tuple[Path, subprocess.CompletedProcess]) -> None:
    _, proc = experiment
    progress = [line for line in proc.stdout.splitlines() if line.startswith("retrain seed ")]
    assert any("epoch 2/2" in line for line in progress), progress
    assert any(line.endswith("[2/2 seeds done]") for line in progress), progress
    # then one line for the evaluation: each seed's protocol MSE and the ensemble's, after the retrain
    evaluation = [line for line in proc.stdout.splitlines() if line.startswith("evaluation (")]
    assert len(evaluation) == 1 and "seed 1000 " in evaluation[0] and "; ensemble " in evaluation[0], evaluation
    assert proc.stdout.index(evaluation[0]) > proc.stdout.index(progress[-1])


def run_retrain(cwd: Path, data_dir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "BSS_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(ROOT / "search/retrain.py"), *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_retrain_step_alone_on_a_finished_search(
    experiment: tuple[Path, subprocess.CompletedProcess], data_dir: Path
) -> None:
    """`retrain.py --experiment` continues the (finished) retrain: no seed is retrained."""
    exp, _ = experiment
    before = json.loads((exp / "report.json").read_text())
    seeds_before = {t.name: (t / "result.json").read_text() for t in trial_dirs(exp, "retrain")}
    proc = run_retrain(exp.parent.parent, data_dir, "--experiment", str(exp))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {t.name: (t / "result.json").read_text() for t in trial_dirs(exp, "retrain")} == seeds_before
    after = json.loads((exp / "report.json").read_text())
    assert after["test_mse_per_seed"] == before["test_mse_per_seed"]
    assert after["best_config"] == before["best_config"]


def test_retrain_of_a_named_config(tmp_path: Path, data_dir: Path) -> None:
    """`retrain.py --config` retrains a bss_model config directly over seeds and reports."""
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(
        "model: {variant: tiny}\n"
        "train: {epochs: 1, samples_per_epoch: 1920, lr: 2.0e-3}\n"  # 60 steps x batch 32
        "data: {val_pairs: 500}\n"
        "eval: {draws: 2, pairs: 1000}\n"
    )
    proc = run_retrain(tmp_path, data_dir, "--config", str(cfg), "--seeds", "2", "--storage-path", "out")
    assert proc.returncode == 0, proc.stderr[-3000:]
    exp = tmp_path / "out" / "tiny-retrain"
    r = json.loads((exp / "report.json").read_text())
    assert len(r["test_mse_per_seed"]) == 2 and r["seeds"] == [1000, 1001]
    assert r["test_mse_per_seed"][0] != r["test_mse_per_seed"][1]  # different seeds, different models
    assert r["best_config"]["train"]["samples_per_epoch"] == 1920 and r["num_trials"] == 0
    assert (exp / "best_model.pt").exists() and (exp / "separations.png").exists()
    # A second run under the same name without --resume refuses and overwrites nothing.
    report_bytes = (exp / "report.json").read_bytes()
    again = run_retrain(tmp_path, data_dir, "--config", str(cfg), "--seeds", "2", "--storage-path", "out")
    assert again.returncode == 2
    assert again.stderr.strip().startswith("error: ") and "already exists" in again.stderr
    assert "Traceback" not in again.stderr
    assert (exp / "report.json").read_bytes() == report_bytes


# --------------------------------------------------------------------------------------
# The Optuna study (optuna.db), the dashboard on it, and the console's ASHA lines


def test_optuna_study_matches_the_report(experiment: tuple[Path, subprocess.CompletedProcess]) -> None:
    """`optuna.load_study` on optuna.db: each trial once, its state, value, params and per-epoch validation MSE."""
    from _searchutil import check_study_matches_report

    exp, _ = experiment
    trials = check_study_matches_report(exp)
    report = json.loads((exp / "report.json").read_text())
    states = [t.state.name for t in trials.values()]
    assert states.count("COMPLETE") == report["num_completed"] and states.count("PRUNED") == report["num_stopped_early"]
    best = min((t for t in trials.values() if t.state.name == "COMPLETE"), key=lambda t: t.value)
    assert best.value == report["best_val_mse"] and best.params == report["best_params"]


def test_asha_stops_are_one_console_line_each_without_a_traceback(
    experiment: tuple[Path, subprocess.CompletedProcess],
) -> None:
    exp, proc = experiment
    report = json.loads((exp / "report.json").read_text())
    console = proc.stdout + proc.stderr
    assert "Traceback" not in console and "SystemExit" not in console, console[-3000:]
    lines = [line for line in proc.stdout.splitlines() if "stopped early by ASHA" in line]
    stopped = {t["trial_id"]: t for t in report["trials"] if t["status"] == "stopped"}
    assert len(lines) == len(stopped) == report["num_stopped_early"], lines
    for trial_id, t in stopped.items():
        (line,) = [line for line in lines if line.startswith("trial ") and f"-{trial_id} stopped early" in line]
        assert f"after epoch {t['epochs']}/2" in line and f"{t['val_mse']:.3e}" in line


@pytest.fixture(scope="module")
def dashboard(experiment: tuple[Path, subprocess.CompletedProcess], tmp_path_factory: pytest.TempPathFactory):
    """A real optuna-dashboard server on the experiment's study, on a free local port; stopped at the end."""
    from _searchutil import Proc, free_port

    exp, _ = experiment
    port = free_port()
    args = [str(Path(sys.executable).with_name("optuna-dashboard")), f"sqlite:///{exp / 'optuna.db'}",
            "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    proc = Proc(args, tmp_path_factory.mktemp("dashboard"), dict(os.environ), "dashboard")
    url = f"http://127.0.0.1:{port}"

    def studies() -> list | None:
        try:
            return get_json(f"{url}/api/studies")["study_summaries"]
        except OSError:  # not listening yet
            return None

    try:
        yield {"url": url, "exp": exp, "studies": proc.wait_until(studies, 60, "optuna-dashboard to answer")}
    finally:
        proc.cleanup()
    assert proc.p.poll() is not None, "the dashboard server is still running"


def get_json(url: str) -> dict:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def test_optuna_dashboard_serves_every_trial(dashboard: dict) -> None:
    exp = dashboard["exp"]
    (study,) = dashboard["studies"]
    assert study["study_name"] == exp.name and study["directions"] == ["minimize"]
    detail = get_json(f"{dashboard['url']}/api/studies/{study['study_id']}")
    report = json.loads((exp / "report.json").read_text())
    served = {}
    for t in detail["trials"]:
        attrs = {a["key"]: a["value"] for a in t["user_attrs"]}
        served[attrs["tune_trial_id"]] = t
    assert sorted(served) == sorted(r["trial_id"] for r in report["trials"])
    states = {"completed": "Complete", "stopped": "Pruned", "diverged": "Fail", "errored": "Fail"}
    for row in report["trials"]:
        t = served[row["trial_id"]]
        assert t["state"] == states[row["status"]]
        assert t["values"] == ([row["val_mse"]] if row["status"] in ("completed", "stopped") else None)
        assert [v["step"] for v in t["intermediate_values"]] == list(range(1, row["epochs"] + 1))
        assert {p["name"]: p["param_external_value"] for p in t["params"]} == {
            k: str(v) for k, v in row["params"].items()
        }
    # One distribution per parameter across trials, or the dashboard drops the parameter from its plots.
    assert {p["name"] for p in detail["intersection_search_space"]} == set(report["best_params"])


# --------------------------------------------------------------------------------------
# What the user sees: the console and TensorBoard

# Ray's defaults that the console must not show: box tables, a TensorBoard hint into /tmp/ray, the
# snapshot warning, Optuna's in-memory study, one "Checkpoint successfully created" line per epoch.
NOT_IN_CONSOLE = ("╭", "│", "╰", "/tmp/ray", "snapshotting has been triggered", "A new study created",
                  "To visualize your results", "Checkpoint successfully created", "Trial status:")  # fmt: skip


def console_bound(trials: int, seeds: int, epochs: int) -> int:
    """Lines a default search may print, besides its status lines: the paths and Ray's one startup warning,
    two per trial (start; finish, ASHA stop or error), one per retrain epoch and seed and per finished seed,
    the summary and report lines, and a few to spare for a warning. 8 trials, 3 seeds x 4 epochs: 51."""
    return 20 + 2 * trials + seeds * (epochs + 1)


def test_console_is_the_projects_lines(experiment: tuple[Path, subprocess.CompletedProcess]) -> None:
    exp, proc = experiment
    report = json.loads((exp / "report.json").read_text())
    console = proc.stdout + proc.stderr
    for text in NOT_IN_CONSOLE:
        assert text not in console, (text, console[-3000:])
    lines = console.splitlines()
    status = [line for line in lines if line.startswith("[search ")]
    others = [line for line in lines if not line.startswith("[search ")]
    assert len(others) <= console_bound(4, 2, 2), f"{len(others)} lines:\n" + "\n".join(others)
    # Status lines at a steady interval (30 s apart at least, by their own elapsed time), plain lines.
    elapsed = [int(m) * 60 + int(s) for line in status for m, s in [line.split()[1].rstrip("]").split(":")[-2:]]]
    assert all(b - a >= 30 for a, b in zip(elapsed, elapsed[1:], strict=False)), status
    assert "\r" not in console and "\x1b[" not in proc.stdout
    # Every trial: its start with its params, and how it ended, named as its folder and TensorBoard run.
    folders = {d.name.split("-", 1)[1]: d.name for d in trial_dirs(exp, "search")}
    for t in report["trials"]:
        label = folders[t["trial_id"]]
        (start,) = [line for line in lines if line.startswith(f"trial {label} started: ")]
        assert f"filters={t['params']['model.filters']} " in start
        ends = [line for line in lines if line.startswith(f"trial {label} ") and line != start]
        assert len(ends) == 1, ends
        word = {"completed": "finished", "stopped": "stopped early by ASHA"}[t["status"]]
        assert word in ends[0] and f"{t['val_mse']:.3e}" in ends[0] and "samples/s" in ends[0]
    # Where everything is, before any trial, as typed from the folder it ran in (results/e2e there).
    first = proc.stdout.splitlines()[:3]
    assert first == [
        "experiment: results/e2e",
        "TensorBoard: tensorboard --logdir results/e2e --host 127.0.0.1",
        "Optuna dashboard (once the first trial ends): make dashboard NAME=e2e",
    ]
    # The final result lines are last (test_search_completes_without_errors reads them).
    assert proc.stdout.strip().splitlines()[-3].startswith("report: ")


def test_tensorboard_has_one_short_run_per_trial_and_the_searchs_hparams(
    experiment: tuple[Path, subprocess.CompletedProcess],
) -> None:
    """Read as TensorBoard reads ``--logdir results/<name>``: its EventMultiplexer and the hparams plugin's data."""
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer
    from tensorboard.plugins.hparams import metadata

    exp, _ = experiment
    report = json.loads((exp / "report.json").read_text())
    mux = EventMultiplexer().AddRunsFromDirectory(str(exp))
    mux.Reload()
    runs = set(mux.Runs())
    search = {f"search/{d.name}" for d in trial_dirs(exp, "search")}
    retrain = {f"retrain/seed-{s}" for s in report["seeds"]}
    assert runs == search | retrain, "one run per trial and per seed, and nothing else"
    assert len(search) == report["num_trials"] == 4
    assert max(len(run) for run in runs) <= 40, sorted(runs)
    hparams = mux.PluginRunToTagToContent(metadata.PLUGIN_NAME)
    assert set(hparams) == search, "the search's trials, and only they, carry hparams"
    dimensions = set(report["best_params"])
    by_id = {t["trial_id"]: t for t in report["trials"]}
    experiments = set()
    for run, content in hparams.items():
        experiment = metadata.parse_experiment_plugin_data(content[metadata.EXPERIMENT_TAG])
        experiments.add(experiment.SerializeToString(deterministic=True))
        assert {h.name for h in experiment.hparam_infos} == dimensions
        assert {m.name.tag for m in experiment.metric_infos} >= {"mse/val", "mse/train"}
        start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
        params = {k: v.number_value if v.HasField("number_value") else v.string_value for k, v in start.hparams.items()}
        assert params == pytest.approx(by_id[run.split("-", 1)[1]]["params"], rel=1e-12), run
    # Every search run declares the same experiment: whichever TensorBoard reads first, the tab is the same.
    assert len(experiments) == 1
    # Tune's curves and the trial's own (scalars and images) are one run.
    scalars, images = mux.PluginRunToTagToContent("scalars"), mux.PluginRunToTagToContent("images")
    for run in runs:
        assert {"ray/tune/val_mse", "mse/val", "mse/train"} <= set(scalars[run]), run
        assert "val/separation" in images[run], run
