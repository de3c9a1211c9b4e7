"""Whole searches replayed against the learning-curve table, in simulated time, method against method.

    python benchmarks/search_replay.py [--table FILE] [--json OUT] [--plot OUT.png] [--seeds 20] [--workers W]

Each replay is one search as the real job runs it, with the real job's parts:
- the search space is ``search/space.py``'s, built from the table's ``space`` (its values are the
  table's: filters scaled down, every other dimension as in configs/search.yaml);
- the searcher is Ray's own ``OptunaSearch`` around the sampler ``search/tuners.py`` builds, told
  results exactly as Tune's controller tells them: ``on_trial_result`` for each result the scheduler
  lets continue, ``on_trial_complete`` with the last result when a trial ends, so an ASHA-stopped
  trial is recorded COMPLETE with its last, low-fidelity value;
- the scheduler is Ray's own ``AsyncHyperBandScheduler`` as ``search/tuners.py`` builds it, asked
  about every result;
- the winner is ``search/selection.pick_best`` over rows made by ``selection.trial_row``: the best
  trial that ran its full budget.

A trial's parameters are looked up in the table: the configuration with the same parameters, else
the nearest one (categorical mismatches count 1, numeric ones their distance on the dimension's
[0, 1] scale, log-scaled where the dimension is): a 1-nearest-neighbour surrogate, the same for
every method. Simulated time: W asynchronous workers; each epoch of a trial takes
``samples_per_epoch / samples_per_s`` seconds, its throughput measured alone in the table. A new
trial starts the moment a worker frees up, as Tune's ``max_concurrent_trials`` does.

Outputs: for each method, over ``--seeds`` seeds, the median and interquartile range of the normalised
regret of the *selected* winner -- (its val MSE - the table's best) / (the reference config's - the
table's best) -- against simulated wall time and against trial-epochs; the headline ratio (the
compute at which TPE + ASHA's median first reaches random search's final median, over random
search's total compute); and Spearman's rank correlation of each rung's val MSE with the final one.
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import json
import logging
import math
import multiprocessing as mp
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from search import pareto  # noqa: E402
from search.selection import METRIC, MODE, pick_best, trial_row  # noqa: E402
from search.space import KINDS, Dimension, param_space, parse_space  # noqa: E402

DEFAULT_TABLE = ROOT / "benchmarks" / "results" / "learning-curves-cpu.json"
DEFAULT_COSTS = ROOT / "benchmarks" / "results" / "learning-curves-cpu-costs.json"  # benchmarks/model_costs.py


# -- the table ------------------------------------------------------------------------------------


@dataclass
class Table:
    """Learning curves by configuration: seed 0's curve per config, its throughput and final status."""

    space: dict[str, Dimension]
    params: list[dict[str, Any]]
    curves: list[list[float]]  # val MSE per epoch; shorter than ``epochs`` if the run diverged or failed
    epoch_seconds: list[float]  # simulated seconds per epoch on one worker
    epochs: int  # the full budget
    reference: int  # the reference-shaped config's index
    path: str = ""
    # Each config's costs by name (params from the table's n_params; macs and cpu_ms from a costs file,
    # benchmarks/model_costs.py): the second objective of a multi-objective replay.
    costs: dict[str, list[float]] = field(default_factory=dict)
    _encoded: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._encoded = np.array([self.encode(p) for p in self.params])

    @classmethod
    def load(cls, path: str | Path, costs: str | Path | None = None) -> Table:
        data = json.loads(Path(path).read_text())
        extra = json.loads(Path(costs).read_text()) if costs else None
        return cls.from_dict(data, str(path), extra)

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: str = "", extra_costs: dict[str, Any] | None = None) -> Table:
        epochs = int(data["meta"]["base"]["train"]["epochs"])
        samples = int(data["meta"]["base"]["train"]["samples_per_epoch"])
        runs = {r["config"]: r for r in data["runs"] if r["seed"] == 0}
        configs = [c for c in data["configs"] if c["id"] in runs and c.get("samples_per_s")]
        # A run that diverged or failed reported fewer epochs than the budget: its curve is shorter.
        curves = [[v for v in runs[c["id"]]["val_mse"] if math.isfinite(v)] for c in configs]
        ref = next((i for i, c in enumerate(configs) if c.get("role") == "reference"), 0)
        costs: dict[str, list[float]] = {}
        if all(c.get("n_params") for c in configs):
            costs["params"] = [float(c["n_params"]) for c in configs]
        if extra_costs:
            by_id = {r["id"]: r for r in extra_costs["configs"]}
            for key in ("params", "macs", "cpu_ms"):
                if all(key in by_id.get(c["id"], {}) for c in configs):
                    costs[key] = [float(by_id[c["id"]][key]) for c in configs]
        return cls(
            space=parse_space(data["space"]),
            params=[c["params"] for c in configs],
            curves=curves,
            epoch_seconds=[samples / float(c["samples_per_s"]) for c in configs],
            epochs=epochs,
            reference=ref,
            path=path,
            costs=costs,
        )

    def encode(self, params: dict[str, Any]) -> list[float]:
        """Each dimension on [0, 1] (log-scaled where the dimension is); categoricals as their index."""
        out = []
        for key, dim in self.space.items():
            v = params[key]
            kind = KINDS[dim.kind]
            if kind.categorical:
                out.append(float(dim.args.index(v)) if v in dim.args else -1.0)
                continue
            low, high = dim.args
            f = (lambda x: math.log(x)) if kind.log else (lambda x: float(x))
            out.append(0.0 if high == low else (f(v) - f(low)) / (f(high) - f(low)))
        return out

    def nearest(self, params: dict[str, Any]) -> int:
        """The table's configuration for ``params``: itself if present, else the nearest (ties: the lowest id)."""
        x = np.array(self.encode(params))
        diff = np.abs(self._encoded - x)
        cat = np.array([KINDS[d.kind].categorical for d in self.space.values()])
        diff[:, cat] = (diff[:, cat] > 0).astype(float)
        return int(np.argmin(diff.sum(axis=1)))

    def final(self, i: int) -> float:
        """The full-budget val MSE of config ``i`` (inf if it never ran its budget)."""
        c = self.curves[i]
        return c[-1] if len(c) >= self.epochs else math.inf

    @property
    def best(self) -> float:
        return min(self.final(i) for i in range(len(self.params)))

    def regret(self, val: float) -> float:
        """(val - best) / (reference - best): 0 at the table's best, 1 at the reference-shaped config."""
        best, ref = self.best, self.final(self.reference)
        return (val - best) / (ref - best) if math.isfinite(val) else math.inf

    # Two objectives: (log10 val MSE, log10 cost) of the configs that ran their full budget, as the job's report
    # takes them (search/objectives.py), with the reference point a tenth of a decade beyond the table's worst.
    def log_point(self, i: int, cost: str) -> tuple[float, float]:
        return math.log10(self.final(i)), math.log10(self.costs[cost][i])

    def reference_point(self, cost: str) -> tuple[float, float]:
        full = [self.log_point(i, cost) for i in range(len(self.params)) if math.isfinite(self.final(i))]
        return max(p[0] for p in full) + 0.1, max(p[1] for p in full) + 0.1

    def true_front(self, cost: str) -> list[int]:
        full = [i for i in range(len(self.params)) if math.isfinite(self.final(i))]
        return [full[j] for j in pareto.pareto_front([self.log_point(i, cost) for i in full])]

    def hypervolume(self, configs: list[int], cost: str) -> float:
        return pareto.hypervolume([self.log_point(i, cost) for i in configs], self.reference_point(cost))

    def hv_regret(self, configs: list[int], cost: str) -> float:
        """1 - HV(front of ``configs``) / HV(the table's front): 0 when the search found the table's whole front."""
        best = self.hypervolume(self.true_front(cost), cost)
        return 1.0 - self.hypervolume(configs, cost) / best


