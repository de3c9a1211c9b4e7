"""Typed results, from Tune's results to the report: trial rows, the search summary, seed results.

``SearchSummary.to_dict()`` is exactly ``search_summary.json`` (and ``TrialRow.to_dict()`` a row
of its ``trials`` table, copied into ``report.json``); ``from_dict`` reads them back, so a
resumed run or ``retrain.py --experiment`` continues from the file with the same types.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

# A trial's status. Only "completed" (ran its full budget with a finite validation MSE) can win. "stopped":
# ASHA stopped it at a rung; "cut": a budgeted search's deadline ended it (or left no time to start it).
COMPLETED, STOPPED, CUT, DIVERGED, ERRORED = "completed", "stopped", "cut", "diverged", "errored"


@dataclass
class TrialRow:
    trial_id: str
    number: int  # the order Tune created the trial in (its folder's <number>-<id>)
    params: dict[str, Any]  # the sampled dotted keys
    epochs: int  # epochs it ran (ASHA may stop it early)
    val_mse: float  # last reported validation MSE; NaN if none
    status: str  # completed | stopped (ASHA) | cut (the budget's deadline) | diverged | errored
    error: str  # the reason a trial diverged or errored, else ""
    node: str  # hostname[:node id] it last ran on
    path: str  # its Tune trial folder
    # Training samples it saw (epochs x steps x batch size, as the trial reported them); equal for
    # every trial at equal epochs (a compute-fair search). None in summaries written before this field.
    samples: int | None = None
    # Its speed in its last epoch: training samples/s, and the seconds the epoch spent after training
    # (validation, checkpoint). A budgeted job plans the winner's retrain from them (search/budgeted.py).
    samples_per_s: float | None = None
    epoch_tail_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrialRow:
        return cls(**data)


@dataclass
class FrontPoint:
    """One point of the Pareto front: a full-budget trial, its val MSE and cost, all its costs and its params."""

    trial_id: str
    number: int
    val_mse: float
    cost: float  # the search's cost objective (ParetoSummary.cost)
    costs: dict[str, Any]  # every cost the trial recorded (params, macs, cpu_ms ...) and what they hold for
    params: dict[str, Any]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FrontPoint:
        return cls(**data)


@dataclass
class ParetoSummary:
    """A two-objective search (search/objectives.py): every trial's costs and the front of full-budget trials."""

    objectives: list[str]  # [val_mse, <cost>]
    cost: str
    costs: dict[str, dict[str, Any]]  # trial id -> what the trial measured of its costs
    front: list[FrontPoint]  # by cost; full-budget trials only
    knee: str | None  # the front's knee (a trial id)
    hypervolume: list[dict[str, Any]]  # {wall_s, hypervolume, trial_id} at each full-budget trial's end
    hypervolume_reference: list[float] | None  # (log10 val MSE, log10 cost)
    reference_trials: list[str]  # trials with the reference network's topology
    cpu_models: list[str]  # the CPUs the trials' cpu_ms were measured on

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ParetoSummary:
        return cls(**{**data, "front": [FrontPoint.from_dict(p) for p in data["front"]]})


@dataclass
class SearchSummary:
    """The finished search: its winner and every trial (sorted: full budget first, then by val MSE)."""

    best_trial: str
    best_params: dict[str, Any]
    best_val_mse: float
    best_config: dict[str, Any]  # the base config with best_params applied (before retrain overrides)
    search_wall_s: float | None
    trials: list[TrialRow]
    # A two-objective search's costs and front (tune.objectives); None for [val_mse], whose files stay as they were.
    pareto: ParetoSummary | None = None

    def count(self, *statuses: str) -> int:
        return sum(t.status in statuses for t in self.trials)

    def to_dict(self) -> dict[str, Any]:
        # The counts are derived from the trials, and written out for readers of the file.
        return {
            "best_trial": self.best_trial,
            "best_params": self.best_params,
            "best_val_mse": self.best_val_mse,
            "best_config": self.best_config,
            "num_trials": len(self.trials),
            "num_completed": self.count(COMPLETED),
            "num_stopped_early": self.count(STOPPED),
            "num_errored": self.count(ERRORED, DIVERGED),
            "num_diverged": self.count(DIVERGED),
            "num_cut": self.count(CUT),
            "search_wall_s": self.search_wall_s,
            "trials": [t.to_dict() for t in self.trials],
        } | ({"pareto": self.pareto.to_dict()} if self.pareto is not None else {})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SearchSummary:
        return cls(
            best_trial=data["best_trial"],
            best_params=data["best_params"],
            best_val_mse=data["best_val_mse"],
            best_config=data["best_config"],
            search_wall_s=data["search_wall_s"],
            trials=[TrialRow.from_dict(t) for t in data["trials"]],
            pareto=ParetoSummary.from_dict(data["pareto"]) if data.get("pareto") else None,
        )


