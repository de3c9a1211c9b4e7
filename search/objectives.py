"""Accuracy against cost: the search's objectives, its Pareto front of full-budget trials, and the retrain's pick.

    tune:
      objectives: [val_mse, cpu_ms]   # default [val_mse]: today's single-objective job, unchanged
      latency_batch: 1                # the batch cpu_ms / gpu_ms time
    retrain:
      pick: best                      # or a limit, e.g. params<=50000 or cpu_ms<=2, or knee

Beside ``val_mse`` a search takes one cost (``search/costs.py``): ``params``, ``macs``, ``cpu_ms`` or ``gpu_ms``.
Every trial of a two-objective search measures, once at its start, ``params`` and ``macs`` (counted, cheap) and
the latency its objective names, and reports them with every result.

The front is built from the trials that ran their full budget (status ``completed``) only: a trial that ASHA
stopped (or that any other rule cut short) reports a validation MSE of fewer epochs, which would put a cheap,
undertrained model on the front. Such a trial is never on the front and never the pick.

The picks (``retrain.pick``, or ``bss-retrain --experiment <exp> --pick ...``):
- ``best``: the lowest validation MSE among full-budget trials (``search.selection.pick_best``, today's rule);
- ``<cost><=<limit>``: the lowest validation MSE among the full-budget trials within the limit (ties: the lower
  cost, then the earlier trial). That trial is on the front of (val MSE, that cost);
- ``knee``: the knee of the front (``search.pareto.knee``) with both objectives on a log10 scale, each scaled to
  [0, 1] over the front: the front point farthest beyond the chord between the front's two extremes, where a
  step along the front in either direction trades the most of one objective for the least of the other.

The hypervolume (``search.pareto.hypervolume``) is taken on (log10 val MSE, log10 cost), both minimised, against
a reference point a tenth of a decade beyond the worst full-budget value of each: in decades squared.
"""

from __future__ import annotations

import contextlib
import difflib
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from bss_model.errors import BssError, ConfigError
from search import pareto
from search.results import COMPLETED, FrontPoint, ParetoSummary, SearchSummary, TrialRow

VAL = "val_mse"
COSTS = ("params", "macs", "cpu_ms", "gpu_ms")  # what tune.objectives accepts beside val_mse (search/costs.py)
MEASURED = ("cpu_ms", "gpu_ms")  # timed, so noisy and machine-bound
COUNTED = ("params", "macs")  # counted; every trial of a two-objective search records them
OBJECTIVES = (VAL, *COSTS)
REFERENCE_MARGIN = 0.1  # decades beyond the worst full-budget value, for the hypervolume's reference point


# -- the config ----------------------------------------------------------------------------------


