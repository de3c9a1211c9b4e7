"""The two Tune experiments: the search (Optuna TPE + ASHA) and the retrain of one config over seeds.

A two-objective search (``tune.objectives: [val_mse, <cost>]``) runs multi-objective TPE with the non-dominated
rung rule of search/moasha.py instead (``make_mo_search``; the evidence is beside ``MO_SAMPLER``).

Both run the same trainable (``search/trainable.py``), keep ``tune.checkpoints_to_keep``
checkpoints per trial, retry a failed trial ``tune.max_failures`` times from its last
checkpoint, and restore themselves from storage when they already exist there, so a rerun
after a crash or Ctrl-C loses no finished trial.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import optuna
from ray import tune
from ray.tune import Callback, ExperimentAnalysis
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from bss_model.config import Config
from bss_model.errors import BssError
from search import objectives
from search.cluster import trial_gpus, warn_unschedulable
from search.config import SearchConfig
from search.console import STATUS_EVERY_S, SearchProgress, seed_label, trial_label
from search.deadline import DeadlineSearcher, DeadlineStopper
from search.guard import FitGuard, terminated
from search.lock import ExperimentLost
from search.lock import check as check_held
from search.selection import METRIC, MODE
from search.space import param_space
from search.storage import (
    StorageUnavailable,
    check_writable,
    is_uri,
    local_dir,
    storage_failure,
    storage_lost,
    tune_path,
)
from search.study import StudyRecorder
from search.tb_logger import TensorBoardLogger
from search.trackers import make_callbacks
from search.trainable import train_trial
from search.tunefiles import KeepTrialHistory, restore_mode, tune_filesystem

log = logging.getLogger("bss")


class Interrupted(BssError):
    """The run was stopped (Ctrl-C) with trials unfinished; it can be resumed."""

    exit_code = 130


def _trainable(
    cfg: SearchConfig, base: Config, trial_kwargs: dict[str, Any] | None = None, search: bool = False
) -> Any:
    """The trainable with its fixed arguments. ``trial_kwargs``: a budgeted phase's (search/trainable.py:
    ``start_by``, ``deadline``, and ``splits``, the data shared by every trial through Ray's object store).
    ``search``: the search's trials, which measure the costs of a two-objective search (search/costs.py)."""
    gpus = trial_gpus(cfg.tune.gpus_per_trial)
    if cfg.tune.gpus_per_trial and not gpus:
        log.warning("tune.gpus_per_trial=%s but the cluster has no GPU: trials run on CPU", cfg.tune.gpus_per_trial)
    warn_unschedulable(cfg.tune.cpus_per_trial, gpus)
    extra = dict(trial_kwargs or {})
    if search and objectives.cost_of(cfg.tune.objectives):  # a two-objective search's trials
        measure = [c for c in objectives.recorded(cfg.tune.objectives) if c in objectives.MEASURED]
        extra["costs"] = {"measure": measure, "batch": cfg.tune.latency_batch}
    fn = tune.with_parameters(train_trial, base=base.to_dict(), gpu_share=gpus, cpus=cfg.tune.cpus_per_trial, **extra)
    return tune.with_resources(fn, {"cpu": cfg.tune.cpus_per_trial, "gpu": gpus})


def make_sampler(
    seed: int, n_startup_trials: int, multivariate: bool = False, constant_liar: bool = True
) -> optuna.samplers.TPESampler:
    """The search's TPE sampler (benchmarks/search_replay.py replays searches with this very function).

    Both options are pinned, from the replay against this task's learning curves
    (benchmarks/results/search-replay-cpu*.json, 60 seeds a method):
    - ``multivariate=False``: Optuna 5's default multivariate TPE had a worse tail at the search's scale
      (96 trials, 16 workers: 75th-percentile regret 0.019 against 0.002 for independent TPE, the same
      median) and a worse median at 16 and 32 trials (0.030 vs 0.019, 0.025 vs 0.019).
    - ``constant_liar=True`` (Optuna 5's default): with 4-16 trials running at once, TPE must not
      propose the running trials' neighbourhoods again; turning it off was no better in the replay.
    """
    return optuna.samplers.TPESampler(
        seed=seed, n_startup_trials=n_startup_trials, multivariate=multivariate, constant_liar=constant_liar
    )


