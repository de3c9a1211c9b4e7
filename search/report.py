"""The user's results, rendered: report.json, report.md and the pictures.

The report only renders the typed results it is given (the search summary, the retrain's
seeds, the best model's test separations); it opens no checkpoint and runs no model.
Every file is written to a temporary name and renamed into place, so an interrupted
report never leaves a truncated file behind.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np

from bss_model.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from bss_model.viz import save_separation_png
from search.results import COMPLETED, STOPPED, RetrainSummary, SearchSummary, Separations, TrialRow
from search.space import Dimension, optuna_distributions

REFERENCE_TEST_MSE = 3.677e-4  # the Keras reference notebook, 10 draws x 20,000 test pairs

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


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3e}" if (v != 0 and (abs(v) < 1e-2 or abs(v) >= 1e4)) else f"{v:g}"
    return str(v)


def build_report(
    search: SearchSummary | None, retrain: RetrainSummary, best_config: dict[str, Any], wall_s: float
) -> dict[str, Any]:
    """report.json's content. ``search`` is None for a named config retrained directly (no trials)."""
    if search is None:  # then the best seed's validation MSE is the best there is
        search = SearchSummary("", {}, retrain.best.val_mse, best_config, search_wall_s=None, trials=[])
    s = search.to_dict()
    evaluated = retrain.evaluated
    per_seed = [float(r.test_mse_mean) for r in evaluated]
    baselines = [r.metrics.get("baseline_mix_mse_mean") for r in retrain.seeds]
    baselines = [b for b in baselines if b is not None]
    m0 = retrain.seeds[0].metrics
    ens = retrain.ensemble
    ens_ok = ens is not None and not ens.error
    return {
        "best_config": best_config,
        "best_params": s["best_params"],
        "best_val_mse": s["best_val_mse"],
        "num_trials": s["num_trials"],
        "num_completed": s["num_completed"],
        "num_stopped_early": s["num_stopped_early"],
        "num_errored": s["num_errored"],
        "num_diverged": s["num_diverged"],
        "seeds": [r.seed for r in evaluated],
        "test_mse_per_seed": per_seed,
        "test_mse_mean": float(np.mean(per_seed)),
        "test_mse_std": float(np.std(per_seed)),  # ddof=0, like the protocol's std over draws
        # The seed ensemble: the MSE of the seeds' *averaged predictions* (one model), with its std over
        # the protocol's draws -- not over seeds, and never to be read as the single-model mean above.
        "test_mse_ensemble": ens.test_mse if ens_ok else None,
        "test_mse_ensemble_std": ens.test_mse_std if ens_ok else None,
        "test_mse_ensemble_per_draw": ens.per_draw if ens_ok else [],
        "ensemble_seeds": ens.seeds if ens else [],
        "ensemble_checkpoints": ens.checkpoints if ens else [],
        "ensemble_error": ens.error if ens else "no seed finished its retrain",
        "val_mse_per_seed": [r.val_mse for r in evaluated],
        # Training samples each evaluated seed saw (epochs x steps x batch size), in the order of "seeds".
        "samples_per_seed": [r.samples for r in evaluated],
        "best_seed": retrain.best.seed,
        "best_seed_test": retrain.best.metrics,
        "baseline_mix_mse": float(np.mean(baselines)) if baselines else None,
        "reference_test_mse": REFERENCE_TEST_MSE,
        "protocol": {k: m0.get(f"protocol_{k}") for k in ("draws", "pairs", "seed")},
        "retrain_errors": [r.error for r in retrain.seeds if r.error],
        "trials": s["trials"],
        "search_wall_s": s["search_wall_s"],
        "wall_s": wall_s,
    }


def write_report(
    out: Path,
    search: SearchSummary | None,
    retrain: RetrainSummary,
    best_config: dict[str, Any],
    dims: dict[str, Dimension],
    separations: Separations,
    wall_s: float,
) -> dict[str, Any]:
    """Every picture, then report.json and report.md (which link the pictures); returns the report."""
    trials = search.trials if search is not None else []
    plot_separations(separations, out / PICTURES["separations"])
    plot_history(trials, out / PICTURES["history"])
    plot_importances(trials, dims, out / PICTURES["importances"])
    report = build_report(search, retrain, best_config, wall_s)
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", render_markdown(report))
    return report


def _samples(n: int | None) -> str:
    return "" if n is None else f"{n:,}"


