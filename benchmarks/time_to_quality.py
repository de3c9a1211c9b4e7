"""Time to quality: the whole budgeted job's test MSE at several wall-clock budgets, beside the reference recipe.

    python benchmarks/time_to_quality.py [--budgets 2.5m 5m 10m] [--shares 0.35] [--split-budget 10m
        --split-shares 0.2 0.35 0.5] [--config configs/laptop.yaml] [--isa avx2] [--json OUT] [--plot OUT.png]

For each budget it runs the README's main job as a user does (``bss-search --config <config> --budget B``,
a fresh experiment, a subprocess) and times the command from its start to its exit. The protocol's test
MSE (mean over the retrain's seeds, 10 x 20,000 pairs) comes from the job's report.

Side by side, on the same machine, it trains the reference network and recipe (``configs/seed.yaml``: the
seed notebook's U-Net, Adam 1e-3, batch 32, the plateau schedule) with ``bss_model.train`` for the same wall
times, and evaluates it with the same protocol's draws. One reference run of the longest budget keeps a
snapshot at each budget (:func:`reference_run`). Its evaluations are not counted in its time (which favours the
reference). ``--reference-pairs`` scores it on fewer pairs per draw: its network runs ~130 images per CPU-second
here, so the full 10 x 20,000 costs ~25 CPU-minutes per snapshot; the JSON records the pairs used.

``--split-budget`` with ``--split-shares`` also runs the job at several ``plan.search_share`` values at one
budget: the evidence for the share the configs state.

``--isa avx2`` runs the jobs as on a CPU with AVX2 only, on a newer one: torch's kernels capped at AVX2
(``ATEN_CPU_CAPABILITY=avx2``, ``ONEDNN_MAX_CPU_ISA=AVX2``, inherited by Ray's workers) and fp32, which
``precision: auto`` picks where the CPU has no native bf16 (the job would read avx512_bf16 in /proc/cpuinfo
and pick bf16, emulated under the cap). The budget's probe measures that speed, as it would there.

It records the machine (CPU model and flags, torch, threads) and reports, per budget, both test MSEs and
their ratio. Resumable: every finished unit is written to the JSON at once and skipped on a rerun. Run it on
a machine nothing else is using: its figures are wall-clock times.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from bss_model.io import atomic_write_json  # noqa: E402
from search.budget import parse_duration  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def machine() -> dict[str, Any]:
    import torch

    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    lines = cpuinfo.splitlines()
    flags = next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), [])
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": next((ln.split(":", 1)[1].strip() for ln in lines if "model name" in ln), platform.processor()),
        "cpu_flags": sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "sse4"))),
        "cpu_native_bf16": bool({"avx512_bf16", "amx_bf16"} & set(flags)),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": os.getloadavg(),
    }


# What --isa adds to a job: its environment, and its --set arguments.
ISAS: dict[str, tuple[dict[str, str], list[str]]] = {
    "native": ({}, []),
    "avx2": ({"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}, ["base.train.precision=fp32"]),
}


def run(cmd: list[str], cwd: Path, log: Path, timeout: float, env: dict[str, str] | None = None) -> tuple[int, float]:
    """``cmd`` from ``cwd``, its output to ``log``; (exit status, wall seconds from start to exit)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    t0 = time.perf_counter()
    with open(log, "w") as out:
        code = subprocess.run(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout).returncode
    return code, time.perf_counter() - t0


