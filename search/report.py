"""The user's results: report.json, report.md, best_model.pt and pictures.

Every file is written to a temporary name and renamed into place, so an
interrupted report never leaves a truncated file behind.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np

from bss_model import checkpoint as ckpt
from bss_model.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from search.experiment import REFERENCE_TEST_MSE

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


def plot_history(trials: list[dict[str, Any]], path: Path) -> None:
    """Each trial's last validation MSE in trial order, and the best full-budget value so far."""
    plt = _plt()
    order = sorted(trials, key=lambda t: (t.get("number", -1), t["trial_id"]))  # the order they ran in
    fig, ax = plt.subplots(figsize=(6, 3.6))
    best, best_curve = math.inf, []
    for i, t in enumerate(order):
        v = t["val_mse"]
        if t["status"] == "completed":
            best = min(best, v)
        best_curve.append(best if math.isfinite(best) else np.nan)
        if math.isfinite(v):
            style = {"completed": "o", "stopped": "x"}.get(t["status"], "s")
            ax.plot(i, v, style, color="C0" if t["status"] == "completed" else "C1")
    ax.plot(range(len(order)), best_curve, "-", color="C2", label="best (full budget)")
    ax.set_yscale("log")
    ax.set_xlabel("trial (in the order Tune started them)")
    ax.set_ylabel("validation MSE (last epoch)")
    ax.set_title("Optimisation history (o full budget, x stopped by ASHA)")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    atomic_write_bytes(path, _fig_bytes(fig))


def optuna_study(trials: list[dict[str, Any]], parsed_space: dict[str, tuple[str, list[Any]]]) -> Any:
    """An in-memory Optuna study of the finished trials (their last validation MSE)."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    dists = {}
    for key, (kind, args) in parsed_space.items():
        if kind == "choice":
            dists[key] = CategoricalDistribution(args)
        elif kind in ("int", "logint"):
            dists[key] = IntDistribution(args[0], args[1], log=kind == "logint")
        else:
            dists[key] = FloatDistribution(args[0], args[1], log=kind == "loguniform")
    study = optuna.create_study(direction="minimize")
    for t in trials:
        if not math.isfinite(t["val_mse"]):
            continue
        params = {k: t["params"][k] for k in dists if k in t["params"]}
        try:
            study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=t["val_mse"]))
        except ValueError:  # a value outside its distribution (e.g. a hand-given starting point)
            continue
    return study


def plot_importances(trials: list[dict[str, Any]], parsed_space: dict[str, Any], path: Path) -> dict[str, float]:
    """Hyperparameter importances from the Optuna study (PED-ANOVA, Optuna's default)."""
    import optuna

    plt = _plt()
    study = optuna_study(trials, parsed_space)
    importances: dict[str, float] = {}
    note = ""
    try:
        importances = dict(optuna.importance.get_param_importances(study))
    except (RuntimeError, ValueError, ZeroDivisionError) as exc:
        note = f"importances unavailable: {exc}"
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.45 * max(1, len(parsed_space))))
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


def save_best_model(retrain_rows: list[dict[str, Any]], out: Path) -> dict[str, Any]:
    """Copy the best seed's weights + resolved config into best_model.pt (weights_only-loadable).

    The best seed is chosen by *validation* MSE, so the test set stays out of every choice.
    """
    finished = [r for r in retrain_rows if r["checkpoint"] and r["val_mse"] is not None and not r["error"]]
    if not finished:
        raise RuntimeError("no retrain seed finished with a checkpoint")
    best = min(finished, key=lambda r: r["val_mse"])
    import ray.tune

    with ray.tune.Checkpoint(best["checkpoint"]).as_directory() as d:
        state = ckpt.load(Path(d) / ckpt.FILENAME)
    ckpt.save(
        {
            "config": state["config"],
            "model": state["model"],
            "epoch": state["epoch"],
            "n_params": state.get("n_params"),
            "seed": best["seed"],
            "val_mse": best["val_mse"],
            "test": {k: v for k, v in best["metrics"].items() if not isinstance(v, list)},
        },
        out / "best_model.pt",
    )
    return best


def plot_separations(model_path: Path, n: int, path: Path) -> None:
    """Test mixtures (the protocol's first draw) with their true and predicted components."""
    import torch

    from bss_model.checkpoint import load_model
    from bss_model.data import load_test, mix
    from bss_model.evaluate import protocol_indices
    from bss_model.viz import save_separation_png

    model, cfg = load_model(model_path)
    model.eval()
    test_digit, test_fashion = load_test(cfg.data)
    i_digit, i_fashion = protocol_indices(len(test_digit), len(test_fashion), 1, n, cfg.eval.seed)[0]
    x, y = mix(torch.as_tensor(test_digit[i_digit]), torch.as_tensor(test_fashion[i_fashion]))
    with torch.no_grad():
        pred = model(x).float()
    mse = float(((pred - y) ** 2).mean())
    save_separation_png(x.numpy(), y.numpy(), pred.numpy(), path, title=f"best model on test mixtures (MSE {mse:.2e})")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3e}" if (v != 0 and (abs(v) < 1e-2 or abs(v) >= 1e4)) else f"{v:g}"
    return str(v)


