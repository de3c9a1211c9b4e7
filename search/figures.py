"""The report's pictures: the optimisation history, hyperparameter importances, test separations.

Each is rendered off-screen (matplotlib's Agg backend) and written atomically as PNG.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np

from bss_model.io import atomic_write_bytes
from bss_model.viz import save_separation_png
from search.results import COMPLETED, STOPPED, Separations, TrialRow
from search.space import Dimension, optuna_distributions

# File names in the experiment folder (report.md links them).
PICTURES = {
    "separations": "separations.png",
    "history": "optimization_history.png",
    "importances": "param_importances.png",
}


def _fig_bytes(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_history(trials: list[TrialRow], path: Path) -> None:
    """Each trial's last validation MSE in trial order, and the best full-budget value so far."""
    plt = _plt()
    order = sorted(trials, key=lambda t: (t.number, t.trial_id))  # the order they ran in
    fig, ax = plt.subplots(figsize=(6, 3.6))
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


def optuna_study(trials: list[TrialRow], dims: dict[str, Dimension]) -> Any:
    """An in-memory Optuna study of the finished trials (their last validation MSE)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    dists = optuna_distributions(dims)
    study = optuna.create_study(direction="minimize")
    for t in trials:
        if not math.isfinite(t.val_mse):
            continue
        params = {k: t.params[k] for k in dists if k in t.params}
        try:
            study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=t.val_mse))
        except ValueError:  # a value outside its distribution (e.g. a hand-given starting point)
            continue
    return study


def plot_importances(trials: list[TrialRow], dims: dict[str, Dimension], path: Path) -> dict[str, float]:
    """Hyperparameter importances from the Optuna study (PED-ANOVA, Optuna's default)."""
    import optuna

    plt = _plt()
    study = optuna_study(trials, dims)
    importances: dict[str, float] = {}
    note = ""
    try:
        importances = dict(optuna.importance.get_param_importances(study))
    except (RuntimeError, ValueError, ZeroDivisionError) as exc:
        note = f"importances unavailable: {exc}"
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.45 * max(1, len(dims))))
    if importances:
        names = list(importances)[::-1]
        ax.barh(names, [importances[n] for n in names], color="C0")
        ax.set_xlabel("importance (validation MSE)")
    else:
        ax.text(0.5, 0.5, note or "not enough finished trials", ha="center", va="center", wrap=True)
        ax.set_axis_off()
    ax.set_title(f"Hyperparameter importances ({len(study.trials)} trials)")
    fig.tight_layout()
    atomic_write_bytes(path, _fig_bytes(fig))
    return importances


def plot_separations(sep: Separations, path: Path) -> None:
    title = f"best model on test mixtures (MSE {sep.mse:.2e})"
    save_separation_png(sep.x, sep.target, sep.pred, path, title=title)


def write_pictures(trials: list[TrialRow], dims: dict[str, Dimension], separations: Separations, out: Path) -> None:
    plot_separations(separations, out / PICTURES["separations"])
    plot_history(trials, out / PICTURES["history"])
    plot_importances(trials, dims, out / PICTURES["importances"])