class StoppedAsPrunedSearch(OptunaSearch):
    """Ray's OptunaSearch, but a trial that ASHA stopped before its budget is told to Optuna as PRUNED.

    Ray's OptunaSearch tells every trial that ended without an error as COMPLETE with its last
    value, so TPE ranks a value from 4 epochs beside values from 36. A PRUNED trial keeps its
    intermediate values, and TPE orders pruned trials behind complete ones by the step they reached.
    """

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        epoch, budget = (result or {}).get("epoch"), (result or {}).get("budget_epochs")
        stopped = not error and epoch is not None and budget is not None and epoch < budget
        if not stopped or trial_id in self._completed_trials:
            return super().on_trial_complete(trial_id, result=result, error=error)
        ot_trial = self._ot_trials[trial_id]
        value = None if isinstance(self.metric, list) else result.get(self.metric)  # a multi-objective
        # trial cannot report intermediate values (Optuna): it is told PRUNED with none.
        if value is not None and math.isfinite(value):
            # Tune does not pass the stopping result to on_trial_result: report it, so the pruned
            # trial's last intermediate value is the one ASHA judged.
            ot_trial.report(value, result.get("training_iteration", epoch))
        self._ot_study.tell(ot_trial, state=optuna.trial.TrialState.PRUNED)
        self._completed_trials.add(trial_id)


def make_searcher(sampler: optuna.samplers.BaseSampler, points: list[dict], stopped_as_pruned: bool) -> OptunaSearch:
    cls = StoppedAsPrunedSearch if stopped_as_pruned else OptunaSearch
    return cls(sampler=sampler, points_to_evaluate=list(points) or None)


def make_scheduler(
    max_t: int, grace_period: int, reduction_factor: float, metric: str | None = None, mode: str | None = None
) -> ASHAScheduler:
    # Rungs in epochs, which are equal samples for every trial: load_search_config refused any batch
    # size that does not divide base.train.samples_per_epoch (search/config.py, check_budget).
    # ``metric``/``mode``: for a multi-objective search, whose TuneConfig names none (see make_mo_search).
    return ASHAScheduler(
        time_attr="training_iteration",
        metric=metric,
        mode=mode,
        max_t=max_t,
        grace_period=min(grace_period, max_t),
        reduction_factor=reduction_factor,
    )


# -- two objectives (tune.objectives: [val_mse, <cost>]; search/objectives.py) ----------------------------------

# Pinned from the multi-objective replay (benchmarks/search_replay.py --objective, the learning-curve table's 150
# configs; benchmarks/results/search-replay-mo-*.json, 20 seeds a method; hypervolume regret of the front of the
# full-budget trials, 0 = the table's whole front):
# - The rung rule is what matters. ASHA judging val MSE alone stops the cheap models, which are behind at every
#   rung, so the full-budget front loses its cheap end: at configs/search.yaml's scale (96 trials, 16 workers)
#   every sampler ends at a median regret of 0.11-0.12 with it (cpu_ms; 0.10-0.11 with params), against
#   0.05-0.06 (0.05-0.07) with the non-dominated rung rule (search/moasha.py), which also spends 0.74-0.92x the
#   compute. A seed of the non-dominated rule beats a seed of ASHA with probability 0.79-0.84 (cpu_ms; 0.72-0.74
#   params; Mann-Whitney), for every sampler.
# - The sampler matters little under that rule: MO-TPE, NSGA-II and random sampling end within noise of each other
#   (P(beats) 0.44-0.56 both costs); none beats random sampling. NSGA-II and the GP sampler model COMPLETE trials
#   only, so with stopped trials told PRUNED they never leave their random first generation / startup (the replay
#   gives, seed for seed, random sampling's numbers); told COMPLETE the GP sampler takes ~100x longer per
#   suggestion (and needs scipy). MO-TPE is kept -- Optuna 5's default for several objectives, the single-objective
#   job's sampler with its pinned options -- told the Ray way: a stopped trial COMPLETE with the values it stopped
#   at. Told PRUNED instead it did worse (params: median 0.087 against 0.057, P(beats) 0.36): a multi-objective
#   trial cannot carry intermediate values, so TPE ranks all its pruned trials alike and can count stopped ones
#   among its good ones. The job's own study (optuna.db) and the report's front still hold stopped trials PRUNED.
MO_SAMPLER = "tpe"
MO_STOPPED_AS_PRUNED = False
MO_RUNG_RULE = "nondominated"  # search/moasha.py; "val_mse": Ray's ASHA on val MSE alone


