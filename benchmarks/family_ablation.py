"""The U-Net family's new parts on this CPU: each option on against off around one good small shape.

    nice -n 15 python benchmarks/family_ablation.py [--out FILE] [--workers 2] [--seeds 3]

Around ``BASE`` (config 131 of benchmarks/results/learning-curves-cpu.json: 177k parameters, batch norm, the
consistent head, ReLU outputs, Adam 2e-3 cosine, EMA 0.999), each option of ``OPTIONS`` is switched on alone:
residual blocks, attention gates, a dilated bottleneck, bilinear up-sampling, the edge loss. Every run:

- trains with the project's ``bss_model.train.train`` for the same sample budget (``BUDGET``), on the
  validation split of the training sets, one torch thread, two runs side by side;
- is scored with the full test protocol (10 draws x 20,000 test pairs, ``bss_model.evaluate``);
- is repeated over ``--seeds`` seeds, so an option's effect is read against seed noise.

The budget is checked, not assumed: ``reference`` (the reference-shaped network, the ``seed`` topology at
filters 4 with the reference's Adam 1e-3 and plateau schedule: config 0 of the learning-curve table) is
trained once on it, and the summary says whether it was still improving over the budget's last quarter.

The cost of each option is measured apart from the runs, in one process, interleaved: after a warm-up,
each of ``--cost-rounds`` rounds times ``--cost-steps`` training steps of every option in turn (the real
``TrainStep`` on random images shaped like the data), in CPU time of the one thread; the figure is the
median window, and each option's samples/s is given as a ratio to the baseline's, measured beside it.
The runs' own samples/s are kept too, but on a shared machine their wall clock says mostly what else ran.

Resumable: the JSON is rewritten atomically after every finished run (and after the cost phase); a rerun
skips what is there and refuses a file made with another base, budget or option list. A kill loses only
the runs in flight.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):  # run as a script from a checkout
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from learning_curves import machine  # noqa: E402

from bss_model.config import with_overrides  # noqa: E402
from bss_model.io import atomic_write_json  # noqa: E402

# The shape and recipe every option is switched on around (config 131 of the learning-curve table, with the
# lead's recipe: Adam 2e-3, cosine with half an epoch of warmup, EMA 0.999, ReLU outputs).
BASE: dict[str, Any] = {
    "data": {"val_pairs": 2000, "download": False},
    "model": {
        "variant": "seed",
        "filters": 16,
        "depth": 2,
        "encoder_convs": 2,
        "bottleneck_convs": 3,
        "decoder_convs": 4,
        "decoder_mult": 1,
        "norm": "batch",
        "head": "consistent",
        "output": "relu",
    },
    "train": {
        "batch_size": 64,
        "optimizer": "adam",
        "lr": 2.0e-3,
        "schedule": "cosine",
        "warmup_epochs": 0.5,
        "min_lr": 1.0e-6,
        "ema_decay": 0.999,
        "tensorboard": False,
        "image_every": 0,
        "threads": 1,
        "device": "cpu",
    },
    "eval": {"draws": 10, "pairs": 20000},
}
# 10 epochs x 10,240 samples = 102,400 samples (1,600 steps at batch 64): about 2.5 minutes of training per
# run at this shape's ~700 samples/s on one thread of this CPU.
BUDGET = {"train.epochs": 10, "train.samples_per_epoch": 10240}

# Each option alone, on top of BASE. The dilation [1, 2, 4] covers BASE's 3 bottleneck convs.
OPTIONS: dict[str, dict[str, Any]] = {
    "baseline": {},
    "residual": {"model.block": "residual"},
    "gate": {"model.attention": "gate"},
    "dilation": {"model.dilation": [1, 2, 4]},
    "bilinear": {"model.upsample": "bilinear"},
    "edge": {"train.loss": "edge", "train.edge_weight": 0.1},
}
# The reference-shaped network (config 0 of the learning-curve table), for the budget check: trained once.
REFERENCE = {
    "model.variant": "seed",
    "model.filters": 4,
    "model.norm": "none",
    "model.head": "depthwise",
    "model.output": "none",
    "model.bottleneck_convs": 2,
    "model.decoder_mult": 4,
    "train.lr": 1.0e-3,
    "train.schedule": "plateau",
    "train.ema_decay": 0.0,
}

log = logging.getLogger("bss")


def resolve(params: dict[str, Any], seed: int) -> dict[str, Any]:
    """One run's full config, through the project's own override function (validated)."""
    return with_overrides(BASE, {**BUDGET, **params, "train.seed": seed}).to_dict()


# -- the cost phase ------------------------------------------------------------------------------


def measure_costs(options: dict[str, dict[str, Any]], steps: int, rounds: int) -> dict[str, Any]:
    """Parameters and training samples/s of every option, timed interleaved in this one process."""
    import torch

    from bss_model.config import config_from_dict
    from bss_model.data import PairSampler
    from bss_model.losses import objective
    from bss_model.model import build_model, count_parameters, forward_flops
    from bss_model.runtime import apply_torch_settings, resolve_runtime
    from bss_model.step import TrainStep

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (4096, 32, 32), dtype=np.uint8) for _ in range(2)]
    built = {}
    for name, params in options.items():
        cfg = config_from_dict(resolve(params, 0))
        rt = resolve_runtime(cfg.train)
        apply_torch_settings(rt, cfg.train.threads)
        torch.manual_seed(0)
        model = rt.prepare_model(build_model(cfg.model))
        t = cfg.train
        loss = objective(t.loss, t.charbonnier_eps, t.edge_weight, rt.device)
        step = TrainStep(model, PairSampler(*images, rt.device, seed=0), t, rt, objective=loss)
        weight_at = (lambda s, w=t.edge_weight: w) if t.loss == "edge" else None
        built[name] = (cfg, model, step, weight_at)
    for _, _, step, weight_at in built.values():  # warm-up: oneDNN primitives, allocator
        step.run(max(2, steps // 2), loss_weight_at=weight_at)
    windows: dict[str, list[float]] = {name: [] for name in built}
    names = list(built)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # the order rotates per round
            _, _, step, weight_at = built[name]
            t0 = time.process_time()
            step.run(steps, loss_weight_at=weight_at)
            windows[name].append(time.process_time() - t0)
    out: dict[str, Any] = {"steps_per_window": steps, "rounds": rounds, "clock": "cpu process time, 1 thread"}
    base_s = statistics.median(windows["baseline"]) if "baseline" in windows else math.nan
    rows = {}
    for name, (cfg, model, _, _) in built.items():
        median = statistics.median(windows[name])
        rows[name] = {
            "n_params": count_parameters(model),
            "forward_gflop": round(forward_flops(build_model(cfg.model)) / 1e9, 4),
            "samples_per_s": round(steps * cfg.train.batch_size / median, 1),
            "samples_per_s_ratio": round(base_s / median, 3),
            "windows_s": [round(w, 4) for w in windows[name]],
        }
    out["options"] = rows
    return out


# -- the runs --------------------------------------------------------------------------------------

_SPLITS = None


def _splits(cfg):
    global _SPLITS
    if _SPLITS is None:
        from bss_model.data import load_splits

        _SPLITS = load_splits(cfg.data)
    return _SPLITS


def train_run(job: tuple[str, int, dict[str, Any]]) -> dict[str, Any]:
    """Train one (option, seed) with the project's train(), then score it with the full test protocol."""
    import tempfile

    from bss_model.config import config_from_dict
    from bss_model.evaluate import evaluate_checkpoint
    from bss_model.train import train

    name, seed, resolved = job
    cfg = config_from_dict(resolved)
    t0 = time.time()
    row: dict[str, Any] = {"option": name, "seed": seed}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            r = train(cfg, out_dir=tmp, splits=_splits(cfg))
            row.update(
                status=r.status,
                reason=r.reason,
                val_mse=[h["val_mse"] for h in r.history],
                samples=[h["samples"] for h in r.history],
                train_samples_per_s=round(statistics.median(h["samples_per_s"] for h in r.history), 1)
                if r.history
                else None,
            )
            if r.status == "completed":
                test = evaluate_checkpoint(Path(tmp) / "checkpoint", device="cpu")
                row.update(
                    test_mse=test["test_mse_mean"],
                    test_mse_std_draws=test["test_mse_std"],
                    test_mse_per_draw=test["test_mse_per_draw"],
                    baseline_mix_mse=test["baseline_mix_mse_mean"],
                    draws=test["draws"],
                    pairs=test["pairs"],
                )
    except Exception as exc:  # one failing run must not stop the table
        row.update(status="error", reason=f"{type(exc).__name__}: {exc}".splitlines()[0], val_mse=[], samples=[])
    row["wall_s"] = round(time.time() - t0, 2)
    return row


