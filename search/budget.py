"""The whole job on a wall-clock budget: its syntax, the plan that divides it, and the ledger of time spent.

    bss-search --config laptop --budget 10m        # or `budget: 10m` in the config

The budget is the command's wall time from its start to its last line: Ray's start, the search, the
retrain, the evaluation (every seed and the seed ensemble on the test protocol) and the report. The plan
(:func:`plan_job`) divides it, from throughput measured on the hardware at hand (``search/probe.py``):

    startup   measured: the command so far (imports, config, data, the probe) and Ray's start
    eval      measured: the protocol's pairs x the retrain's seeds / the model's inference speed
    report    REPORT_RESERVE_S: the pictures and files
    margin    MARGIN_SHARE of the budget, for the clock's noise
    search    plan.search_share of the rest. Trials are *time-boxed* (train.time_limit_s): every trial
              gets the same wall time, so ASHA's rungs are equal times and a model twice as fast is
              credited with twice the samples -- which is what it will get in the retrain
    retrain   the rest, planned again when the search ends (it gets whatever the search left)

Why time-boxed trials: under a wall-clock budget the resource is time, not samples. A search that
compared trials at equal samples would favour a slow model that is a little better per sample over a
fast one that is better per second, and the retrain only has seconds to give.

Everything here is a pure function of numbers (tested on tiny inputs in tests/test_budget.py); the
pipeline measures, calls these, and runs what they say.
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from bss_model.errors import ConfigError

UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
MAX_BUDGET_S = 30 * 24 * 3600.0  # a month (bss_model.config.MAX_TIME_LIMIT_S)
# Held back for the report: best_model.pt, its separations, 3-4 matplotlib figures, report.json/md and their
# upload. Measured at 3-6 s on the 2-core CPU (the report's own `report_s` in report.json says what it took).
REPORT_RESERVE_S = 8.0
# A share of the budget kept free for what the clock cannot plan: a slow epoch, a late actor. The command
# may overrun by 5% (30 s under 10 minutes); the plan aims this far *below* the budget instead.
MARGIN_SHARE = 0.02
# Ray's start before it has started (the refusal of a too-small budget comes first); measured afterwards.
RAY_START_ESTIMATE_S = 6.0
# A Ray actor's start for a trial (a fresh Python process importing torch and Ray) before any was measured.
ACTOR_START_ESTIMATE_S = 3.0
# The evaluation's fixed cost beside its inference: its tasks' processes start, import torch, read and check the
# test sets and load every seed's checkpoint. Measured at 11-15 s on the 2-core CPU (benchmarks/results/
# time-to-quality-cpu.json: each job's planned and actual evaluation).
EVAL_START_S = 15.0
# The samples a retrain seed is expected to train are reported at this share of the winner's measured
# speed (a seed's epochs and schedule run on its time limit, so it trains what the machine gives it).
RETRAIN_SPEED_SLACK = 0.92


def process_started_at() -> float:
    """When this process started (``time.time()`` scale): the budget counts from the command's start, its
    imports included. From /proc on Linux; elsewhere, the first time this is asked."""
    global _FALLBACK_START
    try:
        ticks = os.sysconf("SC_CLK_TCK")
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(float(line.split()[1]) for line in f if line.startswith("btime"))
        return boot + start_ticks / ticks
    except (OSError, ValueError, IndexError, StopIteration):
        _FALLBACK_START = _FALLBACK_START or time.time()
        return _FALLBACK_START


_FALLBACK_START: float | None = None


# --------------------------------------------------------------------------------------
# The budget's syntax


def parse_duration(value: Any, key: str = "budget") -> float:
    """``"10m"`` -> 600.0. Units s, m, h, combinable (``1h30m``, ``2m30s``), decimals allowed (``2.5m``).

    A bare number is refused: 600 of what? Every problem is one ConfigError naming ``key``.
    """
    text = str(value).strip().lower().replace(" ", "")
    example = "write e.g. 90s, 10m, 2.5m or 1h30m"
    if isinstance(value, bool) or not text:
        raise ConfigError(f"{key}={value!r} is not a duration: {example}")
    if re.fullmatch(r"[0-9.e+-]+", text):
        raise ConfigError(f"{key}={value!r} has no unit: {example} (s, m or h)")
    parts = re.findall(r"(\d+(?:\.\d*)?|\.\d+)([smh])", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ConfigError(f"{key}={value!r} is not a duration: {example}")
    seconds = sum(float(n) * UNITS[u] for n, u in parts)
    if not 0 < seconds <= MAX_BUDGET_S:
        raise ConfigError(f"{key}={value!r} is out of range: expected more than 0 s and at most 30 days")
    return seconds


def format_duration(seconds: float) -> str:
    """600 -> ``10m``, 150 -> ``2m30s``, 3725 -> ``1h2m5s`` (whole seconds, rounded up)."""
    s = max(0, math.ceil(seconds - 1e-9))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    out = (f"{h}h" if h else "") + (f"{m}m" if m else "") + (f"{s}s" if s or not (h or m) else "")
    return out


# --------------------------------------------------------------------------------------
# What the plan needs to know, and what it decides


@dataclass
class Speeds:
    """What was measured on this hardware (search/probe.py), in seconds and per second.

    ``train_samples_per_s`` and ``epoch_tail_s`` are one trial's at its resources and the search's
    concurrency; ``infer_images_per_s`` is the protocol's inference on the evaluation's resources.
    """

    train_samples_per_s: float
    epoch_tail_s: float  # an epoch's time after training: validation, checkpoint, report
    trial_setup_s: float  # a trial's start before its first step: actor, data, model
    infer_images_per_s: float
    ray_start_s: float = RAY_START_ESTIMATE_S
    batch_size: int = 32  # the probed configuration's batch size: the smallest epoch is one step of it


@dataclass
class JobShape:
    """The job's fixed shape, from its config: epochs, trials, concurrency, ASHA's rungs, seeds, the protocol."""

    trial_epochs: int  # base.train.epochs: ASHA's max_t
    max_trials: int  # tune.num_samples: the plan may run fewer
    concurrency: int  # trials at once (tune.max_concurrent, within the cluster's room)
    grace_period: int
    reduction_factor: float
    seeds: int
    retrain_concurrency: int
    retrain_epochs: int
    protocol_pairs: int  # eval.draws x eval.pairs, per seed
    search_share: float  # plan.search_share
    min_trial_share: float  # plan.min_trial_share: a full trial's time against a retrain seed's


@dataclass
class Plan:
    """How the budget is spent, in seconds: each phase's planned time and the work it holds."""

    budget_s: float
    spent_before_s: float  # by earlier runs of this experiment (a --resume)
    startup_s: float
    search_s: float
    trials: int
    trial_s: float  # every trial's time limit (train.time_limit_s): its wall time, validation included
    retrain_s: float
    retrain_seed_s: float  # each seed's time limit
    retrain_waves: int
    eval_s: float
    report_s: float
    margin_s: float
    search_share: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        return cls(**data)

    @property
    def end_s(self) -> float:
        """When the plan ends, on the budget's clock (0 = the first run's start)."""
        return self.spent_before_s + self.startup_s + self.search_s + self.retrain_s + self.eval_s + self.report_s