# -- methods --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    name: str
    sampler: str = "tpe"  # tpe | random
    asha: bool = True
    budget_factor: float = 1.0  # x num_samples (random search with twice the budget: 2)
    stopped_as_pruned: bool = False  # tell TPE an ASHA-stopped trial as PRUNED rather than COMPLETE
    points: bool = False  # start from the job's points_to_evaluate (scaled), as the real job does
    multivariate: bool | None = None  # None: search/tuners.py's pinned choice
    constant_liar: bool | None = None
    # Two objectives (val MSE and the table's cost named by --objective): the sampler is tpe | nsga2 | gp | random
    # (search/tuners.make_mo_sampler), ASHA's rungs judge val_mse or rank by non-dominated sorting (search/moasha.py).
    multiobjective: bool = False
    rung: str = "val_mse"


METHODS = [
    Method("random", sampler="random", asha=False),
    Method("random+asha", sampler="random", asha=True),
    Method("tpe", sampler="tpe", asha=False),
    Method("tpe+asha", sampler="tpe", asha=True),  # the job's default (search/tuners.py)
    Method("random-2x", sampler="random", asha=False, budget_factor=2.0),
    Method("tpe+asha-pruned", sampler="tpe", asha=True, stopped_as_pruned=True),
    Method("tpe+asha-multivariate", sampler="tpe", asha=True, multivariate=True),  # Optuna 5's default
    Method("tpe+asha-no-liar", sampler="tpe", asha=True, constant_liar=False),
    Method("tpe+asha+points", sampler="tpe", asha=True, points=True),
]


