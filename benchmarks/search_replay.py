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

from search.selection import METRIC, MODE, pick_best, trial_row  # noqa: E402
from search.space import KINDS, Dimension, param_space, parse_space  # noqa: E402

DEFAULT_TABLE = ROOT / "benchmarks" / "results" / "learning-curves-cpu.json"


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
    _encoded: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._encoded = np.array([self.encode(p) for p in self.params])

    @classmethod
    def load(cls, path: str | Path) -> Table:
        data = json.loads(Path(path).read_text())
        return cls.from_dict(data, str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: str = "") -> Table:
        epochs = int(data["meta"]["base"]["train"]["epochs"])
        samples = int(data["meta"]["base"]["train"]["samples_per_epoch"])
        runs = {r["config"]: r for r in data["runs"] if r["seed"] == 0}
        configs = [c for c in data["configs"] if c["id"] in runs and c.get("samples_per_s")]
        # A run that diverged or failed reported fewer epochs than the budget: its curve is shorter.
        curves = [[v for v in runs[c["id"]]["val_mse"] if math.isfinite(v)] for c in configs]
        ref = next((i for i, c in enumerate(configs) if c.get("role") == "reference"), 0)
        return cls(
            space=parse_space(data["space"]),
            params=[c["params"] for c in configs],
            curves=curves,
            epoch_seconds=[samples / float(c["samples_per_s"]) for c in configs],
            epochs=epochs,
            reference=ref,
            path=path,
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


def make_searcher(method: Method, table: Table, settings: Settings, seed: int, points: list[dict[str, Any]]):
    from ray.tune.search.optuna import OptunaSearch

    from search.tuners import make_sampler
    from search.tuners import make_searcher as job_searcher

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


def make_scheduler(settings: Settings, epochs: int):
    from search.tuners import make_scheduler as job_scheduler

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


def replay(method: Method, table: Table, settings: Settings, seed: int, points: list[dict] | None = None) -> Replay:
    """Run one whole search in simulated time; deterministic for (method, table, settings, seed)."""
    from ray.tune.schedulers import TrialScheduler

    points = list(points or []) if method.points else []
    searcher = make_searcher(method, table, settings, seed, points)
    scheduler = make_scheduler(settings, table.epochs) if method.asha else None
    n_trials = int(round(settings.num_samples * method.budget_factor))
    events: list[tuple[float, int, str]] = []  # (time, sequence, trial id): a trial's epoch ends
    state: dict[str, dict[str, Any]] = {}
    rows = []
    seq = 0
    started = 0
    now = compute = 0.0
    epochs_run = 0
    out = Replay(method.name, seed, [0.0], [0.0], [0], [math.inf], 0, -1)

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
    return out


# -- the comparison -------------------------------------------------------------------------------


def _job(args: tuple) -> Replay:
    method, table, settings, seed, points = args
    logging.getLogger("optuna").setLevel(logging.WARNING)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    import warnings

    warnings.filterwarnings("ignore")
    return replay(method, table, settings, seed, points)


def curve_on_grid(replays: list[Replay], table: Table, axis: str, grid: np.ndarray) -> dict[str, list[float]]:
    """Median and quartiles over seeds of the normalised regret at each grid point (a step function)."""
    mat = np.full((len(replays), len(grid)), np.inf)
    for k, r in enumerate(replays):
        xs = np.asarray(getattr(r, axis), dtype=float)
        regrets = np.array([table.regret(v) for v in r.winner_val])
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
) -> dict[str, Any]:
    jobs = [(m, table, settings, s, points) for m in methods for s in range(seeds)]
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
    m = out["methods"]
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
    args = p.parse_args(argv)
    table = Table.load(args.table)
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


if __name__ == "__main__":
    raise SystemExit(main())