@dataclass
class SeedResult:
    """One retrain seed: its validation MSE and, once it ran its budget, the protocol's test result."""

    seed: int
    val_mse: float | None
    test_mse_mean: float | None  # None: the seed never reached its final evaluation
    metrics: dict[str, Any]  # the test_*, baseline_* and protocol_* keys of its last result
    checkpoint: str | None  # its last Tune checkpoint folder
    error: str
    path: str
    samples: int | None = None  # training samples it saw (its last report)
    finished: bool = True  # it ran its whole retrain (every epoch) without error: only then is it evaluated

    @property
    def evaluated(self) -> bool:
        return self.test_mse_mean is not None


@dataclass
class EnsembleResult:
    """The seed ensemble: the average of the seeds' predictions, scored by the protocol on the seeds' draws.

    Not the mean of the seeds' MSEs (that is ``test_mse_mean``): by convexity of the squared error
    the ensemble's MSE is never above it. ``test_mse_std`` is over the protocol's draws (one model),
    where the single-model std is over seeds.
    """

    seeds: list[int]
    test_mse: float
    test_mse_std: float
    per_draw: list[float]
    checkpoints: list[str]  # the seeds' final retrain checkpoints it averaged
    error: str = ""  # why it could not be evaluated (then test_mse is NaN)


@dataclass
class Evaluation:
    """The evaluation phase: the protocol's result for each finished seed (by seed; the keys
    bss_model.evaluate.evaluate_model returns) and for their ensemble, from one pass over the draws.
    ``evaluation.json`` in the experiment holds it, so a --resume never runs it twice."""

    seeds: dict[int, dict[str, Any]]
    ensemble: EnsembleResult | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "seeds": {str(k): v for k, v in self.seeds.items()},
            "ensemble": dataclasses.asdict(self.ensemble) if self.ensemble else None,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Evaluation:
        ens = data.get("ensemble")
        return cls(seeds={int(k): v for k, v in data["seeds"].items()}, ensemble=EnsembleResult(**ens) if ens else None)

    def apply(self, seeds: list[SeedResult]) -> list[SeedResult]:
        """The seeds with their test figures (``test_mse_mean`` and the protocol's keys) filled in."""
        out = []
        for s in seeds:
            m = self.seeds.get(s.seed)
            if m is None:
                out.append(s)
                continue
            metrics = {k: v for k, v in m.items() if not isinstance(v, list) and k not in ("draws", "pairs", "seed")}
            metrics.update({"protocol_draws": m["draws"], "protocol_pairs": m["pairs"], "protocol_seed": m["seed"]})
            out.append(dataclasses.replace(s, test_mse_mean=m["test_mse_mean"], metrics={**s.metrics, **metrics}))
        return out


@dataclass
class RetrainSummary:
    """Every seed (in seed order) and the best one, chosen by validation MSE (the test set chooses nothing)."""

    seeds: list[SeedResult]
    best: SeedResult
    ensemble: EnsembleResult | None = None  # None: not evaluated (fewer than one finished seed)

    @property
    def evaluated(self) -> list[SeedResult]:
        return [s for s in self.seeds if s.evaluated]


@dataclass
class Separations:
    """The best model on test mixtures: x [N,1,H,W], target and pred [N,2,H,W] (digit, fashion)."""

    x: np.ndarray
    target: np.ndarray
    pred: np.ndarray
    mse: float