def job_unit(config: Path, budget: str, share: float, work: Path, isa: str = "native") -> dict[str, Any]:
    """The main job at ``budget`` and ``plan.search_share`` = share, as a user runs it (on ``isa``: see ISAS)."""
    name = f"ttq-{budget}-{share:g}" + ("" if isa == "native" else f"-{isa}")
    env, isa_sets = ISAS[isa]
    cmd = [sys.executable, str(ROOT / "search" / "run.py"), "--config", str(config), "--budget", budget,
           "--name", name, "--storage-path", str(work / "results"), "--set", f"plan.search_share={share}",
           *(a for v in isa_sets for a in ("--set", v))]  # fmt: skip
    code, wall = run(cmd, work, work / f"{name}.log", timeout=parse_duration(budget) * 3 + 600, env=env)
    if code != 0:
        raise RuntimeError(f"{name} exited {code}: see {work / f'{name}.log'}")
    report = json.loads((work / "results" / name / "report.json").read_text())
    b = report["budget"]
    return {
        "budget": budget,
        "budget_s": parse_duration(budget),
        "search_share": share,
        "isa": {"name": isa, "env": env, "sets": isa_sets},
        "wall_s": wall,
        "over_budget_s": wall - parse_duration(budget),
        "test_mse_mean": report["test_mse_mean"],
        "test_mse_std": report["test_mse_std"],
        "test_mse_per_seed": report["test_mse_per_seed"],
        "test_mse_ensemble": report["test_mse_ensemble"],
        "seeds": report["seeds"],
        "samples_per_seed": report["samples_per_seed"],
        "best_params": report["best_params"],
        "num_trials": report["num_trials"],
        "num_completed": report["num_completed"],
        "phases": b["phases"],
        "plan": b["plan"],
        "winner_speeds": b.get("winner_speeds"),
    }


def reference_run(budgets: list[str], work: Path) -> dict[str, dict[str, Any]]:
    """The reference recipe (configs/seed.yaml) trained once by ``bss_model.train`` for the longest budget, with a
    snapshot at every budget: {budget: unit}.

    The run is time-limited and split into epochs of the shortest budget's length (all budgets are multiples of
    it), so an epoch ends at each budget and its checkpoint is the snapshot. The recipe's plateau schedule waits
    9 epochs without progress before it acts, so within these few epochs it never does: the first B seconds of
    this run are a run of B seconds exactly. Its validation pass is cut to 1,000 pairs so that nearly all of its
    time trains."""
    seconds = sorted({parse_duration(b): b for b in budgets}.items())
    unit_s = seconds[0][0]
    slices = round(seconds[-1][0] / unit_s)
    keep = {round(s / unit_s): b for s, b in seconds}
    if any(abs(k * unit_s - s) > 1e-6 for k, (s, _) in zip(keep, seconds, strict=True)):
        raise SystemExit("time_to_quality.py: the reference needs budgets that are multiples of the shortest")
    out = work / "reference"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--reference-worker", str(out), "--slices", str(slices),
           "--limit", str(seconds[-1][0]), "--keep", ",".join(map(str, keep))]  # fmt: skip
    code, wall = run(cmd, work, work / "reference.log", timeout=seconds[-1][0] * 3 + 600)
    if code != 0:
        raise RuntimeError(f"the reference run exited {code}: see {work / 'reference.log'}")
    snaps = json.loads((out / "snapshots.json").read_text())
    units = {keep[int(k)]: v for k, v in snaps.items()}
    return {b: {"budget": b, "budget_s": parse_duration(b), **v} for b, v in units.items()}


def reference_worker(out: Path, slices: int, limit: float, keep: list[int]) -> int:
    """The reference run itself (a process of its own, as ``bss-train`` is): every kept epoch's checkpoint is
    copied aside with the run's clock and samples at that point."""
    import shutil

    from bss_model import checkpoint as ckpt
    from bss_model.config import load_config
    from bss_model.io import next_run_dir
    from bss_model.train import train

    cfg = load_config(ROOT / "configs" / "seed.yaml", [f"train.epochs={slices}", f"train.time_limit_s={limit}",
                                                       "train.tensorboard=false", "data.val_pairs=1000"])  # fmt: skip
    run_dir = next_run_dir(out, "seed")
    snaps: dict[str, Any] = {}

    def on_epoch(metrics: dict[str, Any], checkpoint_dir: Path) -> None:
        if metrics["epoch"] in keep:
            snap = run_dir / f"snapshot-{metrics['epoch']}.pt"
            shutil.copyfile(checkpoint_dir / ckpt.FILENAME, snap)
            snaps[str(metrics["epoch"])] = {"trained_s": metrics["time_used_s"], "samples": metrics["samples"],
                                            "val_mse": metrics["val_mse"], "checkpoint": str(snap)}  # fmt: skip
            atomic_write_json(out / "snapshots.json", snaps)

    result = train(cfg, on_epoch=on_epoch, out_dir=run_dir)
    return 0 if result.status == "completed" else 1