# The multi-objective comparison (--objective COST): each sampler without early stopping, with ASHA on val MSE
# (+asha) and with the non-dominated rung rule (+moasha, search/moasha.py). "-pruned": an early-stopped trial is
# told PRUNED (the job's StoppedAsPrunedSearch); without it, Ray's OptunaSearch tells it COMPLETE with its
# low-fidelity values. The gp methods need scipy.
def _mo(sampler: str, asha: bool = True, rung: str = "val_mse", pruned: bool = False) -> Method:
    name = {"tpe": "mo-tpe", "random": "mo-random"}.get(sampler, sampler)
    if asha:
        name += "+moasha" if rung == "nondominated" else "+asha"
    return Method(name + ("-pruned" if pruned else ""), sampler=sampler, asha=asha, stopped_as_pruned=pruned,
                  multiobjective=True, rung=rung)  # fmt: skip


MO_METHODS = [
    _mo("random", asha=False),
    _mo("tpe", asha=False),
    *[_mo(sampler, True, rung, pruned) for rung in ("val_mse", "nondominated") for sampler in ("random", "tpe",
      "nsga2", "gp") for pruned in ((False,) if sampler == "random" else (False, True))],
]  # fmt: skip


@dataclass(frozen=True)
class Settings:
    """The search settings being replayed, in table epochs (configs/search.yaml's, scaled)."""

    num_samples: int = 96
    workers: int = 16  # tune.max_concurrent
    n_startup_trials: int = 24
    grace_period: int = 2
    reduction_factor: int = 3


class _Trial:
    """What Ray's scheduler reads of a trial: its id."""

    def __init__(self, trial_id: str) -> None:
        self.trial_id = trial_id


def make_searcher(
    method: Method, table: Table, settings: Settings, seed: int, points: list[dict[str, Any]], cost: str = ""
):
    from ray.tune.search.optuna import OptunaSearch

    from search.tuners import make_mo_sampler, make_mo_searcher, make_sampler
    from search.tuners import make_searcher as job_searcher

    if method.multiobjective:
        sampler = make_mo_sampler(seed, settings.n_startup_trials, method.sampler)
        searcher = make_mo_searcher(sampler, points, cost, method.stopped_as_pruned)
        searcher.set_search_properties(None, None, param_space(table.space))  # a Tuner with no metric of its own
        return searcher
    if method.sampler == "random":
        import optuna

        sampler = optuna.samplers.RandomSampler(seed=seed)
        searcher = OptunaSearch(sampler=sampler, points_to_evaluate=points or None)
    else:
        options = {"multivariate": method.multivariate, "constant_liar": method.constant_liar}
        sampler = make_sampler(seed, settings.n_startup_trials, **{k: v for k, v in options.items() if v is not None})
        searcher = job_searcher(sampler, points, method.stopped_as_pruned)
    # What Tune's SearchGenerator does with the Tuner's param_space, metric and mode.
    searcher.set_search_properties(METRIC, MODE, param_space(table.space))
    return searcher


def make_scheduler(settings: Settings, epochs: int, method: Method | None = None, cost: str = ""):
    from search.tuners import make_mo_scheduler
    from search.tuners import make_scheduler as job_scheduler

    if method is not None and method.multiobjective:
        sched = make_mo_scheduler(epochs, settings.grace_period, settings.reduction_factor, cost, method.rung)
        assert sched.set_search_properties(None, None)  # the Tuner names no metric
        return sched
    sched = job_scheduler(epochs, settings.grace_period, settings.reduction_factor)
    sched.set_search_properties(METRIC, MODE)  # TuneConfig(metric=..., mode=...)
    return sched