# --------------------------------------------------------------------------------------
# The maths


def rungs(max_t: int, grace_period: int, reduction_factor: float) -> list[int]:
    """ASHA's milestones in epochs, as Ray's AsyncHyperBandScheduler makes them, and max_t last."""
    grace = min(grace_period, max_t)
    out, milestone = [], float(grace)
    while milestone < max_t:
        out.append(int(milestone))
        milestone *= reduction_factor
    return sorted(set(out)) + [max_t]


def asha_trial_units(trials: int, max_t: int, grace_period: int, reduction_factor: float) -> float:
    """The expected work of ``trials`` trials under ASHA, in full trials (each ``max_t`` epochs).

    Successive halving keeps 1/rf of the trials at each rung; asynchronous ASHA also promotes the first
    trial to reach a rung (it is the best there so far), so at least one trial climbs each rung. With
    one trial the work is that trial; with no early stopping (grace = max_t) it is every trial.
    """
    if trials <= 0:
        return 0.0
    points = rungs(max_t, grace_period, reduction_factor)
    work, previous = 0.0, 0
    for k, milestone in enumerate(points):
        reach = max(1, math.ceil(trials / reduction_factor**k))
        work += reach * (milestone - previous) / max_t
        previous = milestone
    return work


def eval_seconds(seeds: int, protocol_pairs: int, images_per_s: float) -> float:
    """The protocol for every seed (the ensemble comes from the same predictions), with its start."""
    return EVAL_START_S + seeds * protocol_pairs / images_per_s


