"""The driver's side of a budgeted job (``--budget 10m``): measure, plan, set each phase's clock, account.

search/budget.py holds the plan's maths, search/deadline.py the ledger and Tune's pieces, search/probe.py
the measurements; this module strings them together for search/pipeline.py:

    job = Budgeted.start(cfg, root, resume, started_at, cluster)   # the ledger; the plan (or the one it had)
    job.search_config(cfg)                                          # trials time-boxed, as many as planned
    job.search_clock()                                              # this run's search deadline
    job.retrain_config(cfg, summary, best_cfg)                      # the retrain, planned from the winner's speed
    job.report()                                                    # the budget section of the report

A budget too small for one trial and one retrain epoch is refused by ``Budgeted.start`` in one line; with a
local Ray that is before Ray starts (the probe runs in this process), on a cluster before any trial.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any

from bss_model.config import Config, config_from_dict
from bss_model.data import Splits, load_splits
from bss_model.errors import ConfigError
from search import budget, probe
from search.budget import JobShape, Plan, Speeds, format_duration
from search.config import SearchConfig, with_overrides
from search.deadline import Ledger
from search.results import SearchSummary, TrialRow

log = logging.getLogger("bss")


def local_cpus() -> int:
    """The CPUs this process may use (its affinity), which a local Ray gets."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def probe_config(cfg: SearchConfig) -> Config:
    """What the probe trains: the first starting point (a known-good configuration), else the base."""
    points = cfg.tune.points_to_evaluate
    return with_overrides(cfg.base.to_dict(), dict(points[0])) if points else copy.deepcopy(cfg.base)


def capacity(cfg: SearchConfig, cpus: float, gpus: float) -> tuple[int, int]:
    """How many search trials and retrain seeds run at once on ``cpus`` CPUs and ``gpus`` GPUs."""
    per_cpu = cfg.tune.cpus_per_trial
    room = math.floor(cpus / per_cpu + 1e-9) if per_cpu else 1
    if gpus and cfg.tune.gpus_per_trial:
        room = min(room, math.floor(gpus / cfg.tune.gpus_per_trial + 1e-9))
    room = max(1, room)
    search = min(cfg.tune.max_concurrent, room)
    retrain = min(cfg.retrain.max_concurrent or cfg.tune.max_concurrent, room, cfg.retrain.seeds)
    return search, retrain


def job_shape(cfg: SearchConfig, search_workers: int, retrain_workers: int) -> JobShape:
    return JobShape(
        trial_epochs=cfg.base.train.epochs,
        max_trials=cfg.tune.num_samples,
        concurrency=search_workers,
        grace_period=cfg.tune.grace_period,
        reduction_factor=cfg.tune.reduction_factor,
        seeds=cfg.retrain.seeds,
        retrain_concurrency=retrain_workers,
        retrain_epochs=cfg.retrain.epochs,
        protocol_pairs=cfg.base.eval.draws * cfg.base.eval.pairs,
        search_share=cfg.plan.search_share,
        min_trial_share=cfg.plan.min_trial_share,
    )


def eval_workers(cfg: SearchConfig, cpus: float, gpus: float) -> int:
    """The evaluation's tasks: one on a GPU, else one single-threaded task per CPU, at most one per draw
    (search/best_model.py evaluation_task)."""
    return 1 if gpus else max(1, min(int(cpus), cfg.base.eval.draws))