@dataclass
class Replay:
    """One search's timeline: after each trial end, (wall time, compute, trial-epochs, winner's val MSE)."""

    method: str
    seed: int
    wall: list[float]
    compute: list[float]
    trial_epochs: list[int]
    winner_val: list[float]
    trials: int
    winner: int  # the table config the search selected (-1: none)
    # Every result the scheduler judged, in order: (trial id, epoch, val MSE, decision); tests replay it.
    decisions: list[tuple[str, int, float, str]] = field(default_factory=list)
    # Two objectives: after each trial end, the hypervolume regret of the front of the full-budget trials so far,
    # and at the end the table configs on that front.
    hv_regret: list[float] = field(default_factory=list)
    front: list[int] = field(default_factory=list)


def replay(
    method: Method, table: Table, settings: Settings, seed: int, points: list[dict] | None = None, cost: str = ""
) -> Replay:
    """Run one whole search in simulated time; deterministic for (method, table, settings, seed)."""
    from ray.tune.schedulers import TrialScheduler

    points = list(points or []) if method.points else []
    if method.multiobjective and cost not in table.costs:
        raise ValueError(f"the table has no {cost!r} for its configs (it has {sorted(table.costs)})")
    searcher = make_searcher(method, table, settings, seed, points, cost)
    scheduler = make_scheduler(settings, table.epochs, method, cost) if method.asha else None
    n_trials = int(round(settings.num_samples * method.budget_factor))
    events: list[tuple[float, int, str]] = []  # (time, sequence, trial id): a trial's epoch ends
    state: dict[str, dict[str, Any]] = {}
    rows = []
    seq = 0
    started = 0
    now = compute = 0.0
    epochs_run = 0
    out = Replay(method.name, seed, [0.0], [0.0], [0], [math.inf], 0, -1)
    if method.multiobjective:
        out.hv_regret.append(1.0)
    full_configs: list[int] = []  # the table configs of the full-budget trials so far

    def start(t: float) -> None:
        nonlocal started, seq
        tid = f"{started:05d}"
        params = searcher.suggest(tid)
        started += 1
        cid = table.nearest(params)
        state[tid] = {"params": params, "config": cid, "epoch": 0, "last": None}
        if scheduler:
            scheduler.on_trial_add(None, _Trial(tid))
        seq += 1
        heapq.heappush(events, (t + table.epoch_seconds[cid], seq, tid))

    def finish(tid: str, result: dict[str, Any] | None, error: bool) -> None:
        st = state[tid]
        if error:
            if scheduler:
                scheduler.on_trial_error(None, _Trial(tid))
            searcher.on_trial_complete(tid, error=True)
        else:
            if scheduler:
                scheduler.on_trial_complete(None, _Trial(tid), result)
            searcher.on_trial_complete(tid, result=result)
        rows.append(
            trial_row(st["last"], "error" if error else None, st["params"], f"t_{tid}_{len(rows)}", table.epochs)
        )
        rows[-1].trial_id = str(st["config"])  # remember which table config it was
        full = [r for r in rows if r.status == "completed"]
        winner_val = pick_best(rows).val_mse if full else math.inf
        if method.multiobjective:
            if rows[-1].status == "completed":  # a stopped or diverged trial is never on the front
                full_configs.append(st["config"])
            out.hv_regret.append(table.hv_regret(full_configs, cost))
        out.wall.append(now)
        out.compute.append(compute)
        out.trial_epochs.append(epochs_run)
        out.winner_val.append(winner_val)
        if started < n_trials:
            start(now)

    for _ in range(min(settings.workers, n_trials)):
        start(0.0)
    while events:
        now, _, tid = heapq.heappop(events)
        st = state[tid]
        cid = st["config"]
        compute += table.epoch_seconds[cid]
        epochs_run += 1
        st["epoch"] += 1
        e = st["epoch"]
        curve = table.curves[cid]
        if e > len(curve):  # diverged (or failed) at this epoch: the trainable reports, then raises
            result = {
                METRIC: math.nan,
                "training_iteration": e,
                "epoch": e,
                "budget_epochs": table.epochs,
                "diverged": True,
            }
            st["last"] = result
            if scheduler:
                scheduler.on_trial_result(None, _Trial(tid), result)
            finish(tid, result, error=True)
            continue
        result = {METRIC: curve[e - 1], "training_iteration": e, "epoch": e, "budget_epochs": table.epochs}
        if method.multiobjective:  # the trial's cost, measured once at its start, rides with every result
            result[cost] = table.costs[cost][cid]
        st["last"] = result
        if scheduler:
            decision = scheduler.on_trial_result(None, _Trial(tid), result)
            out.decisions.append((tid, e, result[METRIC], decision))
        else:  # FIFO: Tune stops a trial at its budget (the trainable returns)
            decision = TrialScheduler.STOP if e >= table.epochs else TrialScheduler.CONTINUE
        if decision == TrialScheduler.STOP or e >= table.epochs:
            finish(tid, result, error=False)
        else:
            searcher.on_trial_result(tid, result)
            seq += 1
            heapq.heappush(events, (now + table.epoch_seconds[cid], seq, tid))
    full = [r for r in rows if r.status == "completed"]
    out.trials = len(rows)
    out.winner = int(pick_best(rows).trial_id) if full else -1
    if method.multiobjective:
        unique = sorted(set(full_configs))
        out.front = sorted({unique[j] for j in pareto.pareto_front([table.log_point(i, cost) for i in unique])})
    return out