def smallest_epoch_s(speeds: Speeds) -> float:
    """An epoch at its smallest: one step, then its validation and checkpoint."""
    return speeds.batch_size / speeds.train_samples_per_s + speeds.epoch_tail_s


def trial_time(search_s: float, trials: int, shape: JobShape, setup_s: float) -> float:
    """The longest time limit that lets ``trials`` time-boxed trials finish within ``search_s``.

    ``shape.concurrency`` trials run at once; their work is :func:`asha_trial_units` full trials, each
    costing its setup plus its time. No plan can be shorter than one trial start to end.
    """
    workers = max(1, min(shape.concurrency, trials))
    units = asha_trial_units(trials, shape.trial_epochs, shape.grace_period, shape.reduction_factor)
    by_throughput = (search_s * workers - trials * setup_s) / units
    return min(by_throughput, search_s - setup_s)


def plan_job(budget_s: float, spent_before_s: float, startup_s: float, speeds: Speeds, shape: JobShape) -> Plan:
    """Divide what is left of the budget between the phases (see the module docstring).

    The search gets ``search_share`` of the training time and runs as many trials (up to
    ``max_trials``) as it can while each full trial keeps at least ``min_trial_share`` of a retrain
    seed's time; the retrain gets the rest. Raises ConfigError when not even one trial and one
    retrain epoch fit, naming the smallest budget that would (:func:`minimum_budget`).
    """
    waves = math.ceil(shape.seeds / max(1, min(shape.retrain_concurrency, shape.seeds)))
    eval_s = eval_seconds(shape.seeds, shape.protocol_pairs, speeds.infer_images_per_s)
    margin = MARGIN_SHARE * budget_s
    left = budget_s - spent_before_s - startup_s - speeds.ray_start_s - eval_s - REPORT_RESERVE_S - margin
    search_s = shape.search_share * left
    retrain_s = left - search_s
    seed_s = retrain_s / waves - speeds.trial_setup_s
    smallest_trial = speeds.trial_setup_s + shape.trial_epochs * smallest_epoch_s(speeds)
    floor = max(shape.trial_epochs * smallest_epoch_s(speeds), shape.min_trial_share * seed_s)
    trials, trial_s = 0, 0.0
    for n in range(max(1, shape.max_trials), 0, -1):
        t = trial_time(search_s, n, shape, speeds.trial_setup_s)
        if t >= floor:
            trials, trial_s = n, t
            break
    if not trials:
        # Not even one wave keeps min_trial_share of a seed (a small search_share): one wave then, each trial
        # as long as the search's time allows. min_trial_share limits how many trials, never whether any.
        n = max(1, min(shape.concurrency, shape.max_trials))
        t = trial_time(search_s, n, shape, speeds.trial_setup_s)
        if t >= shape.trial_epochs * smallest_epoch_s(speeds):
            trials, trial_s = n, t
    if search_s < smallest_trial or seed_s < shape.retrain_epochs * smallest_epoch_s(speeds) or not trials:
        need = minimum_budget(spent_before_s, startup_s, speeds, shape)
        raise ConfigError(
            f"budget {format_duration(budget_s)} is too small for this job: one search trial and one retrain "
            f"epoch per seed need at least {format_duration(need)} here (startup "
            f"{startup_s + speeds.ray_start_s:.0f} s, "
            f"the protocol's evaluation of {shape.seeds} seed(s) {eval_s:.0f} s, measured on this machine): "
            f"use --budget {format_duration(need)} or more"
            + (f" ({format_duration(spent_before_s)} already spent by earlier runs)" if spent_before_s else "")
        )
    notes = []
    if trials < shape.max_trials:
        notes.append(
            f"{trials} of tune.num_samples={shape.max_trials} trials: more would leave each less than "
            f"plan.min_trial_share={shape.min_trial_share:g} of a retrain seed's time"
        )
    return Plan(
        budget_s=budget_s,
        spent_before_s=spent_before_s,
        startup_s=startup_s + speeds.ray_start_s,
        search_s=search_s,
        trials=trials,
        trial_s=trial_s,
        retrain_s=retrain_s,
        retrain_seed_s=seed_s,
        retrain_waves=waves,
        eval_s=eval_s,
        report_s=REPORT_RESERVE_S,
        margin_s=margin,
        search_share=shape.search_share,
        notes=notes,
    )


