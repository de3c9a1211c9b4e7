"""The report's part for a two-objective search: the Pareto table, the front's picture, the hypervolume over time.

It renders the typed ``ParetoSummary`` (search/objectives.py builds it) and the pick the retrain trained; the
single-objective report has none of it, so its files stay as they were.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from bss_model.io import atomic_write_bytes
from search.figures import _fig_bytes, _figure
from search.results import COMPLETED, ParetoSummary, TrialRow

PICTURES = {"pareto": "pareto_front.png", "hypervolume": "hypervolume.png"}


def cost_label(cost: str, pareto: dict[str, Any] | ParetoSummary) -> str:
    """What the cost axis measures, with what a latency holds for."""
    costs = pareto.costs if isinstance(pareto, ParetoSummary) else pareto["costs"]
    batch = next((c.get("latency_batch") for c in costs.values() if c.get("latency_batch")), None)
    where = {"cpu_ms": "one CPU thread", "gpu_ms": "one GPU"}.get(cost, "")
    return {
        "params": "parameters",
        "macs": "forward multiply-accumulates per sample",
        "cpu_ms": f"latency (ms) of one forward pass of a batch of {batch} on {where}",
        "gpu_ms": f"latency (ms) of one forward pass of a batch of {batch} on {where}",
    }[cost]


def _fmt_cost(key: str, v: Any) -> str:
    if not isinstance(v, (int, float)) or not math.isfinite(v):
        return ""
    return f"{v:.3g}" if key.endswith("_ms") else f"{int(v):,}"


def plot_front(pareto: ParetoSummary, trials: list[TrialRow], pick: dict[str, Any] | None, path: Path) -> None:
    """Val MSE against cost: every trial with both (stopped ones grey), the front drawn, knee, pick and the
    reference-shaped network marked."""
    cost = pareto.cost
    fig, ax = _figure((7, 4.6))
    shown = {COMPLETED: ("o", "C0", "full budget"), "stopped": ("x", "0.6", "stopped early (never on the front)")}
    labelled: set[str] = set()
    for t in trials:
        c = pareto.costs.get(t.trial_id, {}).get(cost)
        if c is None or not math.isfinite(t.val_mse):
            continue
        marker, color, label = shown.get(t.status, ("s", "0.8", t.status))
        ax.plot(c, t.val_mse, marker, color=color, label=None if label in labelled else label, zorder=2)
        labelled.add(label)
    if pareto.front:
        xs, ys = [p.cost for p in pareto.front], [p.val_mse for p in pareto.front]
        ax.step(xs, ys, where="post", color="C3", lw=1.5, zorder=1, label=f"Pareto front ({len(xs)} points)")
        ax.plot(xs, ys, "o", mfc="none", mec="C3", ms=9, zorder=3)
    by_id = {t.trial_id: t for t in trials}

    def mark(trial_id: str | None, style: dict[str, Any], label: str) -> None:
        t = by_id.get(trial_id or "")
        c = pareto.costs.get(trial_id or "", {}).get(cost)
        if t is not None and c is not None and math.isfinite(t.val_mse):
            ax.plot(c, t.val_mse, linestyle="none", label=label, zorder=4, **style)

    for i, tid in enumerate(pareto.reference_trials):
        mark(tid, {"marker": "D", "mfc": "none", "mec": "k", "ms": 11}, "reference-shaped network" if i == 0 else None)
    mark(pareto.knee, {"marker": "*", "color": "C2", "ms": 14}, "knee")
    if pick:
        mark(pick["trial_id"], {"marker": "o", "mfc": "none", "mec": "C1", "ms": 16, "mew": 2},
             f"retrained ({pick['rule']})")  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(cost_label(cost, pareto))
    ax.set_ylabel("validation MSE (last epoch)")
    ax.set_title(f"Validation MSE against {cost}: {len(trials)} trials")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    atomic_write_bytes(path, _fig_bytes(fig))


def plot_hypervolume(pareto: ParetoSummary, path: Path) -> None:
    fig, ax = _figure((6, 3.6))
    h = pareto.hypervolume
    if h:
        xs, ys = [0.0] + [p["wall_s"] / 60 for p in h], [0.0] + [p["hypervolume"] for p in h]
        ax.step(xs, ys, where="post", color="C0")
        ax.plot(xs[1:], ys[1:], ".", color="C0")
        ax.set_xlabel("wall time since the search started (min)")
        ax.set_ylabel("hypervolume (decades²)")
    else:
        ax.text(0.5, 0.5, "no full-budget trial with a cost", ha="center", va="center")
        ax.set_axis_off()
    ax.set_title(f"Hypervolume of the front of full-budget trials (log10 val MSE x log10 {pareto.cost})", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write_bytes(path, _fig_bytes(fig))


def write_pictures(pareto: ParetoSummary, trials: list[TrialRow], pick: dict[str, Any] | None, out: Path) -> None:
    plot_front(pareto, trials, pick, out / PICTURES["pareto"])
    plot_hypervolume(pareto, out / PICTURES["hypervolume"])


def markdown(r: dict[str, Any]) -> list[str]:
    """report.md's section on accuracy against cost; nothing for a single-objective search."""
    p = r.get("pareto")
    if not p:
        return []
    cost = p["cost"]
    costs = p["costs"]
    machines = ", ".join(p["cpu_models"]) or "unrecorded"
    key = "gpu_precision" if cost == "gpu_ms" else "cpu_precision"
    precision = "/".join(sorted({c[key] for c in costs.values() if c.get(key)})) or "unrecorded"
    measured = {
        "params": "the parameter count",
        "macs": "forward multiply-accumulates per 32x32 sample, counted by torch's FlopCounterMode",
        "cpu_ms": f"the median {cost_label(cost, p)} ({precision} here: what train.precision=auto picks for "
        "inference on that CPU), timed by torch.utils.benchmark on the thread's CPU-time clock once at each "
        f"trial's start; CPU: {machines}. It holds for that kind of CPU only",
        "gpu_ms": f"the median {cost_label(cost, p)}, timed by torch.utils.benchmark once at each trial's start "
        f"({precision}); GPU: {', '.join(sorted({c['gpu_model'] for c in costs.values() if c.get('gpu_model')}))}",
    }[cost]
    full = sum(t["status"] == COMPLETED for t in r["trials"])
    lines = [
        f"## Accuracy against {cost}",
        "",
        f"Objectives: {', '.join(p['objectives'])} (both minimised); {cost} is {measured}. The front is built from "
        f"the {full} trials that ran their full budget: a trial stopped early is never on it.",
        "",
    ]
    keys = [k for k in ("params", "macs", "cpu_ms", "gpu_ms") if k == cost or k in ("params", "macs")]
    lines += ["| # | trial | " + " | ".join(keys) + " | val MSE | |", "|---|---|" + "---|" * len(keys) + "---|---|"]
    pick = r.get("pick") or {}
    for i, pt in enumerate(p["front"], 1):
        marks = [m for m, on in (("knee", pt["trial_id"] == p["knee"]),
                                 ("retrained", pt["trial_id"] == pick.get("trial_id"))) if on]  # fmt: skip
        vals = " | ".join(_fmt_cost(k, pt["costs"].get(k)) for k in keys)
        lines.append(f"| {i} | {pt['trial_id']} | {vals} | {pt['val_mse']:.3e} | {', '.join(marks)} |")
    lines.append("")
    if pick:
        c = pick["costs"]
        what = ", ".join(f"{k} {_fmt_cost(k, c.get(k))}" for k in keys if k in c)
        lines += [f"Retrained: trial {pick['trial_id']} (retrain.pick: `{pick['rule']}`), {pick['reason']}; "
                  f"its {what}, val MSE {pick['val_mse']:.3e}.", ""]  # fmt: skip
    refs = p["reference_trials"]
    if refs:
        lines += [f"Reference-shaped network (the reference's topology) tried: trial(s) {', '.join(refs)}.", ""]
    if p["hypervolume"]:
        last = p["hypervolume"][-1]
        ref = p["hypervolume_reference"]
        lines += [
            f"Hypervolume of the front (log10 val MSE x log10 {cost}, reference point ({ref[0]:.2f}, {ref[1]:.2f})): "
            f"{last['hypervolume']:.3f} decades² after {last['wall_s'] / 60:.1f} min.",
            "",
        ]
    unmeasured = [t for t in costs if cost not in costs[t]]
    if unmeasured:
        lines += [f"Trials without a recorded {cost}: {', '.join(sorted(unmeasured))}.", ""]
    lines += [f"![val MSE against {cost}]({PICTURES['pareto']})", "", f"![hypervolume]({PICTURES['hypervolume']})", ""]
    return lines