# -- the comparison -------------------------------------------------------------------------------


def _job(args: tuple) -> Replay:
    method, table, settings, seed, points, cost = args
    logging.getLogger("optuna").setLevel(logging.WARNING)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    import warnings

    warnings.filterwarnings("ignore")
    return replay(method, table, settings, seed, points, cost)


def curve_on_grid(
    replays: list[Replay], table: Table, axis: str, grid: np.ndarray, hv: bool = False
) -> dict[str, list[float]]:
    """Median and quartiles over seeds of the normalised regret at each grid point (a step function); ``hv``: of
    the hypervolume regret of the front of full-budget trials."""
    mat = np.full((len(replays), len(grid)), np.inf)
    for k, r in enumerate(replays):
        xs = np.asarray(getattr(r, axis), dtype=float)
        regrets = np.array(r.hv_regret if hv else [table.regret(v) for v in r.winner_val])
        idx = np.searchsorted(xs, grid, side="right") - 1
        mat[k] = regrets[np.clip(idx, 0, None)]
    q25, q50, q75 = (np.percentile(mat, q, axis=0) for q in (25, 50, 75))
    return {"x": grid.tolist(), "median": q50.tolist(), "q25": q25.tolist(), "q75": q75.tolist()}


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    def ranks(x: np.ndarray) -> np.ndarray:
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        return r

    ra, rb = ranks(a), ranks(b)
    return float(np.corrcoef(ra, rb)[0, 1])


def rank_correlations(table: Table) -> dict[str, float]:
    """Spearman's rho between each epoch's val MSE and the final val MSE, over the full-budget configs."""
    full = [c for c in table.curves if len(c) >= table.epochs]
    final = np.array([c[-1] for c in full])
    return {str(e): spearman(np.array([c[e - 1] for c in full]), final) for e in range(1, table.epochs + 1)}


def superiority(a: list[float], b: list[float]) -> float:
    """P(a seed of A ends with a lower regret than a seed of B), ties counting half: the Mann-Whitney U statistic
    over len(a) * len(b) (the common-language effect size; 0.5 = no difference)."""
    wins = sum((x < y) + 0.5 * (x == y) for x in a for y in b)
    return wins / (len(a) * len(b))