def _labels(r: dict[str, Any]) -> tuple[str, str]:
    """The two test figures' names, worded so the single-model mean and the ensemble cannot be confused."""
    single = f"single model (mean ± std over {len(r['test_mse_per_seed'])} seeds)"
    ensemble = f"ensemble of {len(r['ensemble_seeds'])} seeds (averaged predictions; ± std over the protocol's draws)"
    return single, ensemble


def _ensemble_value(r: dict[str, Any]) -> str:
    if r["test_mse_ensemble"] is None:
        return f"not evaluated ({r['ensemble_error']})"
    return f"{r['test_mse_ensemble']:.3e} ± {r['test_mse_ensemble_std']:.1e}"


def render_markdown(r: dict[str, Any]) -> str:
    single, ensemble = _labels(r)
    lines = [
        "# bss-search report",
        "",
        f"**Test MSE {r['test_mse_mean']:.3e} ± {r['test_mse_std']:.1e}: {single}** "
        f"(reference U-Net {r['reference_test_mse']:.3e}; mix baseline {_fmt(r['baseline_mix_mse'])}).",
        "",
        f"Test MSE of the {ensemble}: {_ensemble_value(r)}.",
        "",
        "## Search",
        "",
        f"{r['num_trials']} trials: {r['num_completed']} ran their full budget, {r['num_stopped_early']} stopped "
        f"early by ASHA, {r['num_errored']} errored ({r['num_diverged']} diverged). Best validation MSE "
        f"{_fmt(r['best_val_mse'])}.",
        "",
    ]
    per_epoch = {t["samples"] // t["epochs"] for t in r["trials"] if t.get("samples") and t["epochs"]}
    if len(per_epoch) == 1:
        lines += [
            f"Budgets are samples: every trial saw {per_epoch.pop():,} training samples per epoch whatever its "
            "batch size, so ASHA compared trials at equal samples.",
            "",
        ]
    if r["trials"]:
        keys = sorted({k for t in r["trials"] for k in t["params"]})
        lines += ["| # | trial | status | epochs | samples | val MSE | " + " | ".join(keys) + " |",
                  "|---|---|---|---|---|---|" + "---|" * len(keys)]  # fmt: skip
        for i, t in enumerate(r["trials"][:10], 1):
            vals = " | ".join(_fmt(t["params"].get(k, "")) for k in keys)
            lines.append(
                f"| {i} | {t['trial_id']} | {t['status']} | {t['epochs']} | {_samples(t.get('samples'))} | "
                f"{_fmt(t['val_mse'])} | {vals} |"
            )
        errored = [t for t in r["trials"] if t["error"]]
        if errored:
            lines += ["", "Errored trials:", ""] + [f"- {t['trial_id']}: {t['error']}" for t in errored]
        lines.append("")
    lines += [
        "## Best configuration",
        "",
        "```yaml",
        _yaml(r["best_config"]).rstrip(),
        "```",
        "",
        "## Retrain over seeds (reference protocol on the test sets)",
        "",
        "Protocol: {draws} draws x {pairs} test pairs, seed {seed}.".format(**r["protocol"]),
        "",
        "| seed | samples | val MSE | test MSE |",
        "|---|---|---|---|",
    ]
    rows = zip(r["seeds"], r["samples_per_seed"], r["val_mse_per_seed"], r["test_mse_per_seed"], strict=True)
    for seed, n, v, t in rows:
        lines.append(f"| {seed} | {_samples(n)} | {_fmt(v)} | {_fmt(t)} |")
    ratio = r["test_mse_mean"] / r["reference_test_mse"]
    lines += [
        "",
        "| | test MSE |",
        "|---|---|",
        f"| {single} | {r['test_mse_mean']:.3e} ± {r['test_mse_std']:.1e} |",
        f"| {ensemble} | {_ensemble_value(r)} |",
        f"| reference U-Net | {r['reference_test_mse']:.3e} |",
        f"| mix baseline (predict x) | {_fmt(r['baseline_mix_mse'])} |",
        "",
        f"The single-model mean is {ratio:.2f}x the reference's MSE. The ensemble averages the predictions of "
        f"seeds {', '.join(map(str, r['ensemble_seeds'])) or '-'} (their final retrain checkpoints) on the same "
        f"draws. `best_model.pt` is one model, not the ensemble: seed {r['best_seed']} (lowest validation MSE), "
        "with its resolved config.",
        "",
        "## Pictures",
        "",
        f"![separations]({PICTURES['separations']})",
        "",
        f"![optimisation history]({PICTURES['history']})",
        "",
        f"![hyperparameter importances]({PICTURES['importances']})",
        "",
    ]
    return "\n".join(lines)


def _yaml(data: Any) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)