def make_mo_sampler(seed: int, n_startup_trials: int, kind: str = MO_SAMPLER) -> optuna.samplers.BaseSampler:
    """The sampler of a two-objective search (the replay builds its alternatives here too).

    ``tpe``: multi-objective TPE (Optuna 5's default for several objectives), with the single-objective job's
    pinned options; ``nsga2``: NSGA-II with a population of ``n_startup_trials`` (its first generation is random,
    like TPE's startup trials); ``gp``: Optuna's GP sampler (log EHVI; needs scipy); ``random``.
    """
    if kind == "tpe":
        return make_sampler(seed, n_startup_trials)
    if kind == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(2, n_startup_trials))
    if kind == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=n_startup_trials)
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"unknown multi-objective sampler {kind!r}")


def make_mo_searcher(
    sampler: optuna.samplers.BaseSampler, points: list[dict], cost: str, stopped_as_pruned: bool = MO_STOPPED_AS_PRUNED
) -> OptunaSearch:
    """OptunaSearch over (val_mse, ``cost``), both minimised. With ``stopped_as_pruned`` a trial stopped early is
    told PRUNED rather than COMPLETE with the values it stopped at (Ray's way, and the job's: see MO_SAMPLER)."""
    cls = StoppedAsPrunedSearch if stopped_as_pruned else OptunaSearch
    return cls(sampler=sampler, metric=[METRIC, cost], mode=[MODE, MODE], points_to_evaluate=list(points) or None)


def make_mo_scheduler(
    max_t: int, grace_period: int, reduction_factor: float, cost: str, rule: str = MO_RUNG_RULE
) -> Any:
    """Early stopping of a two-objective search, on ASHA's rungs (``tune.grace_period``, ``tune.reduction_factor``):
    the non-dominated rung rule (search/moasha.py, pinned above), or ASHA judging val MSE alone."""
    if rule == "val_mse":
        return make_scheduler(max_t, grace_period, reduction_factor, metric=METRIC, mode=MODE)
    if rule == "nondominated":
        from search.moasha import NonDominatedASHA

        return NonDominatedASHA(METRIC, cost, max_t, grace_period, reduction_factor)
    raise ValueError(f"unknown rung rule {rule!r}")


def make_mo_search(cfg: SearchConfig) -> tuple[OptunaSearch, Any]:
    """The searcher and scheduler of a two-objective search. The Tuner then gets no metric of its own: Tune
    would hand it to OptunaSearch, which would replace its [val_mse, cost] with it (a one-objective study)."""
    cost = objectives.cost_of(cfg.tune.objectives)
    sampler = make_mo_sampler(cfg.tune.seed, cfg.tune.n_startup_trials)
    searcher = make_mo_searcher(sampler, cfg.tune.points_to_evaluate, cost)
    epochs = cfg.base.train.epochs
    return searcher, make_mo_scheduler(epochs, cfg.tune.grace_period, cfg.tune.reduction_factor, cost)


