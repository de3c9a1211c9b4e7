"""The user's results, rendered: report.json and report.md (the pictures: ``search/figures.py``).

The report only renders the typed results it is given (the search summary, the retrain's
seeds, the best model's test separations); it opens no checkpoint and runs no model.
Every file is written to a temporary name and renamed into place, so an interrupted
report never leaves a truncated file behind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bss_model.io import atomic_write_json, atomic_write_text
from search import pareto_report
from search.figures import PICTURES, Importances, param_importances, write_pictures
from search.results import RetrainSummary, SearchSummary, Separations
from search.space import Dimension

REFERENCE_TEST_MSE = 3.677e-4  # the Keras reference notebook, 10 draws x 20,000 test pairs


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3e}" if (v != 0 and (abs(v) < 1e-2 or abs(v) >= 1e4)) else f"{v:g}"
    return str(v)


def build_report(
    search: SearchSummary | None,
    retrain: RetrainSummary,
    best_config: dict[str, Any],
    wall_s: float,
    importances: Importances | None = None,
    budget: dict[str, Any] | None = None,
    pick: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """report.json's content. ``search`` is None for a named config retrained directly (no trials);
    ``budget``: a budgeted job's plan and phases (search/budgeted.py Budgeted.report), else None. A
    two-objective search adds ``pareto`` (its costs, front and hypervolume) and ``pick`` (the point retrained)."""
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
    report = {
        "best_config": best_config,
        "best_params": s["best_params"],
        "best_val_mse": s["best_val_mse"],
        "num_trials": s["num_trials"],
        "num_completed": s["num_completed"],
        "num_stopped_early": s["num_stopped_early"],
        "num_errored": s["num_errored"],
        "num_diverged": s["num_diverged"],
        "num_cut": s.get("num_cut", 0),
        "param_importances": (importances or Importances(note="no search")).to_dict(),
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
        "budget": budget,
    }
    if search.pareto is not None:
        report |= {"pareto": s["pareto"], "pick": pick}
    return report


def write_report(
    out: Path,
    search: SearchSummary | None,
    retrain: RetrainSummary,
    best_config: dict[str, Any],
    dims: dict[str, Dimension],
    separations: Separations,
    wall_s: float,
    budget: dict[str, Any] | None = None,
    pick: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Every picture, then report.json and report.md (which link the pictures); returns the report."""
    trials = search.trials if search is not None else []
    importances = param_importances(trials, dims)
    write_pictures(trials, importances, separations, out)
    if search is not None and search.pareto is not None:
        pareto_report.write_pictures(search.pareto, trials, pick, out)
    report = build_report(search, retrain, best_config, wall_s, importances, budget, pick)
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
        f"early by ASHA, "
        + (f"{r['num_cut']} cut by the budget's deadline, " if r.get("num_cut") else "")
        + f"{r['num_errored']} errored ({r['num_diverged']} diverged). Best validation MSE "
        f"{_fmt(r['best_val_mse'])}.",
        "",
    ]
    if r.get("budget"):
        lines += render_budget(r["budget"])
    imp = r["param_importances"]
    if imp["values"]:
        ranked = ", ".join(f"`{k}` {v:.2f}" for k, v in imp["values"].items())
        lines += [f"Importances for validation MSE ({imp['method']}, over the {imp['trials']} full-budget trials): "
                  f"{ranked}.", ""]  # fmt: skip
    elif r["trials"]:
        lines += [f"Importances: none ({imp['note']}).", ""]
    per_epoch = {t["samples"] // t["epochs"] for t in r["trials"] if t.get("samples") and t["epochs"]}
    if r.get("budget"):
        lines += [
            f"Budgets are time: every trial had {r['budget']['plan']['trial_s']:.0f} s (its epochs equal time "
            "slices), so ASHA compared trials at equal wall time, and a faster model saw more samples.",
            "",
        ]
    elif len(per_epoch) == 1:
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
    lines += pareto_report.markdown(r)  # a two-objective search: the front, the pick, the hypervolume
    pick = r.get("pick") or {}
    lines += [
        # A pick other than `best` retrains another trial than the search's best (best_params above).
        f"## Retrained configuration (`{pick['rule']}`: trial {pick['trial_id']})"
        if pick.get("rule", "best") != "best"
        else "## Best configuration",
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


PHASE_NAMES = {"startup": "startup (imports, probe, Ray)", "search": "search", "retrain": "retrain",
               "eval": "evaluation (protocol, every seed and the ensemble)", "report": "report"}  # fmt: skip


def render_budget(b: dict[str, Any]) -> list[str]:
    """The budget's section: each phase's planned and actual time and the work it did."""
    from search.budget import format_duration

    lines = [
        "## Budget",
        "",
        f"Budget {format_duration(b['budget_s'])} for the whole command; spent {format_duration(b['spent_s'])} "
        f"before the report was written, over {b['runs']} run(s) of the command.",
        "",
        "| phase | planned | actual | work |",
        "|---|---|---|---|",
    ]
    for key, name in PHASE_NAMES.items():
        p = b["phases"].get(key)
        if p is None:
            continue
        work = ""
        if "samples" in p:
            work = f"{p['samples']:,} training samples"
        if "pairs" in p:
            work = f"{p['pairs']:,} test pairs"
        planned = "" if p.get("planned_s") is None else f"{p['planned_s']:.0f} s"
        actual = f"{p['actual_s']:.0f} s" if key != "report" or p.get("actual_s") else "(this report)"
        lines.append(f"| {name} | {planned} | {actual} | {work} |")
    plan = b["plan"]
    lines += ["", f"Plan: up to {plan['trials']} trials of {plan['trial_s']:.0f} s each; each retrain seed "
              f"{plan['retrain_seed_s']:.0f} s; search share {plan['search_share']:g}."]  # fmt: skip
    speeds, expected = b.get("winner_speeds"), b.get("retrain_expected_samples")
    if speeds and expected:
        lines.append(
            f"The winner trained {speeds['train_samples_per_s']:.0f} samples/s in the search, so a retrain seed was "
            f"expected to see about {expected:,} samples (its epochs run on its time limit: the seeds' own "
            f"counts are above); the evaluation was planned at {speeds['infer_images_per_s']:.0f} images/s."
        )
    lines.append("")
    lines += [f"- {note}" for note in plan.get("notes", [])]
    return lines + ([""] if plan.get("notes") else [])


def _yaml(data: Any) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)