def build_report(
    summary: dict[str, Any] | None,
    retrain_rows: list[dict[str, Any]],
    best_seed_row: dict[str, Any],
    best_config: dict[str, Any],
    out: Path,
    wall_s: float,
) -> dict[str, Any]:
    per_seed = [float(r["test_mse_mean"]) for r in retrain_rows if r["test_mse_mean"] is not None]
    baselines = [r["metrics"].get("baseline_mix_mse_mean") for r in retrain_rows]
    baselines = [b for b in baselines if b is not None]
    m0 = retrain_rows[0]["metrics"] if retrain_rows else {}
    report = {
        "best_config": best_config,
        "best_params": (summary or {}).get("best_params", {}),
        "best_val_mse": (summary or {}).get("best_val_mse", best_seed_row.get("val_mse")),
        "num_trials": (summary or {}).get("num_trials", 0),
        "num_completed": (summary or {}).get("num_completed", 0),
        "num_stopped_early": (summary or {}).get("num_stopped_early", 0),
        "num_errored": (summary or {}).get("num_errored", 0),
        "num_diverged": (summary or {}).get("num_diverged", 0),
        "seeds": [r["seed"] for r in retrain_rows if r["test_mse_mean"] is not None],
        "test_mse_per_seed": per_seed,
        "test_mse_mean": float(np.mean(per_seed)),
        "test_mse_std": float(np.std(per_seed)),  # ddof=0, like the protocol's std over draws
        "val_mse_per_seed": [r["val_mse"] for r in retrain_rows if r["test_mse_mean"] is not None],
        "best_seed": best_seed_row["seed"],
        "best_seed_test": best_seed_row["metrics"],
        "baseline_mix_mse": float(np.mean(baselines)) if baselines else None,
        "reference_test_mse": REFERENCE_TEST_MSE,
        "protocol": {k: m0.get(f"protocol_{k}") for k in ("draws", "pairs", "seed")},
        "retrain_errors": [r["error"] for r in retrain_rows if r["error"]],
        "trials": (summary or {}).get("trials", []),
        "search_wall_s": (summary or {}).get("search_wall_s"),
        "wall_s": wall_s,
    }
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", render_markdown(report))
    return report


def render_markdown(r: dict[str, Any]) -> str:
    n = len(r["test_mse_per_seed"])
    lines = [
        "# bss-search report",
        "",
        f"**Test MSE {r['test_mse_mean']:.3e} ± {r['test_mse_std']:.1e} over {n} seeds** "
        f"(reference U-Net {r['reference_test_mse']:.3e}; mix baseline {_fmt(r['baseline_mix_mse'])}).",
        "",
        "## Search",
        "",
        f"{r['num_trials']} trials: {r['num_completed']} ran their full budget, {r['num_stopped_early']} stopped "
        f"early by ASHA, {r['num_errored']} errored ({r['num_diverged']} diverged). Best validation MSE "
        f"{_fmt(r['best_val_mse'])}.",
        "",
    ]
    if r["trials"]:
        keys = sorted({k for t in r["trials"] for k in t["params"]})
        lines += ["| # | trial | status | epochs | val MSE | " + " | ".join(keys) + " |",
                  "|---|---|---|---|---|" + "---|" * len(keys)]  # fmt: skip
        for i, t in enumerate(r["trials"][:10], 1):
            vals = " | ".join(_fmt(t["params"].get(k, "")) for k in keys)
            lines.append(f"| {i} | {t['trial_id']} | {t['status']} | {t['epochs']} | {_fmt(t['val_mse'])} | {vals} |")
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
        "| seed | val MSE | test MSE |",
        "|---|---|---|",
    ]
    for seed, v, t in zip(r["seeds"], r["val_mse_per_seed"], r["test_mse_per_seed"], strict=True):
        lines.append(f"| {seed} | {_fmt(v)} | {_fmt(t)} |")
    ratio = r["test_mse_mean"] / r["reference_test_mse"]
    lines += [
        "",
        "| | test MSE |",
        "|---|---|",
        f"| this search (mean ± std) | {r['test_mse_mean']:.3e} ± {r['test_mse_std']:.1e} |",
        f"| reference U-Net | {r['reference_test_mse']:.3e} |",
        f"| mix baseline (predict x) | {_fmt(r['baseline_mix_mse'])} |",
        "",
        f"This result is {ratio:.2f}x the reference's MSE. `best_model.pt` holds seed {r['best_seed']} "
        "(lowest validation MSE), with its resolved config.",
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