def _run_config(cfg: SearchConfig, root: str, name: str, callbacks: list[Callback], stop: Any = None) -> tune.RunConfig:
    # The trackers of tune.callbacks (MLflow, W&B: search/trackers.py) follow both phases.
    trackers = make_callbacks(cfg.tune.callbacks, cfg.tune.name, str(local_dir(root)), name)
    return tune.RunConfig(
        name=name,
        stop=stop,
        storage_path=root if is_uri(root) else str(Path(root)),
        storage_filesystem=tune_filesystem(root),  # a local experiment's files: whole or not at all
        failure_config=tune.FailureConfig(max_failures=cfg.tune.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=cfg.tune.checkpoints_to_keep),
        # Trials' own TensorBoard events and metrics live in their working dirs: sync them
        # to storage_path as artifacts so `tensorboard --logdir <experiment>` sees them.
        sync_config=tune.SyncConfig(sync_artifacts=True),
        verbose=cfg.tune.verbose,
        # The search's trials are the HPARAMS tab's rows; the retrain's seeds differ by seed alone.
        callbacks=[*callbacks, *trackers, TensorBoardLogger(hparams=name == "search"), KeepTrialHistory()],
    )


def _fit(
    tuner: tune.Tuner, root: str, what: str, expected: int, resume_cmd: str, deadline_cut: bool = False
) -> tune.ResultGrid:
    """``tuner.fit()``, then :func:`_finish` and :func:`_check_storage_after`; storage that fails meanwhile is
    one line, not a traceback.

    When object storage stops answering, the trials fail on their checkpoint uploads until their retries
    run out, and Tune then fails reading its own state back. Neither is the trials' fault: nothing is
    summarised, and a --resume restores the state saved before the failure and reruns no finished trial.
    """
    try:
        with FitGuard(root) as watch:  # SIGTERM, a full disk, a lost folder: stopped as Ctrl-C stops it
            fitted = tuner.fit()
        _stopped(watch, root, what, resume_cmd)
        results = _finish(fitted, expected, what, resume_cmd, deadline_cut, interrupted=watch.stopping)
    except OSError as exc:  # pyarrow's errors for storage that does not answer
        raise storage_lost(root, what, exc, resume_cmd) from None
    _check_storage_after(results, root, what, resume_cmd)
    return results


def _stopped(watch: FitGuard, root: str, what: str, resume_cmd: str) -> None:
    """The one line for an experiment the guard stopped (search/guard.py)."""
    if watch.reason == "disk full" and _nearly_full(root):
        raise StorageUnavailable(
            f"the storage of {root} is full ({watch.detail}): the {what} was stopped, and Tune's state saved before "
            f"is kept, whole; free some space there, then resume with `{resume_cmd}`"
        )
    if watch.reason == "disk full":  # not the experiment's own disk: Ray's temp folder, a trial's staging folder
        raise StorageUnavailable(
            f"a disk the {what} writes to is full ({watch.detail}; the storage of {root} is not): the {what} was "
            f"stopped, with Tune's state saved; free some space (Ray's temp folder, /tmp?), then resume with "
            f"`{resume_cmd}`"
        )
    if watch.reason == "lost":
        raise ExperimentLost(f"{watch.detail}: the {what} was stopped, and nothing more is written there")


def _check_storage_after(results: tune.ResultGrid, root: str, what: str, resume_cmd: str) -> None:
    """Refuse to summarise trials that failed because the storage did (see :func:`_fit`)."""
    check_held(root)  # the folder deleted (or the lease taken) in the last moments of the fit
    failed = [r.error for r in results if r.error is not None and storage_failure(str(r.error))]
    if failed:
        raise storage_lost(root, what, str(failed[0]).strip().splitlines()[-1], resume_cmd)
    if is_uri(root):
        try:
            check_writable(root)
        except BssError as exc:
            raise storage_lost(root, what, exc, resume_cmd) from None


def _nearly_full(root: str) -> bool:
    """Whether a local experiment's own filesystem has (next to) no space left."""
    if is_uri(root):
        return False
    try:
        st = os.statvfs(root)
    except OSError:
        return True  # cannot tell: say it is the storage, which the user can check
    return st.f_bavail * st.f_frsize < 16 * 1024 * 1024