def evaluate_reference(unit: dict[str, Any], workers: int, pairs: int) -> dict[str, Any]:
    """The protocol's draws for one reference snapshot (``pairs`` test pairs each), the job's own evaluation split
    over ``workers`` processes of one thread."""
    import multiprocessing as mp

    from bss_model import checkpoint as ckpt
    from bss_model.evaluate import assemble

    cfg = ckpt.config_of(ckpt.load(unit["checkpoint"]), unit["checkpoint"])
    cfg_eval = dataclasses.replace(cfg.eval, pairs=pairs)
    chunks = [list(range(i, cfg_eval.draws, workers)) for i in range(workers)]
    with mp.get_context("spawn").Pool(workers) as pool:
        parts = pool.starmap(_draws, [(unit["checkpoint"], chunk, pairs) for chunk in chunks])
    r = assemble({k: v for part in parts for k, v in part.items()}, 1, cfg_eval)["models"][0]
    return {"test_mse_mean": r["test_mse_mean"], "test_mse_std": r["test_mse_std"],
            "test_mse_per_draw": r["test_mse_per_draw"],
            "protocol": {"draws": cfg_eval.draws, "pairs": pairs}}  # fmt: skip


def _draws(checkpoint: str, subset: list[int], pairs: int) -> dict[int, list[dict[str, float]]]:
    from bss_model.data import load_test
    from bss_model.evaluate import load_for_evaluation, models_draws

    models, cfg, runtime = load_for_evaluation([checkpoint], eval_overrides={"pairs": pairs}, device="cpu", threads=1)
    digit, fashion = load_test(cfg.data)
    return models_draws(models, digit, fashion, cfg.eval, runtime, subset)


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    jobs = sorted((u for u in data["jobs"].values() if u["search_share"] == data["share"]), key=lambda u: u["budget_s"])
    ax.errorbar([u["wall_s"] / 60 for u in jobs], [u["test_mse_mean"] for u in jobs],
                yerr=[u["test_mse_std"] for u in jobs], marker="o", label="the whole job (--budget)")  # fmt: skip
    refs = sorted((u for u in data.get("reference", {}).values() if "test_mse_mean" in u), key=lambda u: u["budget_s"])
    if refs:
        pairs = refs[0].get("protocol", {}).get("pairs", 20000)
        ax.plot([u["budget_s"] / 60 for u in refs], [u["test_mse_mean"] for u in refs], marker="s",
                label=f"reference recipe (seed.yaml), same wall time ({pairs:,} pairs per draw)")  # fmt: skip
    ax.axhline(3.6e-2, color="grey", ls=":", label="mix baseline")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("wall time (minutes)")
    ax.set_ylabel("test MSE (10 x 20,000 pairs)")
    ax.set_title(f"{data['machine']['cpu_model']}, {data['machine']['cpus']} CPUs", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(data: dict[str, Any]) -> str:
    refs = {u["budget_s"]: u for u in data.get("reference", {}).values() if "test_mse_mean" in u}
    lines = ["| budget | job wall | job test MSE (mean ± std over seeds) | reference test MSE | reference / job |",
             "|---|---|---|---|---|"]  # fmt: skip
    for u in sorted(data["jobs"].values(), key=lambda u: (u["budget_s"], u["search_share"])):
        ref = refs.get(u["budget_s"])
        ratio = f"{ref['test_mse_mean'] / u['test_mse_mean']:.1f}x" if ref else "-"
        refv = f"{ref['test_mse_mean']:.3e}" if ref else "-"
        lines.append(f"| {u['budget']} (share {u['search_share']:g}) | {u['wall_s']:.0f} s | "
                     f"{u['test_mse_mean']:.3e} ± {u['test_mse_std']:.1e} | {refv} | {ratio} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "laptop.yaml"))
    p.add_argument("--budgets", nargs="+", default=["2.5m", "5m", "10m"])
    p.add_argument("--share", type=float, default=None, help="plan.search_share of the budget curve (the config's)")
    p.add_argument("--split-budget", default=None, help="a budget at which to compare several search shares")
    p.add_argument("--split-shares", nargs="+", type=float, default=[0.2, 0.35, 0.5])
    p.add_argument("--no-reference", action="store_true")
    p.add_argument("--isa", choices=sorted(ISAS), default="native", help="the jobs as on a CPU with this ISA only")
    p.add_argument("--work", default=str(ROOT / "build" / "time-to-quality"))
    p.add_argument("--json", default=str(RESULTS / "time-to-quality-cpu.json"))
    p.add_argument("--plot", default=str(RESULTS / "time-to-quality-cpu.png"))
    p.add_argument(
        "--reference-pairs",
        type=int,
        default=20000,
        help="test pairs per draw for the reference's snapshots (the protocol's 20,000 by default)",
    )
    p.add_argument("--reference-worker", default=None, help=argparse.SUPPRESS)  # the reference run's own process
    p.add_argument("--slices", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--limit", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--keep", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.reference_worker:
        keep = [int(k) for k in args.keep.split(",")]
        return reference_worker(Path(args.reference_worker), args.slices, args.limit, keep)
    from search.config import load_search_config

    share = args.share if args.share is not None else load_search_config(args.config).plan.search_share
    work = Path(args.work).resolve()  # the jobs run from inside it
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.json)
    data = json.loads(out.read_text()) if out.exists() else {}
    data.setdefault("machine", machine())
    if args.isa != "native" and not args.no_reference:
        raise SystemExit("time_to_quality.py: --isa simulates the job's CPU only; add --no-reference")
    data.setdefault("jobs", {})
    data["config"], data["share"] = str(Path(args.config).resolve().relative_to(ROOT)), share
    units = [(b, share) for b in args.budgets]
    if args.split_budget:
        units += [(args.split_budget, s) for s in args.split_shares if (args.split_budget, s) not in units]
    for budget, s in units:
        key = f"{budget}@{s:g}"
        if key in data["jobs"]:
            continue
        print(f"job {key} ...", flush=True)
        data["jobs"][key] = job_unit(Path(args.config), budget, s, work, args.isa)
        atomic_write_json(out, data)
        u = data["jobs"][key]
        print(
            f"job {key}: {u['wall_s']:.0f} s, test MSE {u['test_mse_mean']:.3e} ± {u['test_mse_std']:.1e}", flush=True
        )
    if not args.no_reference:
        refs = data.setdefault("reference", {})
        missing = [b for b in args.budgets if b not in refs]
        if missing:  # the timed part first, then the protocol (untimed) for each snapshot
            print(f"reference recipe for {', '.join(args.budgets)} (one run, a snapshot at each) ...", flush=True)
            refs.update(reference_run(args.budgets, work))
            atomic_write_json(out, data)
        for budget, unit in refs.items():
            if "test_mse_mean" not in unit:
                pairs = args.reference_pairs
                print(f"reference at {budget}: the protocol's draws ({pairs} pairs each) ...", flush=True)
                unit.update(evaluate_reference(unit, data["machine"]["cpus"], args.reference_pairs))
                atomic_write_json(out, data)
    plot(data, Path(args.plot))
    print(table(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