def pairwise_superiority(methods: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """superiority() of every method's final hypervolume regrets over every other's: ``[a][b]`` = P(a beats b)."""
    per = {name: m["final_hv_regret_per_seed"] for name, m in methods.items()}
    return {a: {b: round(superiority(per[a], per[b]), 3) for b in per if b != a} for a in per}


def first_reach(curve: dict[str, list[float]], target: float) -> float:
    for x, m in zip(curve["x"], curve["median"], strict=True):
        if m <= target:
            return x
    return math.inf


def compare(
    table: Table,
    methods: list[Method],
    settings: Settings,
    seeds: int,
    processes: int = 2,
    points: list[dict] | None = None,
    cost: str = "",
) -> dict[str, Any]:
    jobs = [(m, table, settings, s, points, cost) for m in methods for s in range(seeds)]
    t0 = time.time()
    if processes > 1:
        with mp.get_context("spawn").Pool(processes) as pool:
            results = pool.map(_job, jobs, chunksize=1)
    else:
        results = [_job(j) for j in jobs]
    by_method: dict[str, list[Replay]] = {}
    for r in results:
        by_method.setdefault(r.method, []).append(r)
    max_compute = max(r.compute[-1] for r in results)
    max_wall = max(r.wall[-1] for r in results)
    max_epochs = max(r.trial_epochs[-1] for r in results)
    grids = {
        "compute": np.linspace(0, max_compute, 201),
        "wall": np.linspace(0, max_wall, 201),
        "trial_epochs": np.linspace(0, max_epochs, 201),
    }
    out: dict[str, Any] = {"methods": {}}
    for name, reps in by_method.items():
        finals = [table.regret(r.winner_val[-1]) for r in reps]
        out["methods"][name] = {
            "seeds": len(reps),
            "final_regret_median": float(np.median(finals)),
            "final_regret_q25": float(np.percentile(finals, 25)),
            "final_regret_q75": float(np.percentile(finals, 75)),
            "trials_median": float(np.median([r.trials for r in reps])),
            "total_compute_median": float(np.median([r.compute[-1] for r in reps])),
            "total_wall_median": float(np.median([r.wall[-1] for r in reps])),
            "total_trial_epochs_median": float(np.median([r.trial_epochs[-1] for r in reps])),
            "anytime": {axis: curve_on_grid(reps, table, axis, g) for axis, g in grids.items()},
        }
        if reps[0].hv_regret:  # two objectives
            hv = [r.hv_regret[-1] for r in reps]
            front = len(table.true_front(cost))
            out["methods"][name] |= {
                "final_hv_regret_median": float(np.median(hv)),
                "final_hv_regret_q25": float(np.percentile(hv, 25)),
                "final_hv_regret_q75": float(np.percentile(hv, 75)),
                "final_hv_regret_mean": float(np.mean(hv)),
                "final_hv_regret_per_seed": hv,
                "front_points_median": float(np.median([len(r.front) for r in reps])),
                "true_front_found_median": float(
                    np.median([len(set(r.front) & set(table.true_front(cost))) / front for r in reps])
                ),
                "hv_anytime": {axis: curve_on_grid(reps, table, axis, g, hv=True) for axis, g in grids.items()},
            }
            del out["methods"][name]["anytime"]  # the single-objective winner's curves: not what is compared here
    m = out["methods"]
    if any("final_hv_regret_per_seed" in v for v in m.values()):
        out["pairwise_superiority"] = pairwise_superiority(m)
    if "random" in m and "tpe+asha" in m:
        target = m["random"]["final_regret_median"]
        reach = first_reach(m["tpe+asha"]["anytime"]["compute"], target)
        out["compute_ratio_tpe_asha_vs_random"] = reach / m["random"]["total_compute_median"]
        out["compute_ratio_note"] = (
            f"simulated compute at which tpe+asha's median regret first reaches random search's final median "
            f"({target:.3f}), over random search's median total compute"
        )
    out["replay_seconds"] = round(time.time() - t0, 1)
    return out


def sweep(table: Table, method: Method, base: Settings, seeds: int, processes: int) -> list[dict[str, Any]]:
    """One setting at a time around ``base``: the final regret and compute of ``method`` for each value."""
    grid = {
        "grace_period": [1, 2, 4],
        "reduction_factor": [2, 3, 4],
        "n_startup_trials": [8, 16, 24, 48],
        "workers": [4, 8, 16, 32],
        "num_samples": [48, 96, 144],
    }
    rows, seen = [], set()
    for key, values in grid.items():
        for value in values:
            settings = dataclasses.replace(base, **{key: value})
            if settings in seen:
                continue  # the base itself is measured once, under the first key
            seen.add(settings)
            res = compare(table, [method], settings, seeds, processes)["methods"][method.name]
            rows.append(
                {
                    "vary": key,
                    "settings": dataclasses.asdict(settings),
                    "final_regret_median": res["final_regret_median"],
                    "final_regret_q25": res["final_regret_q25"],
                    "final_regret_q75": res["final_regret_q75"],
                    "total_compute_median": res["total_compute_median"],
                    "total_wall_median": res["total_wall_median"],
                }
            )
            r = rows[-1]
            print(
                f"  {key}={value}: regret {r['final_regret_median']:.3f} [{r['final_regret_q25']:.3f}, "
                f"{r['final_regret_q75']:.3f}] compute {r['total_compute_median']:.0f} s wall "
                f"{r['total_wall_median']:.0f} s",
                flush=True,
            )
    return rows


def plot(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # a script entry point: no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, axis, label in ((axes[0], "wall", "simulated wall time (s)"), (axes[1], "trial_epochs", "trial-epochs")):
        for name, m in result["methods"].items():
            c = m["anytime"][axis]
            x, med = np.array(c["x"]), np.array(c["median"])
            (line,) = ax.plot(x, np.where(np.isfinite(med), med, np.nan), label=name)
            lo, hi = np.array(c["q25"]), np.array(c["q75"])
            ok = np.isfinite(lo) & np.isfinite(hi)
            ax.fill_between(x[ok], lo[ok], hi[ok], alpha=0.15, color=line.get_color())
        ax.set_xlabel(label)
        ax.set_ylabel("normalised regret of the selected winner")
        ax.set_yscale("symlog", linthresh=0.05)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    s = result["settings"]
    fig.suptitle(
        f"{result['table']['configs']} configs; {s['num_samples']} trials, {s['workers']} workers, "
        f"ASHA grace {s['grace_period']} rf {s['reduction_factor']}; median and IQR over seeds"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--table", default=str(DEFAULT_TABLE))
    p.add_argument("--json", default=None, help="write the comparison here")
    p.add_argument("--plot", default=None, help="write the anytime curves here (PNG)")
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--methods", nargs="*", default=None, help=f"default: {' '.join(m.name for m in METHODS)}")
    p.add_argument("--num-samples", type=int, default=Settings.num_samples)
    p.add_argument("--workers", type=int, default=Settings.workers, help="simulated asynchronous workers")
    p.add_argument("--n-startup-trials", type=int, default=Settings.n_startup_trials)
    p.add_argument("--grace-period", type=int, default=Settings.grace_period, help="in table epochs")
    p.add_argument("--reduction-factor", type=int, default=Settings.reduction_factor)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--sweep", default=None, metavar="METHOD", help="also vary each setting around the given ones")
    p.add_argument("--sweep-seeds", type=int, default=10)
    p.add_argument("--objective", default=None, choices=["params", "macs", "cpu_ms"],
                   help="compare multi-objective methods on (val MSE, this cost) by hypervolume regret")  # fmt: skip
    p.add_argument("--costs", default=None, help=f"the configs' macs and cpu_ms (default: {DEFAULT_COSTS.name})")
    args = p.parse_args(argv)
    costs = args.costs or (DEFAULT_COSTS if args.table == str(DEFAULT_TABLE) and DEFAULT_COSTS.exists() else None)
    table = Table.load(args.table, costs)
    if args.objective:
        return main_multiobjective(args, table)
    methods = [m for m in METHODS if args.methods is None or m.name in args.methods]
    settings = Settings(args.num_samples, args.workers, args.n_startup_trials, args.grace_period, args.reduction_factor)
    raw = json.loads(Path(args.table).read_text())
    points = [c["params"] for c in raw["configs"] if c["id"] < 3]
    result = {
        "table": {"file": str(args.table), "configs": len(table.params), "epochs": table.epochs},
        "settings": dataclasses.asdict(settings),
    }
    result.update(compare(table, methods, settings, args.seeds, args.processes, points))
    result["rank_correlation_vs_final"] = rank_correlations(table)
    for name, m in result["methods"].items():
        print(
            f"{name:24s} final regret median {m['final_regret_median']:.3f} "
            f"[{m['final_regret_q25']:.3f}, {m['final_regret_q75']:.3f}]  compute {m['total_compute_median']:.0f} s  "
            f"wall {m['total_wall_median']:.0f} s  trials {m['trials_median']:.0f}"
        )
    if "compute_ratio_tpe_asha_vs_random" in result:
        print(f"compute ratio tpe+asha vs random: {result['compute_ratio_tpe_asha_vs_random']:.3f}")
    print(f"replay took {result['replay_seconds']} s")
    if args.sweep:
        method = next(m for m in METHODS if m.name == args.sweep)
        print(f"sweep of {method.name}, {args.sweep_seeds} seeds per setting:")
        result["sweep"] = {"method": method.name, "seeds": args.sweep_seeds}
        result["sweep"]["rows"] = sweep(table, method, settings, args.sweep_seeds, args.processes)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=float))
    if args.plot:
        plot(result, args.plot)
    return 0


def _has_scipy() -> bool:
    try:
        import scipy  # noqa: F401  (Optuna's GP sampler needs it; the job does not)
    except ImportError:
        return False
    return True


def main_multiobjective(args: argparse.Namespace, table: Table) -> int:
    """--objective COST: the multi-objective methods, by the hypervolume regret of the front of full-budget trials."""
    cost = args.objective
    methods = [m for m in MO_METHODS if (args.methods is None and (m.sampler != "gp" or _has_scipy()))
               or (args.methods is not None and m.name in args.methods)]  # fmt: skip
    if args.methods is None and not _has_scipy():
        print("the gp methods are left out: Optuna's GP sampler needs scipy (pip install scipy)")
    settings = Settings(args.num_samples, args.workers, args.n_startup_trials, args.grace_period, args.reduction_factor)
    front = table.true_front(cost)
    result = {
        "table": {"file": str(args.table), "configs": len(table.params), "epochs": table.epochs,
                  "costs_file": str(args.costs or (DEFAULT_COSTS if cost != "params" else "")),
                  "full_budget_configs": sum(math.isfinite(table.final(i)) for i in range(len(table.params)))},
        "objective": cost,
        "hypervolume": {
            "space": f"(log10 val MSE, log10 {cost}), both minimised",
            "reference_point": list(table.reference_point(cost)),
            "true_front": front,
            "true_front_hypervolume": table.hypervolume(front, cost),
            "regret": "1 - HV(front of the search's full-budget trials) / HV(front of all the table's full-budget "
                      "configs)",
        },
        "settings": dataclasses.asdict(settings),
    }  # fmt: skip
    result.update(compare(table, methods, settings, args.seeds, args.processes, None, cost))
    for name, m in result["methods"].items():
        print(
            f"{name:22s} HV regret median {m['final_hv_regret_median']:.4f} [{m['final_hv_regret_q25']:.4f}, "
            f"{m['final_hv_regret_q75']:.4f}] mean {m['final_hv_regret_mean']:.4f}  "
            f"front {m['front_points_median']:.0f} pts  compute {m['total_compute_median']:.0f} s  "
            f"wall {m['total_wall_median']:.0f} s"
        )
    print(f"replay took {result['replay_seconds']} s")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=float))
    if args.plot:
        plot_multiobjective(result, args.plot)
    return 0