def _finish(
    results: tune.ResultGrid,
    expected: int,
    what: str,
    resume_cmd: str,
    deadline_cut: bool = False,
    interrupted: bool = False,
) -> tune.ResultGrid:
    """Raise Interrupted if Ctrl-C (or a lost driver) left trials unfinished, or if Tune was interrupted at all
    (``interrupted``: its "Stop signal received"): a Ctrl-C that lands as a budgeted search's last trial ends
    left nothing unfinished, and the job carried on past it. A budgeted search (``deadline_cut``) with fewer
    trials than planned has finished: its searcher ended it because no further trial could finish by the
    deadline, in this run or in the run a --resume continues (Tune restores that searcher finished). A Ctrl-C
    is then told by ``interrupted`` alone."""
    # Judge by the experiment state Tune saved, not by the in-memory Trial objects: on Ctrl-C
    # Tune saves the state (running trials RUNNING, which is what --resume restores) and *then*
    # stops the running trials, which marks them TERMINATED in memory as if they had finished.
    # (Quietly: trials Tune had not started yet have no results, which Ray warns about for each, twice.)
    analysis_log = logging.getLogger("ray.tune.analysis.experiment_analysis")
    level = analysis_log.level
    analysis_log.setLevel(logging.ERROR)
    try:
        trials = ExperimentAnalysis(results.experiment_path, storage_filesystem=results.filesystem).trials
    finally:
        analysis_log.setLevel(level)
    unfinished = [t for t in trials if t.status not in ("TERMINATED", "ERROR")]
    short = len(trials) < expected and not deadline_cut
    if unfinished or short or interrupted:
        exc = Interrupted(
            f"{what} interrupted{' (SIGTERM)' if terminated() else ''} with {len(trials) - len(unfinished)}/{expected}"
            f" trials finished; the state is saved: resume with `{resume_cmd}`"
        )
        exc.exit_code = 143 if terminated() else Interrupted.exit_code  # 128 + the signal, as a shell reports it
        raise exc
    return results


def run_search(
    cfg: SearchConfig, root: str, resume: bool, resume_cmd: str, trial_kwargs: dict[str, Any] | None = None
) -> tune.ResultGrid:
    """The search. With ``trial_kwargs`` (a budget: search/budgeted.py) its trials are time-boxed, no trial
    starts once it could not finish by the deadline the ledger holds (DeadlineSearcher), Tune stops what
    overruns it (DeadlineStopper), and the trials take the datasets from Ray's object store: a time-boxed
    trial pays for its start in its own time, so on a small budget the start matters
    (benchmarks/trial_overhead.py)."""
    budgeted = trial_kwargs is not None
    trainable = _trainable(cfg, cfg.base, trial_kwargs, search=True)
    path = tune_path(root, "search")
    # (not `mode`: that is the Tuner's min/max below, which once overwrote this and lost the "rebuild")
    how = restore_mode(root, "search") if resume else "new"  # "rebuild": tuner.pkl lost, Tune's state there
    if how == "restore":
        log.info("resuming the search at %s", path)
        tuner = _restore(root, path, trainable)
    else:
        budget = cfg.base.train.epochs
        metric, mode = METRIC, MODE
        if objectives.cost_of(cfg.tune.objectives):  # (never budgeted: search/config.py refuses the pair)
            searcher, scheduler = make_mo_search(cfg)
            metric = mode = None  # the searcher and the scheduler carry their own
        else:
            sampler = make_sampler(cfg.tune.seed, cfg.tune.n_startup_trials)
            searcher = make_searcher(sampler, cfg.tune.points_to_evaluate, stopped_as_pruned=False)
            scheduler = make_scheduler(cfg.base.train.epochs, cfg.tune.grace_period, cfg.tune.reduction_factor)
        if budgeted:
            searcher = DeadlineSearcher(searcher, root, first_wave=cfg.tune.max_concurrent)
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(cfg.dimensions()),
            tune_config=tune.TuneConfig(
                metric=metric,
                mode=mode,
                search_alg=searcher,
                scheduler=scheduler,
                num_samples=cfg.tune.num_samples,
                max_concurrent_trials=cfg.tune.max_concurrent,
                trial_dirname_creator=trial_label,  # also its TensorBoard run: search/007-f785168e
                trial_name_creator=trial_label,  # ... and its name in Ray's own views (console, dashboard, ResultGrid)
                # No actor reuse: a function trainable has no reset_config, and Ray 2.60 errors the trial it
                # would reuse an actor for ("Trainable runner reuse requires reset_config()"), seen in a
                # budgeted laptop search; the datasets come from the object store instead.
                reuse_actors=False,
            ),
            # Tune pickles these into the experiment (tuner.pkl), so a --resume restores them, the
            # study recorder with the epochs it had seen.
            run_config=_run_config(
                cfg,
                root,
                "search",
                [
                    SearchProgress(budget, cfg.tune.num_samples),
                    StudyRecorder(
                        root, cfg.tune.name, cfg.dimensions(), budget, cfg.tune.study_storage, cfg.tune.objectives
                    ),
                ],
                stop=DeadlineStopper(root, "search") if budgeted else None,
            ),
        )
        if how == "rebuild":  # the new Tuner wrote tuner.pkl as the search first did: restore the saved state
            tuner = _restore(root, path, trainable)
    return _fit(tuner, root, "search", cfg.tune.num_samples, resume_cmd, deadline_cut=budgeted)