def minimum_budget(spent_before_s: float, startup_s: float, speeds: Speeds, shape: JobShape) -> float:
    """The smallest budget (whole seconds) for which :func:`plan_job` finds one trial and a retrain."""
    waves = math.ceil(shape.seeds / max(1, min(shape.retrain_concurrency, shape.seeds)))
    epoch = smallest_epoch_s(speeds)
    search = speeds.trial_setup_s + shape.trial_epochs * epoch
    retrain = waves * (speeds.trial_setup_s + shape.retrain_epochs * epoch)
    # The search gets search_share of the training time and the retrain the rest: the larger need decides.
    train = max(search / shape.search_share, retrain / (1 - shape.search_share))
    fixed = (
        spent_before_s + startup_s + speeds.ray_start_s + REPORT_RESERVE_S
        + eval_seconds(shape.seeds, shape.protocol_pairs, speeds.infer_images_per_s)
    )  # fmt: skip
    return math.ceil((fixed + train * 1.001) / (1 - MARGIN_SHARE))


def retrain_samples(seed_s: float, epochs: int, samples_per_s: float, epoch_tail_s: float, batch: int) -> int:
    """A retrain seed's sample budget per epoch: what the winner's measured speed trains in the seed's time
    (less each epoch's validation), at RETRAIN_SPEED_SLACK of that speed, in whole batches (at least one)."""
    train_s = max(0.0, seed_s - epochs * epoch_tail_s)
    per_epoch = RETRAIN_SPEED_SLACK * samples_per_s * train_s / epochs
    return max(batch, int(per_epoch // batch) * batch)


def replan_after_search(plan: Plan, elapsed_s: float, speeds: Speeds, shape: JobShape) -> Plan:
    """The retrain's plan once the search has ended: it gets every second the budget still has, less the
    evaluation (now measured for the winner), the report and the margin. ``elapsed_s`` is on the budget's
    clock (earlier runs included)."""
    eval_s = eval_seconds(shape.seeds, shape.protocol_pairs, speeds.infer_images_per_s)
    retrain_s = plan.budget_s - elapsed_s - eval_s - plan.report_s - plan.margin_s
    seed_s = retrain_s / plan.retrain_waves - speeds.trial_setup_s
    smallest = shape.retrain_epochs * smallest_epoch_s(speeds)
    notes = list(plan.notes)
    if seed_s < smallest:
        notes.append(f"the search left {retrain_s:.0f} s for the retrain: each seed gets its smallest epochs")
        seed_s = smallest
    return Plan(
        **{**plan.to_dict(), "retrain_s": retrain_s, "retrain_seed_s": seed_s, "eval_s": eval_s, "notes": notes}
    )