def plot_multiobjective(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # a script entry point: no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(18, 5.2), gridspec_kw={"width_ratios": [1, 1, 0.8]})
    for ax, axis, label in (
        (axes[0], "wall", "simulated wall time (s)"),
        (axes[1], "compute", "simulated compute (s)"),
    ):
        for name, m in result["methods"].items():
            # Colour: the sampler; line: the stopping rule (none dashed, ASHA on val MSE dotted, non-dominated
            # solid); thin: stopped trials told COMPLETE, thick: told PRUNED.
            sampler = name.split("+")[0].removeprefix("mo-")
            rung = "moasha" if "+moasha" in name else "asha" if "+asha" in name else "none"
            style = {
                "color": {"random": "C0", "tpe": "C1", "nsga2": "C2", "gp": "C3"}.get(sampler, "C4"),
                "ls": {"none": "--", "asha": ":", "moasha": "-"}[rung],
                "lw": 2.2 if "pruned" in name else 1.2,
            }
            c = m["hv_anytime"][axis]
            x, med = np.array(c["x"]), np.array(c["median"])
            ax.plot(x, med, label=name, **style)
            if rung != "asha":
                ax.fill_between(x, c["q25"], c["q75"], alpha=0.06, color=style["color"])
        ax.set_xlabel(label)
        ax.set_ylabel("hypervolume regret of the full-budget front")
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7)
    names = list(result["methods"])
    axes[2].boxplot([result["methods"][n]["final_hv_regret_per_seed"] for n in names], orientation="horizontal")
    axes[2].set_yticks(range(1, len(names) + 1), names, fontsize=7)
    axes[2].set_xscale("log")
    axes[2].set_xlabel("final hypervolume regret (per seed)")
    s = result["settings"]
    fig.suptitle(
        f"val MSE x {result['objective']}: {result['table']['configs']} configs; {s['num_samples']} trials, "
        f"{s['workers']} workers, ASHA grace {s['grace_period']} rf {s['reduction_factor']}; median and IQR over "
        f"{next(iter(result['methods'].values()))['seeds']} seeds"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