def _restore(root: str, path: str, trainable: Any) -> tune.Tuner:
    return tune.Tuner.restore(path, trainable=trainable, resume_errored=True, storage_filesystem=tune_filesystem(root))


class RetrainProgress(Callback):
    """A console line per seed's epoch, at most one per seed every ``STATUS_EVERY_S`` (always its last: its
    test MSE), and one per finished seed: a retrain of 5 seeds x 120 epochs stays a screen, not 600 lines."""

    def __init__(self, seeds: int, epochs: int) -> None:
        self.seeds, self.epochs = seeds, epochs
        self.done: set[str] = set()

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "shown"}  # clock readings of this process only

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        seed = trial.config.get("train.seed")
        shown = self.__dict__.setdefault("shown", {})  # (absent from a callback pickled before it existed)
        now = time.monotonic()
        final = "test_mse_mean" in result or result.get("epoch") == self.epochs
        if not final and now - shown.get(seed, -math.inf) < STATUS_EVERY_S:
            return
        shown[seed] = now
        line = f"retrain seed {seed}: epoch {result.get('epoch')}/{self.epochs} val {result.get(METRIC, math.nan):.3e}"
        if "test_mse_mean" in result:
            line += f" test {result['test_mse_mean']:.3e}"
        print(f"{line}  [{len(self.done)}/{self.seeds} seeds done]", flush=True)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.done.add(trial.trial_id)
        seed = trial.config.get("train.seed")
        print(f"retrain seed {seed} finished [{len(self.done)}/{self.seeds} seeds done]", flush=True)


def run_retrain(
    cfg: SearchConfig, best_cfg: Config, root: str, resume_cmd: str, trial_kwargs: dict[str, Any] | None = None
) -> tune.ResultGrid:
    """The retrain of ``best_cfg`` over the seeds (a grid over ``train.seed``); with ``trial_kwargs`` (a budget)
    Tune stops it should it overrun the ledger's retrain deadline (each seed is time-limited already)."""
    seeds = cfg.retrain.seed_list
    trainable = _trainable(cfg, best_cfg, trial_kwargs)
    path = tune_path(root, "retrain")
    mode = restore_mode(root, "retrain")
    if mode == "restore":
        log.info("resuming the retrain at %s", path)
        tuner = _restore(root, path, trainable)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"train.seed": tune.grid_search(seeds)},
            tune_config=tune.TuneConfig(
                metric=METRIC,
                mode=MODE,
                num_samples=1,
                max_concurrent_trials=cfg.retrain.max_concurrent or cfg.tune.max_concurrent,
                trial_dirname_creator=seed_label,  # retrain/seed-1000
                trial_name_creator=seed_label,
            ),
            run_config=_run_config(
                cfg,
                root,
                "retrain",
                [RetrainProgress(len(seeds), best_cfg.train.epochs)],
                stop=DeadlineStopper(root, "retrain") if trial_kwargs is not None else None,
            ),
        )
        if mode == "rebuild":
            tuner = _restore(root, path, trainable)
    t0 = time.time()
    results = _fit(tuner, root, "retrain", len(seeds), resume_cmd)
    log.info("retrain finished in %.0f s", time.time() - t0)
    return results
