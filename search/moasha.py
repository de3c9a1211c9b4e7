"""A multi-objective ASHA: Ray's asynchronous successive halving, with a rung rule that ranks (val MSE, cost) by
non-dominated sorting instead of val MSE alone -- the idea of Syne Tune's MOASHA (Schmucker et al., 2021).

Rungs are Ray's ASHA rungs (``grace_period * reduction_factor**k`` < ``max_t``, one bracket). When a trial reaches
a rung, it is ranked among the trials recorded there before it, plus itself, by NSGA-II's order
(``search.pareto.nondominated_order``: by front, then by crowding distance; the newcomer first on a tie, as Ray's
ASHA lets a tie continue). It continues if it ranks within the top ``ceil(n / reduction_factor)`` of those ``n``,
else it stops; either way it is recorded. A cheap model whose val MSE is behind the MSE leaders at a rung can so
go on if nothing is both cheaper and better.

It is the two-objective job's early stopping (``search/tuners.py``, MO_RUNG_RULE): in the replay
(benchmarks/search_replay.py --objective ...) it halved the hypervolume regret of the full-budget front that ASHA
on val MSE alone left, at a little less compute, for every sampler. Like Ray's ASHA it lives in the Tuner's
pickle: a resumed search starts its rungs afresh.
"""

from __future__ import annotations

import math
from typing import Any

from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from search import pareto


class NonDominatedASHA(FIFOScheduler):
    def __init__(
        self,
        metric: str,
        cost: str,
        max_t: int,
        grace_period: int = 1,
        reduction_factor: float = 3,
        time_attr: str = "training_iteration",
    ) -> None:
        super().__init__()
        self._metric, self._cost, self._time_attr = metric, cost, time_attr
        self._max_t, self._rf = max_t, reduction_factor
        grace_period = min(grace_period, max_t)
        n_rungs = int(math.log(max_t / grace_period) / math.log(reduction_factor) + 1)
        # Largest milestone first, as Ray's bracket keeps them.
        self._rungs: list[tuple[float, dict[str, tuple[float, float]]]] = [
            (grace_period * reduction_factor**k, {}) for k in reversed(range(n_rungs))
        ]

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        # The metric and cost are its own (both minimised); Tune's own metric, if any, must not replace them.
        return not metric and not mode

    def _point(self, result: dict[str, Any]) -> tuple[float, float] | None:
        try:
            val, cost = float(result[self._metric]), float(result[self._cost])
        except (KeyError, TypeError, ValueError):
            return None
        return (val, cost) if math.isfinite(val) and math.isfinite(cost) else None

    def _on_result(self, trial_id: str, t: float, point: tuple[float, float]) -> str:
        for milestone, recorded in self._rungs:
            if t < milestone or trial_id in recorded:
                continue
            others = list(recorded.values())
            points = [point, *others]  # the newcomer at index 0 wins the order's index tie-break
            rank = pareto.nondominated_order(points).index(0)
            recorded[trial_id] = point
            keep = math.ceil(len(points) / self._rf)
            return TrialScheduler.CONTINUE if rank < keep else TrialScheduler.STOP
        return TrialScheduler.CONTINUE

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        point = self._point(result)
        if self._time_attr not in result or point is None:
            return TrialScheduler.CONTINUE
        if result[self._time_attr] >= self._max_t:
            return TrialScheduler.STOP
        return self._on_result(trial.trial_id, result[self._time_attr], point)

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> None:
        point = self._point(result or {})
        if point is not None and self._time_attr in result:
            self._on_result(trial.trial_id, result[self._time_attr], point)

    def debug_string(self) -> str:
        return "NonDominatedASHA: " + " | ".join(f"rung {m:g}: {len(r)} trials" for m, r in self._rungs)