def check_objectives(objectives: Any, gpus_per_trial: float) -> None:
    """Refuse what a search cannot optimise, in one line: not a list, an unknown name, a duplicate, no val_mse,
    two costs, or gpu_ms without a GPU per trial."""
    where = "tune.objectives"
    if not isinstance(objectives, list) or not objectives or not all(isinstance(o, str) for o in objectives):
        raise ConfigError(f"{where}={objectives!r} must be a list of names, e.g. [val_mse] or [val_mse, params]")
    for name in objectives:
        if name not in OBJECTIVES:
            close = difflib.get_close_matches(name, OBJECTIVES, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"use val_mse and one of {', '.join(COSTS)}"
            raise ConfigError(f"{where} has unknown objective '{name}': {hint}")
    dup = next((o for i, o in enumerate(objectives) if o in objectives[:i]), None)
    if dup:
        raise ConfigError(f"{where}={objectives} names {dup} twice: list each objective once, e.g. [val_mse, {dup}]")
    if VAL not in objectives:
        raise ConfigError(
            f"{where}={objectives} lacks val_mse: the search optimises it, e.g. [val_mse, {objectives[0]}]"
        )
    if len(objectives) > 2:
        raise ConfigError(
            f"{where}={objectives} has {len(objectives) - 1} costs: give val_mse and one cost, e.g. "
            f"[val_mse, {[o for o in objectives if o != VAL][0]}]"
        )
    if "gpu_ms" in objectives and not gpus_per_trial > 0:
        raise ConfigError(
            f"{where} has gpu_ms but tune.gpus_per_trial={gpus_per_trial}: a trial needs a GPU to time; set "
            "tune.gpus_per_trial > 0 on a cluster with GPUs, or use cpu_ms"
        )


def cost_of(objectives: Sequence[str]) -> str | None:
    """The cost objective of a two-objective search; None for [val_mse]."""
    return next((o for o in objectives if o != VAL), None)


def recorded(objectives: Sequence[str]) -> tuple[str, ...]:
    """The costs every trial of the search records: params and macs, and the latency the objective names."""
    cost = cost_of(objectives)
    if cost is None:
        return ()
    return COUNTED + ((cost,) if cost in MEASURED else ())


def check_gpus_available(objectives: Sequence[str], gpus: float, where: str) -> None:
    """gpu_ms needs GPUs where the trials run: ``gpus`` is what the cluster (or this machine) has."""
    if "gpu_ms" in objectives and not gpus > 0:
        raise ConfigError(
            f"tune.objectives has gpu_ms but {where} has no GPU: run the search on a cluster with GPUs, or use "
            "cpu_ms (or params / macs)"
        )


# -- picks -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pick:
    """A rule for the point to retrain: ``best``, ``knee``, or the best val MSE within ``cost <= limit``."""

    kind: str  # best | knee | limit
    cost: str = ""
    limit: float = math.nan

    @property
    def text(self) -> str:
        return f"{self.cost}<={_number(self.limit)}" if self.kind == "limit" else self.kind

    @property
    def slug(self) -> str:
        """Its folder name under ``<experiment>/picks/``: ``knee``, ``params-le-50000``."""
        return f"{self.cost}-le-{_number(self.limit)}" if self.kind == "limit" else self.kind


def _number(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


_LIMIT = re.compile(r"^\s*([a-z_]+)\s*<=\s*(\S+)\s*$")


def parse_pick(text: Any, where: str = "retrain.pick") -> Pick:
    """``best``, ``knee`` or ``<cost><=<number>``; anything else is one line with the accepted forms."""
    forms = "best, knee, or a limit such as params<=50000 or cpu_ms<=2"
    if not isinstance(text, str):
        raise ConfigError(f"{where}={text!r} must be text: {forms}")
    if text.strip() in ("best", "knee"):
        return Pick(text.strip())
    m = _LIMIT.match(text)
    if not m:
        raise ConfigError(f"{where}={text!r} is not a pick: use {forms}")
    cost, number = m.groups()
    if cost not in COSTS:
        close = difflib.get_close_matches(cost, COSTS, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"limit one of {', '.join(COSTS)}"
        raise ConfigError(f"{where}={text!r} limits '{cost}', which is not a cost: {hint}")
    try:
        limit = float(number.replace("_", ""))
    except ValueError:
        raise ConfigError(f"{where}={text!r}: '{number}' is not a number") from None
    if not (math.isfinite(limit) and limit > 0):
        raise ConfigError(f"{where}={text!r}: the limit must be a finite number > 0")
    return Pick("limit", cost, limit)


def check_pick(pick: Pick, objectives: Sequence[str], where: str = "retrain.pick") -> None:
    """A pick the search can answer: ``best`` always; a limit or the knee only where trials record costs."""
    if pick.kind == "best":
        return
    have = recorded(objectives)
    if not have:
        raise ConfigError(
            f"{where}={pick.text} needs a search with a cost: tune.objectives is {list(objectives)}; add a cost "
            "(e.g. tune.objectives=[val_mse,params]) or pick best"
        )
    if pick.kind == "limit" and pick.cost not in have:
        raise ConfigError(
            f"{where}={pick.text} limits {pick.cost}, which the search does not measure (it records "
            f"{', '.join(have)}): limit one of those, or search with tune.objectives=[val_mse,{pick.cost}]"
        )


@dataclass
class Picked:
    """The chosen trial and why: what the report says."""

    pick: str  # the rule, e.g. params<=50000
    row: TrialRow
    costs: dict[str, Any]
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"rule": self.pick, "trial_id": self.row.trial_id, "number": self.row.number,
                "val_mse": self.row.val_mse, "params": self.row.params, "costs": self.costs,
                "reason": self.reason}  # fmt: skip


def _full(summary: SearchSummary, cost: str) -> list[tuple[TrialRow, float]]:
    """(row, cost) of every full-budget trial with a finite val MSE and a finite recorded ``cost``."""
    costs = summary.pareto.costs if summary.pareto else {}
    out = []
    for r in summary.trials:
        c = _float(costs.get(r.trial_id, {}).get(cost))
        if r.status == COMPLETED and math.isfinite(r.val_mse) and c is not None:
            out.append((r, c))
    return out


def _float(v: Any) -> float | None:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _fmt(v: float) -> str:
    return f"{int(v):,}" if float(v).is_integer() else f"{v:.3g}"


def choose(summary: SearchSummary, pick: Pick) -> Picked:
    """The trial ``pick`` selects from a finished search, with the reason; one line if none qualifies."""
    from search.selection import pick_best

    costs = summary.pareto.costs if summary.pareto else {}
    full = [r for r in summary.trials if r.status == COMPLETED]
    if pick.kind == "best":
        row = pick_best(summary.trials)
        reason = f"lowest validation MSE among the {len(full)} full-budget trials"
        return Picked("best", row, costs.get(row.trial_id, {}), reason)
    if summary.pareto is None:
        raise ConfigError(f"--pick {pick.text} needs a search with a cost beside val_mse; this one had none: pick best")
    cost = pick.cost if pick.kind == "limit" else summary.pareto.cost
    rows = _full(summary, cost)
    if not rows:
        raise BssError(f"no full-budget trial recorded {cost}, so --pick {pick.text} has nothing to choose from")
    if pick.kind == "knee":
        points = [(math.log10(r.val_mse), math.log10(c)) for r, c in rows]
        row, c = rows[pareto.knee(points)]
        n = len(pareto.pareto_front(points))
        reason = (f"the knee of the {n}-point front of (val MSE, {cost}): the front point farthest beyond the chord "
                  "between its extremes, on log10 scales each scaled to [0, 1] over the front")  # fmt: skip
        return Picked("knee", row, costs.get(row.trial_id, {}), reason)
    within = [(r, c) for r, c in rows if c <= pick.limit]
    if not within:
        r0, c0 = min(rows, key=lambda rc: (rc[1], rc[0].val_mse, rc[0].number))
        raise BssError(
            f"no point of the front has {pick.text}: the smallest {cost} on the front is {_fmt(c0)} (trial "
            f"{r0.trial_id}, val MSE {r0.val_mse:.3e}); raise the limit to at least that"
        )
    row, c = min(within, key=lambda rc: (rc[0].val_mse, rc[1], rc[0].number))
    reason = (f"lowest validation MSE among the {len(within)} of {len(rows)} full-budget trials with {pick.text} "
              f"({cost} {_fmt(c)})")  # fmt: skip
    return Picked(pick.text, row, costs.get(row.trial_id, {}), reason)


# -- the front of a finished search -----------------------------------------------------------------


def trial_costs(metrics: dict[str, Any] | None, objectives: Sequence[str]) -> dict[str, Any]:
    """What a trial reported of its costs (search/costs.py's keys), from its last result."""
    m = metrics or {}
    keys = (*recorded(objectives), "latency_batch", "cpu_model", "cpu_precision", "gpu_model", "gpu_precision")
    return {k: m[k] for k in keys if k in m and m[k] is not None}


def reference_shaped(model: dict[str, Any]) -> bool:
    """Whether a trial's model has the reference network's topology (the ``seed`` variant's fields but its width)."""
    from bss_model.variants import VARIANTS

    return all(model.get(k) == v for k, v in VARIANTS["seed"].items() if k != "filters")


def front_points(rows: Iterable[TrialRow], costs: dict[str, dict[str, Any]], cost: str) -> list[FrontPoint]:
    """The Pareto front of (val MSE, ``cost``) over the full-budget trials, by cost (ties: val MSE, trial)."""
    full = [(r, c) for r in rows if r.status == COMPLETED and math.isfinite(r.val_mse)
            for c in [_float(costs.get(r.trial_id, {}).get(cost))] if c is not None]  # fmt: skip
    front = pareto.pareto_front([(c, r.val_mse) for r, c in full])
    points = [FrontPoint(r.trial_id, r.number, r.val_mse, c, dict(costs[r.trial_id]), dict(r.params))
              for r, c in (full[i] for i in front)]  # fmt: skip
    return sorted(points, key=lambda p: (p.cost, p.val_mse, p.number))


def reference_point(rows: Iterable[TrialRow], costs: dict[str, dict[str, Any]], cost: str) -> list[float] | None:
    """(log10 val MSE, log10 cost) a tenth of a decade beyond the worst full-budget value of each."""
    full = [(r.val_mse, c) for r in rows if r.status == COMPLETED and math.isfinite(r.val_mse) and r.val_mse > 0
            for c in [_float(costs.get(r.trial_id, {}).get(cost))] if c is not None and c > 0]  # fmt: skip
    if not full:
        return None
    return [
        max(math.log10(v) for v, _ in full) + REFERENCE_MARGIN,
        max(math.log10(c) for _, c in full) + REFERENCE_MARGIN,
    ]


def log_point(val: float, cost: float) -> tuple[float, float]:
    return (math.log10(val), math.log10(cost)) if val > 0 and cost > 0 else (math.nan, math.nan)


def hypervolume_history(
    rows: Sequence[TrialRow], costs: dict[str, dict[str, Any]], cost: str, ends: dict[str, float], start: float
) -> tuple[list[dict[str, Any]], list[float] | None]:
    """The hypervolume of the front of the full-budget trials finished so far, at each such trial's end
    (``ends``: trial id -> its end as a Unix time; ``start``: the search's start), and the reference point."""
    ref = reference_point(rows, costs, cost)
    if ref is None:
        return [], None
    done: list[tuple[float, float]] = []
    history = []
    full = [r for r in rows if r.status == COMPLETED and math.isfinite(r.val_mse) and r.trial_id in ends
            and _float(costs.get(r.trial_id, {}).get(cost)) is not None]  # fmt: skip
    for r in sorted(full, key=lambda r: (ends[r.trial_id], r.number)):
        done.append(log_point(r.val_mse, float(costs[r.trial_id][cost])))
        hv = pareto.hypervolume(done, (ref[0], ref[1]))
        history.append({"wall_s": round(ends[r.trial_id] - start, 3), "hypervolume": hv, "trial_id": r.trial_id})
    return history, ref


def build_pareto(
    objectives: Sequence[str],
    rows: Sequence[TrialRow],
    costs: dict[str, dict[str, Any]],
    ends: dict[str, float],
    start: float,
    models: dict[str, dict[str, Any]],
) -> ParetoSummary:
    """The two-objective search's summary: every trial's costs, the front, the knee, the hypervolume over time.
    ``models``: each trial's resolved model config (to mark the reference-shaped network)."""
    cost = cost_of(objectives)
    assert cost is not None
    front = front_points(rows, costs, cost)
    history, ref = hypervolume_history(rows, costs, cost, ends, start)
    knee_id = None
    if front:
        i = pareto.knee([log_point(p.val_mse, p.cost) for p in front])
        knee_id = front[i].trial_id if i is not None else None
    machines = sorted({c["cpu_model"] for c in costs.values() if c.get("cpu_model")})
    return ParetoSummary(
        objectives=list(objectives),
        cost=cost,
        costs=costs,
        front=front,
        knee=knee_id,
        hypervolume=history,
        hypervolume_reference=ref,
        reference_trials=sorted(t for t, m in models.items() if reference_shaped(m)),
        cpu_models=machines,
    )


def summarize_pareto(
    objectives: Sequence[str], base: dict[str, Any], rows: Sequence[TrialRow], results: Sequence[Any]
) -> ParetoSummary:
    """:func:`build_pareto` from the search's Tune results (``.metrics``), in the order of ``rows``; ``base``:
    the search's base config (dict), to resolve each trial's model."""
    from bss_model.config import with_overrides

    costs, ends, starts, models = {}, {}, [], {}
    for row, r in zip(rows, results, strict=True):
        m = r.metrics or {}
        costs[row.trial_id] = trial_costs(m, objectives)
        stamp, total = _float(m.get("timestamp")), _float(m.get("time_total_s"))
        if stamp is not None:
            ends[row.trial_id] = stamp
            starts.append(stamp - (total or 0.0))
        with contextlib.suppress(BssError):  # a config the trial could not have run with: nothing to mark
            models[row.trial_id] = dict(with_overrides(base, row.params).model.__dict__)
    return build_pareto(objectives, rows, costs, ends, min(starts, default=0.0), models)
