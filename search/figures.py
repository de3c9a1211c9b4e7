"""The report's pictures: the optimisation history, hyperparameter importances, test separations.

Each is rendered off-screen (matplotlib's Agg backend) and written atomically as PNG.

Importances are computed over the trials that ran their *full* budget only. A trial ASHA stopped
at an early rung has a worse validation MSE because it trained less, not because of its
parameters; mixed in, it would credit importance to whatever makes a trial a slow starter.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bss_model.io import atomic_write_bytes
from bss_model.viz import save_separation_png
from search.results import COMPLETED, STOPPED, Separations, TrialRow
from search.space import Dimension, optuna_distributions
from search.study import quiet_optuna

# File names in the experiment folder (report.md links them).
PICTURES = {
    "separations": "separations.png",
    "history": "optimization_history.png",
    "importances": "param_importances.png",
}


def _fig_bytes(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _figure(figsize: tuple[float, float]) -> Any:
    """A figure and its axes, without pyplot: no backend to choose (a process-wide setting) and no global
    figure list to close; savefig renders PNG with Agg."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots()


def plot_history(trials: list[TrialRow], path: Path) -> None:
    """Each trial's last validation MSE in trial order, and the best full-budget value so far."""
    order = sorted(trials, key=lambda t: (t.number, t.trial_id))  # the order they ran in
    fig, ax = _figure((6, 3.6))
    best, best_curve = math.inf, []
    for i, t in enumerate(order):
        if t.status == COMPLETED:
            best = min(best, t.val_mse)
        best_curve.append(best if math.isfinite(best) else np.nan)
        if math.isfinite(t.val_mse):
            style = {COMPLETED: "o", STOPPED: "x"}.get(t.status, "s")
            ax.plot(i, t.val_mse, style, color="C0" if t.status == COMPLETED else "C1")
    ax.plot(range(len(order)), best_curve, "-", color="C2", label="best (full budget)")
    ax.set_yscale("log")
    ax.set_xlabel("trial (in the order Tune started them)")
    ax.set_ylabel("validation MSE (last epoch)")
    ax.set_title("Optimisation history (o full budget, x stopped by ASHA)")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    atomic_write_bytes(path, _fig_bytes(fig))


@dataclass
class Importances:
    """Hyperparameter importances for validation MSE, and what they rest on."""

    values: dict[str, float] = field(default_factory=dict)  # most important first; empty if unavailable
    trials: int = 0  # the full-budget trials they were computed from
    note: str = ""  # why ``values`` is empty

    def to_dict(self) -> dict[str, Any]:
        return {"values": self.values, "trials": self.trials, "method": "PED-ANOVA", "note": self.note}


def optuna_study(trials: list[TrialRow], dims: dict[str, Dimension]) -> Any:
    """An in-memory Optuna study of the trials that ran their full budget (their last validation MSE)."""
    import optuna

    dists = optuna_distributions(dims)
    with quiet_optuna():
        study = optuna.create_study(direction="minimize")
    for t in trials:
        if t.status != COMPLETED or not math.isfinite(t.val_mse):
            continue
        params = {k: t.params[k] for k in dists if k in t.params}
        try:
            study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=t.val_mse))
        except ValueError:  # a value outside its distribution (e.g. a hand-given starting point)
            continue
    return study


def param_importances(trials: list[TrialRow], dims: dict[str, Dimension]) -> Importances:
    """PED-ANOVA importances (Optuna's default evaluator) over the full-budget trials."""
    import optuna

    study = optuna_study(trials, dims)
    n = len(study.trials)
    if not dims:
        return Importances(trials=n, note="the search had no space")
    if n < 2:
        return Importances(trials=n, note=f"{n} trial(s) ran the full budget; importances need 2 or more")
    try:
        # Named, not Optuna's default: a new default would silently change what the report means.
        evaluator = optuna.importance.PedAnovaImportanceEvaluator()
        values = optuna.importance.get_param_importances(study, evaluator=evaluator)
    except (RuntimeError, ValueError, ZeroDivisionError) as exc:
        return Importances(trials=n, note=f"importances unavailable: {exc}")
    return Importances({k: float(v) for k, v in values.items()}, trials=n)


def plot_importances(importances: Importances, path: Path) -> None:
    values = importances.values
    fig, ax = _figure((6, 0.5 + 0.45 * max(1, len(values))))
    if values:
        names = list(values)[::-1]
        ax.barh(names, [values[n] for n in names], color="C0")
        ax.set_xlabel("importance for validation MSE (PED-ANOVA)")
    else:
        ax.text(0.5, 0.5, importances.note, ha="center", va="center", wrap=True)
        ax.set_axis_off()
    ax.set_title(f"Hyperparameter importances ({importances.trials} full-budget trials)")
    fig.tight_layout()
    atomic_write_bytes(path, _fig_bytes(fig))


def plot_separations(sep: Separations, path: Path) -> None:
    title = f"best model on test mixtures (MSE {sep.mse:.2e})"
    save_separation_png(sep.x, sep.target, sep.pred, path, title=title)


def write_pictures(trials: list[TrialRow], importances: Importances, separations: Separations, out: Path) -> None:
    plot_separations(separations, out / PICTURES["separations"])
    plot_history(trials, out / PICTURES["history"])
    plot_importances(importances, out / PICTURES["importances"])
