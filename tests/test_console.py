"""The search's console lines (search/console.py), from Tune's callback hooks with stand-in trials."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from search.console import SearchProgress, seed_label, short_params, trial_label, where_lines


def trial(number: int, trial_id: str, status: str = "RUNNING", **result: Any) -> SimpleNamespace:
    params = {"model.filters": 8, "train.lr": 0.0013274, "model.decoder_convs": 2}
    return SimpleNamespace(
        trial_id=trial_id, experiment_tag=f"{number}_model.filters=8", evaluated_params=params, status=status,
        last_result=result, config={"train.seed": 1000}, get_error=lambda: "Traceback ...\nValueError: boom",
    )  # fmt: skip


def test_labels_are_short_and_name_the_trial() -> None:
    t = trial(7, "f785168e")
    assert trial_label(t) == "007-f785168e" and seed_label(t) == "seed-1000"
    assert short_params(t.evaluated_params) == "filters=8 lr=0.00133 decoder_convs=2"


def test_one_line_per_trial_event(capsys: pytest.CaptureFixture[str]) -> None:
    progress = SearchProgress(budget=4)
    progress.setup(total_num_samples=4)
    a = trial(1, "aaaa1111", val_mse=0.02, epoch=4, samples_per_s=812.4)
    b = trial(2, "bbbb2222", val_mse=0.04, epoch=1, samples_per_s=90.0)
    c = trial(3, "cccc3333", epoch=2, diverged=True, reason="loss is non-finite")
    for t in (a, b, c):
        progress.on_trial_start(0, [], t)
    progress.on_trial_start(0, [], a)  # a retry starts the same trial again: no second line
    progress.on_trial_recover(0, [], a)
    progress.on_trial_complete(0, [], a)
    progress.on_trial_complete(0, [], b)
    progress.on_trial_error(0, [], c)
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "trial 001-aaaa1111 started: filters=8 lr=0.00133 decoder_convs=2",
        "trial 002-bbbb2222 started: filters=8 lr=0.00133 decoder_convs=2",
        "trial 003-cccc3333 started: filters=8 lr=0.00133 decoder_convs=2",
        "trial 001-aaaa1111 failed; retrying from its last checkpoint",
        "trial 001-aaaa1111 finished: val MSE 2.000e-02 after 4/4 epochs, 812 samples/s",
        "trial 002-bbbb2222 stopped early by ASHA after epoch 1/4: val MSE 4.000e-02 is not among the best at its "
        "rung, 90 samples/s",
        "trial 003-cccc3333 diverged after epoch 2/4: loss is non-finite",
    ]
    a.status, b.status, c.status = "TERMINATED", "TERMINATED", "ERROR"
    line = progress.status_line([a, b, c, trial(4, "dddd4444")], progress.t0 + 95)
    assert line == (
        "[search 1:35] 3/4 trials done (1 stopped early, 1 errored), 1 running; best val MSE 2.000e-02 (001-aaaa1111); "
        "ETA 0:31"
    )


def test_status_line_at_a_steady_interval_with_an_eta(capsys: pytest.CaptureFixture[str]) -> None:
    progress = SearchProgress(budget=4, total=8, every_s=30)
    running = [trial(i, f"{i:08x}") for i in range(2)]
    progress.on_step_end(0, running)  # too early: nothing
    assert capsys.readouterr().out == ""
    progress.last_status -= 30
    done = trial(3, "0000000f", status="TERMINATED", val_mse=0.02, epoch=4)
    progress.on_trial_complete(0, [], done)
    capsys.readouterr()
    progress.t0 -= 60
    progress.on_step_end(0, [*running, done])
    (line,) = capsys.readouterr().out.splitlines()
    # 1 of 8 done in a minute: 7 more minutes.
    assert line.startswith("[search 1:00] 1/8 trials done (0 stopped early, 0 errored), 2 running; best val MSE")
    assert line.endswith("; ETA 7:00")


def test_the_experiment_survives_a_pickle_round_trip_of_its_console() -> None:
    import pickle

    progress = SearchProgress(budget=4, total=8)
    progress.started.add("x")
    again = pickle.loads(pickle.dumps(progress))
    assert (again.budget, again.total, again.started) == (4, 8, set())


def test_where_lines_name_the_experiment_as_typed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert where_lines(str(tmp_path / "results" / "smoke"), "smoke") == [
        "experiment: results/smoke",
        "TensorBoard: tensorboard --logdir results/smoke --host 127.0.0.1",
        "Optuna dashboard (once the first trial ends): make dashboard NAME=smoke",
    ]
    elsewhere = where_lines("/mnt/nfs/bss/smoke", "smoke")
    assert elsewhere[0] == "experiment: /mnt/nfs/bss/smoke"
    assert elsewhere[2].endswith("optuna-dashboard sqlite:////mnt/nfs/bss/smoke/optuna.db --host 127.0.0.1")


def test_rays_own_output_only_with_verbose(monkeypatch: pytest.MonkeyPatch) -> None:
    """tune.verbose 0 (the default): Ray's legacy engine, silent at 0; --verbose (2): Ray's own tables."""
    import os

    from search.config import TuneSection
    from search.console import entry_point

    assert TuneSection().verbose == 0
    monkeypatch.delenv("RAY_AIR_NEW_OUTPUT", raising=False)
    with entry_point(0):
        assert os.environ["RAY_AIR_NEW_OUTPUT"] == "0"
    assert "RAY_AIR_NEW_OUTPUT" not in os.environ
    with entry_point(2):
        assert "RAY_AIR_NEW_OUTPUT" not in os.environ


def test_no_excessive_snapshot_warning_at_verbose_0(monkeypatch: pytest.MonkeyPatch) -> None:
    """CI caught Ray's "Experiment state snapshotting has been triggered multiple times" in a smoke search's
    console: short trials checkpoint at their first and last epoch, and two ending within 5 s force two
    snapshots. At verbose 0 the experiment-state manager Tune builds inside the command has that warning off,
    and keeps the one for a slow snapshot; --verbose gives Ray's thresholds back, and the command leaves the
    environment as it found it."""
    import os

    from ray.tune.execution.experiment_state import _ExperimentCheckpointManager

    from search.console import EXCESSIVE_SNAPSHOTS, entry_point

    def manager() -> _ExperimentCheckpointManager:
        return _ExperimentCheckpointManager(storage=None, checkpoint_period="auto", sync_every_n_trial_checkpoints=2)

    monkeypatch.delenv(EXCESSIVE_SNAPSHOTS, raising=False)
    monkeypatch.delenv("TUNE_WARN_SLOW_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", raising=False)
    default = manager()
    assert default._excessive_sync_threshold == 5.0
    with entry_point(0):
        quiet = manager()
    assert quiet._excessive_sync_threshold == 0.0
    assert quiet._slow_sync_threshold == default._slow_sync_threshold == 30.0
    with entry_point(2):
        assert manager()._excessive_sync_threshold == 5.0
    assert EXCESSIVE_SNAPSHOTS not in os.environ


def test_verbose_flag_sets_tune_verbose(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import search.pipeline
    import search.run

    monkeypatch.chdir(tmp_path)  # the command makes results/ where it runs

    seen = {}
    # run.py imports the pipeline when it runs (after checking the search extra is installed)
    monkeypatch.setattr(
        search.pipeline, "search_retrain_report", lambda cfg, *a: seen.setdefault("verbose", cfg.tune.verbose)
    )
    config = str(Path(search.run.__file__).parent.parent / "configs" / "smoke.yaml")
    assert search.run.main(["--config", config, "--verbose"]) == 0
    assert seen == {"verbose": 2}


def test_the_eta_counts_the_epochs_of_running_trials() -> None:
    progress = SearchProgress(budget=4, total=8)
    trials = [trial(1, "a", status="TERMINATED", epoch=1), trial(2, "b", epoch=2), trial(3, "c", epoch=2)]
    # 4 (an ended trial needs no more) + 2 + 2 of 8 x 4 epochs in 60 s: 24 epochs left, 3 minutes.
    assert progress.status_line(trials, progress.t0 + 60).endswith("; ETA 3:00")


def test_retrain_lines_are_throttled_per_seed_but_the_last_epoch_always_shows(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import pickle

    from search.tuners import RetrainProgress

    progress = RetrainProgress(seeds=2, epochs=3)
    seed = SimpleNamespace(trial_id="s0", config={"train.seed": 1000})
    for epoch in (1, 2):
        progress.on_trial_result(0, [], seed, {"epoch": epoch, "val_mse": 0.02})
    progress.on_trial_result(0, [], seed, {"epoch": 3, "val_mse": 0.01, "test_mse_mean": 0.011})
    progress.on_trial_complete(0, [], seed)
    assert capsys.readouterr().out.splitlines() == [
        "retrain seed 1000: epoch 1/3 val 2.000e-02  [0/2 seeds done]",
        "retrain seed 1000: epoch 3/3 val 1.000e-02 test 1.100e-02  [0/2 seeds done]",
        "retrain seed 1000 finished [1/2 seeds done]",
    ]
    assert "shown" not in pickle.loads(pickle.dumps(progress)).__dict__