def _worker_init(nice: int) -> None:
    if nice:
        os.nice(nice)
    logging.getLogger("bss").setLevel(logging.WARNING)


# -- the summary -----------------------------------------------------------------------------------


def still_improving(curve: list[float]) -> dict[str, Any]:
    """Did the budget's last quarter lower the validation MSE below everything before it (and by how much)?"""
    if len(curve) < 2:
        return {"still_improving": None}
    q = max(1, len(curve) // 4)
    before = min(curve[:-q])
    return {"still_improving": bool(curve[-1] < before), "last_quarter_gain": round(1 - curve[-1] / before, 4)}


def verdict(diff: float, se: float) -> str:
    """An option against the baseline: a difference beyond 2 standard errors (Welch's, seeds unpaired) counts."""
    if not math.isfinite(se) or se <= 0:
        return "unmeasured"
    if diff < -2 * se:
        return "helps"
    if diff > 2 * se:
        return "hurts"
    return "no measurable difference"


def summarize(table: dict[str, Any]) -> dict[str, Any]:
    """Per option: test MSE mean ± std over seeds, the change against the baseline, its cost, the verdict."""
    runs = [r for r in table["runs"] if r["status"] == "completed" and "test_mse" in r]
    by: dict[str, list[float]] = {}
    per_seed: dict[str, dict[int, float]] = {}
    for r in runs:
        by.setdefault(r["option"], []).append(r["test_mse"])
        per_seed.setdefault(r["option"], {})[r["seed"]] = r["test_mse"]
    costs = table.get("cost", {}).get("options", {})
    out: dict[str, Any] = {"options": {}}
    base = by.get("baseline", [])
    for name in [*table["options"], "reference"]:
        vals = by.get(name, [])
        if not vals:
            continue
        mean = float(np.mean(vals))
        std = float(np.std(vals, ddof=1)) if len(vals) > 1 else math.nan
        row: dict[str, Any] = {"seeds": len(vals), "test_mse_mean": mean, "test_mse_std": std}
        if name in costs:
            row.update(n_params=costs[name]["n_params"], samples_per_s_ratio=costs[name]["samples_per_s_ratio"])
        if name not in ("baseline", "reference") and len(base) > 1 and len(vals) > 1:
            diff = mean - float(np.mean(base))
            se = math.sqrt(np.var(vals, ddof=1) / len(vals) + np.var(base, ddof=1) / len(base))
            row.update(change_vs_baseline=round(diff / float(np.mean(base)), 4), diff_over_se=round(diff / se, 2))
            row["verdict"] = verdict(diff, se)
            # Seed s of every option draws the same training pairs in the same order (the sampler's seed is
            # train.seed): the per-seed differences remove that share of the noise. Shown beside the verdict,
            # which stays the unpaired test (the inits differ, so the pairing is only partial).
            shared = sorted(set(per_seed[name]) & set(per_seed["baseline"]))
            if len(shared) > 1:
                d = [per_seed[name][k] - per_seed["baseline"][k] for k in shared]
                paired_se = float(np.std(d, ddof=1)) / math.sqrt(len(d))
                row["paired_diff_over_se"] = round(float(np.mean(d)) / paired_se, 2) if paired_se > 0 else None
                row["paired_seeds"] = len(d)
        out["options"][name] = row
    ref = next((r for r in table["runs"] if r["option"] == "reference" and r["val_mse"]), None)
    if ref:
        out["reference_budget_check"] = {"val_mse": ref["val_mse"], **still_improving(ref["val_mse"])}
    base_runs = [r for r in table["runs"] if r["option"] == "baseline" and r["val_mse"]]
    if base_runs:
        out["baseline_budget_check"] = [{"seed": r["seed"], **still_improving(r["val_mse"])} for r in base_runs]
    return out


LABELS = {
    "baseline": "baseline (plain, no gates, no dilation, transposed conv, MSE)",
    "residual": "`model.block: residual`",
    "gate": "`model.attention: gate`",
    "dilation": "`model.dilation: [1, 2, 4]`",
    "bilinear": "`model.upsample: bilinear`",
    "edge": "`train.loss: edge` (`edge_weight` 0.1)",
    "reference": "reference-shaped network (budget check)",
}


def markdown(table: dict[str, Any]) -> str:
    """The README's table: test MSE mean ± std over seeds, the change against the baseline, params, samples/s."""
    lines = [
        "| option | test MSE (mean ± std, seeds) | vs baseline | paired by seed (t, dof) | params "
        "| train samples/s (vs baseline) | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in table["summary"]["options"].items():
        if name == "reference":
            continue
        std = f"{row['test_mse_std']:.3e}" if math.isfinite(row["test_mse_std"]) else "-"
        change = f"{100 * row['change_vs_baseline']:+.1f}% ({row['diff_over_se']:+.1f} se)" if "verdict" in row else "-"
        cost = table["cost"]["options"].get(name, {})
        speed = f"{cost.get('samples_per_s', math.nan):.0f} ({cost.get('samples_per_s_ratio', math.nan):.2f}x)"
        paired = "-"
        if row.get("paired_diff_over_se") is not None:
            paired = f"{row['paired_diff_over_se']:+.1f} ({row['paired_seeds'] - 1})"
        lines.append(
            f"| {LABELS.get(name, name)} | {row['test_mse_mean']:.3e} ± {std} ({row['seeds']}) | {change} | {paired} "
            f"| {cost.get('n_params', 0):,} | {speed} | {row.get('verdict', '-')} |"
        )
    lines += ["", *budget_lines(table)]
    return "\n".join(lines)


def budget_lines(table: dict[str, Any]) -> list[str]:
    """Below the table: how many runs it holds, and whether the budget still left the networks improving."""
    summary = table["summary"]
    planned = len(table["options"]) * len(table["meta"]["seeds"]) + 1
    done = sum(r["status"] == "completed" for r in table["runs"])
    lines = [f"Runs finished: {done} of {planned} ({len(table['options'])} options x {len(table['meta']['seeds'])} "
             "seeds + the reference-shaped network)."]  # fmt: skip
    check = summary.get("reference_budget_check")
    if check and check.get("still_improving") is not None:
        ref = summary["options"].get("reference", {})
        mse = f", test MSE {ref['test_mse_mean']:.3e}" if "test_mse_mean" in ref else ""
        lines.append(
            f"Reference-shaped network on the same budget{mse}: still improving at its end: "
            f"{'yes' if check['still_improving'] else 'no'} (validation MSE {100 * check['last_quarter_gain']:+.1f}% "
            "over the budget's last quarter)."
        )
    base = summary.get("baseline_budget_check", [])
    if base:
        gains = ", ".join(f"{100 * b['last_quarter_gain']:.1f}%" for b in base if b.get("still_improving") is not None)
        lines.append(f"Baseline seeds still improving at their end: {sum(bool(b['still_improving']) for b in base)} "
                     f"of {len(base)} (last-quarter validation gains {gains}).")  # fmt: skip
    return lines


# -- the build -------------------------------------------------------------------------------------


def build(args: argparse.Namespace) -> dict[str, Any]:
    global BUDGET
    if args.epochs or args.samples_per_epoch:
        BUDGET = {
            "train.epochs": args.epochs or BUDGET["train.epochs"],
            "train.samples_per_epoch": args.samples_per_epoch or BUDGET["train.samples_per_epoch"],
        }
    if args.draws or args.pairs or args.val_pairs:  # tests: a smaller protocol
        BASE["eval"] = {"draws": args.draws or BASE["eval"]["draws"], "pairs": args.pairs or BASE["eval"]["pairs"]}
        BASE["data"]["val_pairs"] = args.val_pairs or BASE["data"]["val_pairs"]
    names = args.options.split(",") if args.options else list(OPTIONS)
    unknown = [n for n in names if n not in OPTIONS]
    if unknown or "baseline" not in names:
        raise SystemExit(f"--options {args.options}: use baseline and any of {', '.join(OPTIONS)}")
    options = {n: OPTIONS[n] for n in names}
    seeds = list(range(args.seeds))

    out = Path(args.out)
    identity = {"base": BASE, "budget": BUDGET, "options": options, "reference": REFERENCE, "seeds": seeds}
    table: dict[str, Any] = {}
    if out.exists():
        import json

        table = json.loads(out.read_text())
        if {k: table.get("meta", {}).get(k) for k in identity} != identity:
            raise SystemExit(f"{out} was built with another base, budget, options or seeds: pass --out or delete it")
    meta = {**identity, "machine": machine()}
    table.setdefault("meta", meta)
    table["options"] = list(options)
    table.setdefault("runs", [])
    table["resolved"] = {name: resolve(params, 0) for name, params in options.items()}
    table["resolved"]["reference"] = resolve(REFERENCE, 0)

    def save() -> None:
        order = {n: i for i, n in enumerate([*options, "reference"])}
        table["runs"].sort(key=lambda r: (order.get(r["option"], 99), r["seed"]))
        table["summary"] = summarize(table)
        atomic_write_json(out, table)

    if "cost" not in table or args.remeasure_cost:
        print(f"cost: {len(options)} options interleaved, {args.cost_rounds} rounds of {args.cost_steps} steps",
              flush=True)  # fmt: skip
        if args.nice:
            os.nice(args.nice)
        table["cost"] = measure_costs(options, args.cost_steps, args.cost_rounds)
        for name, row in table["cost"]["options"].items():
            print(f"  {name}: {row['n_params']:,} params, {row['samples_per_s']} samples/s "
                  f"({row['samples_per_s_ratio']}x)", flush=True)  # fmt: skip
        save()

    done = {(r["option"], r["seed"]) for r in table["runs"]}
    # Seed by seed across the options (a table killed early still compares every option), the reference last.
    jobs = [(n, s, resolve(p, s)) for s in seeds for n, p in options.items() if (n, s) not in done]
    if ("reference", 0) not in done:
        jobs.append(("reference", 0, resolve(REFERENCE, 0)))
    print(f"training: {len(jobs)} runs to go ({len(done)} done), {args.workers} workers", flush=True)
    t0 = time.time()
    ctx = mp.get_context("spawn")
    with contextlib.ExitStack() as stack:
        if args.workers:
            pool = stack.enter_context(
                ctx.Pool(args.workers, initializer=_worker_init, initargs=(0,), maxtasksperchild=4)
            )
            rows = pool.imap_unordered(train_run, jobs)
        else:  # in this process, one run after another (tests)
            rows = map(train_run, jobs)
        for k, row in enumerate(rows, 1):
            table["runs"].append(row)
            save()
            test = row.get("test_mse", math.nan)
            took = f"({row['wall_s']:.0f} s, {time.time() - t0:.0f} s in)"
            print(f"  [{k}/{len(jobs)}] {row['option']} seed {row['seed']}: {row['status']} test {test:.4e} {took} "
                  f"{row.get('reason', '')}", flush=True)  # fmt: skip
    save()
    return table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "family-ablation-cpu.json"))
    p.add_argument("--workers", type=int, default=2,
                   help="training processes side by side, one thread each (0: in this process)")  # fmt: skip
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--options", default="", help="comma-separated subset of the options (default: all)")
    p.add_argument("--cost-steps", type=int, default=24, help="training steps per timed window")
    p.add_argument("--cost-rounds", type=int, default=7, help="interleaved rounds of the cost phase")
    p.add_argument("--remeasure-cost", action="store_true", help="measure the cost phase again (runs are kept)")
    p.add_argument("--nice", type=int, default=0, help="niceness of the cost phase (the runs inherit the shell's)")
    p.add_argument("--epochs", type=int, default=None, help="override the budget's epochs (tests)")
    p.add_argument("--samples-per-epoch", type=int, default=None, help="override the budget's epoch size (tests)")
    p.add_argument("--draws", type=int, default=None, help="override the protocol's draws (tests)")
    p.add_argument("--pairs", type=int, default=None, help="override the protocol's pairs per draw (tests)")
    p.add_argument("--val-pairs", type=int, default=None, help="override the validation pairs (tests)")
    p.add_argument("--markdown", action="store_true", help="print the finished table of --out as Markdown, run nothing")
    args = p.parse_args(argv)
    if args.markdown:
        import json

        table = json.loads(Path(args.out).read_text())
        table["summary"] = summarize(table)  # from the runs as they stand (a file written by an older script too)
        print(markdown(table))
        return 0
    table = build(args)
    for name, row in table["summary"]["options"].items():
        print(name, row, flush=True)
    print("budget:", table["summary"].get("reference_budget_check", {}).get("still_improving"), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