@dataclass
class Budgeted:
    cfg: SearchConfig
    ledger: Ledger
    shape: JobShape
    plan: Plan
    speeds: Speeds
    splits: Splits | None  # the training data, loaded once and shared with the trials (local Ray only)
    cpus: float
    gpus: float

    # -- the start: measure and plan ---------------------------------------------------
    @classmethod
    def start(
        cls, cfg: SearchConfig, root: str, resume: bool, started_at: float, cpus: float, gpus: float, remote: bool
    ) -> Budgeted:
        """Open the ledger and plan the job (a resumed job keeps the plan it had, and its spent time counts).

        ``cpus``/``gpus``: what the trials can use (this machine for a local Ray, else the cluster's);
        ``remote``: probe inside the cluster (a Ray task with a trial's resources) rather than here.
        """
        ledger = Ledger.open(root, cfg.budget_s, started_at, resume)
        workers, seed_workers = capacity(cfg, cpus, gpus)
        shape = job_shape(cfg, workers, seed_workers)
        spent = ledger.spent_before()
        splits = None if remote else load_splits(cfg.base.data)
        saved = ledger.data.get("plan")
        if saved and ledger.data.get("speeds"):
            plan, speeds = Plan.from_dict(saved), Speeds(**ledger.data["speeds"])
            left = cfg.budget_s - spent
            print(
                f"budget {format_duration(cfg.budget_s)}: {format_duration(spent)} spent by earlier runs, "
                f"{format_duration(max(0.0, left))} left",
                flush=True,
            )
            if left <= plan.eval_s + plan.report_s:
                raise ConfigError(
                    f"budget {format_duration(cfg.budget_s)} is spent ({format_duration(spent)} used by earlier "
                    f"runs; the evaluation alone needs {plan.eval_s:.0f} s): resume with a larger --budget, e.g. "
                    f"--budget {format_duration(spent + plan.eval_s + plan.report_s + 0.5 * plan.retrain_s + 60)}"
                )
            plan = dataclasses.replace(plan, budget_s=cfg.budget_s)
        else:
            speeds = cls._probe(cfg, splits, shape, cpus, gpus, remote)
            startup = time.time() - started_at
            plan = budget.plan_job(cfg.budget_s, spent, startup, speeds, shape)
            ledger.set(plan=plan.to_dict(), speeds=dataclasses.asdict(speeds))
        return cls(cfg, ledger, shape, plan, speeds, splits, cpus, gpus)

    @staticmethod
    def _probe(
        cfg: SearchConfig, splits: Splits | None, shape: JobShape, cpus: float, gpus: float, remote: bool
    ) -> Speeds:
        config = probe_config(cfg)
        train_threads = max(1, int(cfg.tune.cpus_per_trial)) if not gpus else 0
        eval_threads = 0 if gpus else 1  # the evaluation's tasks: one thread each, or a GPU
        if not remote:
            speeds = probe.probe(config, train_threads, eval_threads, splits)
        else:
            import ray

            gpu = min(1.0, cfg.tune.gpus_per_trial) if gpus else 0
            task = ray.remote(num_cpus=cfg.tune.cpus_per_trial, num_gpus=gpu)(probe.probe)
            speeds = ray.get(task.remote(config, train_threads, eval_threads))
        # The evaluation's speed is its tasks' together: one per CPU (at most one per draw), or one GPU.
        workers = eval_workers(cfg, cpus, gpus)
        return dataclasses.replace(speeds, infer_images_per_s=speeds.infer_images_per_s * workers)

    def ray_started(self, seconds: float) -> None:
        """Ray's start, measured: the plan had an estimate for it."""
        self.speeds = dataclasses.replace(self.speeds, ray_start_s=seconds)

    def describe(self) -> str:
        p = self.plan
        # "up to": the plan counts on ASHA stopping some trials early, freeing their slots; no trial starts that
        # could not finish by the deadline, so when ASHA stops none, fewer start and the retrain gets the rest.
        trials = f"up to {p.trials} trials of {p.trial_s:.0f} s, {self.shape.concurrency} at a time"
        seeds = f"{self.shape.seeds} seed(s) of {p.retrain_seed_s:.0f} s"
        return (
            f"budget {format_duration(p.budget_s)}: search {format_duration(p.search_s)} ({trials}), retrain "
            f"{format_duration(p.retrain_s)} ({seeds}), evaluation {format_duration(p.eval_s)}, report "
            f"{p.report_s:.0f} s, startup {p.startup_s:.0f} s, margin {p.margin_s:.0f} s"
        )

    # -- the search ----------------------------------------------------------------------
    def search_config(self, cfg: SearchConfig) -> SearchConfig:
        """The search as planned: every trial time-boxed at the plan's trial time (its epochs are equal time
        slices, ASHA's rungs equal times), no sample budget, and the planned number of trials."""
        out = copy.deepcopy(cfg)
        out.base.train.time_limit_s = round(self.plan.trial_s, 3)
        out.base.train.samples_per_epoch = 0
        out.tune.num_samples = self.plan.trials
        out.base.validate()
        return out

    def search_clock(self) -> tuple[float, float]:
        """This run's search deadline and the time after which no trial may start (``time.time()``), written
        to the ledger for the searcher and stopper that read them (search/deadline.py)."""
        done = float(self.ledger.data["phases"].get("search", {}).get("actual_s", 0.0))
        deadline = time.time() + max(0.0, self.plan.search_s - done)
        start_by = deadline - self.plan.trial_s - self.speeds.trial_setup_s
        self.ledger.data["deadlines"].update(search=deadline, search_start_by=start_by)
        self.ledger.begin("search", self.plan.search_s)
        return start_by, deadline

    def search_done(self, summary: SearchSummary) -> None:
        samples = sum(t.samples or 0 for t in summary.trials)
        self.ledger.end("search", samples=samples, trials=len(summary.trials))

    # -- the retrain ---------------------------------------------------------------------
    def winner_speeds(self, winner: TrialRow, best_cfg: Config) -> Speeds:
        """The winner's speed as the search measured it (its last epoch, at the search's concurrency, which
        the retrain's seeds run at too), and its inference speed for the protocol, probed now."""
        rate = winner.samples_per_s or self.speeds.train_samples_per_s
        tail = winner.epoch_tail_s if winner.epoch_tail_s is not None else self.speeds.epoch_tail_s
        infer = self.speeds.infer_images_per_s
        if self.splits is not None:  # a local Ray: probe the winner's inference here (a second or two)
            workers = eval_workers(self.cfg, self.cpus, self.gpus)
            infer = probe.inference_rate(best_cfg, 0 if self.gpus else 1) * workers
        return dataclasses.replace(self.speeds, train_samples_per_s=rate, epoch_tail_s=tail, infer_images_per_s=infer)

    def retrain_params(self, winner: TrialRow, best_cfg: Config) -> dict[str, Any]:
        """The retrain's budget keys: each seed time-limited to the plan's seed time (its epochs time slices, its
        cosine schedule over the time), so it uses all of it whatever the machine does meanwhile. The samples
        the winner's measured speed should train in it are the plan's expectation, reported beside what the
        seeds trained. Fixed once made: a --resume of the retrain goes on with the same seeds' budget."""
        saved = self.ledger.data.get("retrain_params")
        if saved:
            return dict(saved)
        speeds = self.winner_speeds(winner, best_cfg)
        self.plan = budget.replan_after_search(self.plan, self.ledger.now(), speeds, self.shape)
        epochs = self.cfg.retrain.epochs
        expected = epochs * budget.retrain_samples(
            self.plan.retrain_seed_s, epochs, speeds.train_samples_per_s, speeds.epoch_tail_s,
            best_cfg.train.batch_size,
        )  # fmt: skip
        params = {
            "train.epochs": epochs,
            "train.samples_per_epoch": 0,
            "train.time_limit_s": round(self.plan.retrain_seed_s, 3),
        }
        self.ledger.set(
            plan=self.plan.to_dict(), retrain_params=params, winner_speeds=dataclasses.asdict(speeds),
            retrain_expected_samples=expected,
        )  # fmt: skip
        print(
            f"retrain planned: {self.shape.seeds} seed(s) of {self.plan.retrain_seed_s:.0f} s, about {expected:,} "
            f"samples each at the winner's {speeds.train_samples_per_s:.0f} samples/s (measured in the search); "
            f"evaluation {self.plan.eval_s:.0f} s at {speeds.infer_images_per_s:.0f} images/s",
            flush=True,
        )
        return params

    def retrain_clock(self) -> None:
        done = float(self.ledger.data["phases"].get("retrain", {}).get("actual_s", 0.0))
        deadline = time.time() + max(0.0, self.plan.retrain_s - done)
        self.ledger.data["deadlines"].update(retrain=deadline)
        self.ledger.begin("retrain", self.plan.retrain_s)

    def summary_line(self) -> str:
        """The command's last line: what the budget was and what each phase took."""
        phases = self.ledger.data["phases"]
        took = ", ".join(
            f"{name} {format_duration(phases[name]['actual_s'])}"
            for name in ("startup", "search", "retrain", "eval", "report")
            if name in phases
        )
        return f"budget {format_duration(self.plan.budget_s)}: used {format_duration(self.ledger.now())} ({took})"

    # -- the report --------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        """The budget section of report.json: the budget, each phase's planned and actual time and samples."""
        phases = copy.deepcopy(self.ledger.data["phases"])
        return {
            "budget_s": self.plan.budget_s,
            "budget": self.cfg.budget,
            "spent_s": self.ledger.now(),
            "runs": len(self.ledger.data["runs"]),
            "plan": self.plan.to_dict(),
            "speeds": self.ledger.data.get("speeds"),
            "winner_speeds": self.ledger.data.get("winner_speeds"),
            "retrain_expected_samples": self.ledger.data.get("retrain_expected_samples"),
            "phases": phases,
        }


def planned_config(cfg: Config, params: dict[str, Any]) -> Config:
    """``cfg`` with dotted ``params`` (the retrain's planned budget keys) applied and validated."""
    return config_from_dict(with_overrides(cfg.to_dict(), params).to_dict())
