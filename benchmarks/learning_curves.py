"""A learning-curve table of this task: many configurations trained once, per-epoch validation MSE kept.

    python benchmarks/learning_curves.py [--scale cpu|gpu] [--out FILE] [--workers N] [--configs N]

The table is what ``benchmarks/search_replay.py`` replays whole searches against, in simulated time
(the way Syne Tune's simulator and the tabular HPO benchmarks -- LCBench, NAS-Bench-201, YAHPO --
do it). It must be this task's own curves: the public tables download from hubs these machines
cannot reach, and no other task says how TPE and ASHA behave on this one.

What it holds:
- ``space``: the table's search space, in ``configs/*.yaml``'s ``space:`` form. It mirrors every
  dimension of ``configs/search.yaml``; widths are scaled down (filters / 8 on the CPU scale) so a
  2-core CPU can train the table in about 90 minutes. lr, batch size, schedule, optimizer, weight
  decay, loss, EMA, norm, head and output keep the search's values.
- ``configs``: the configurations (id 0 is the reference-shaped network and optimiser, ids 1-2 the
  search's other starting points, then random draws from ``space``), each with its parameter count
  and its training throughput, measured alone with one thread (``throughput`` below).
- ``runs``: one per (config, seed): status (completed / diverged / error), the per-epoch validation MSE
  and cumulative samples, and the final test-protocol MSE (bss_model.evaluate, a small protocol).
  The first ``noise_configs`` configurations are trained with ``noise_seeds`` seeds each, so the
  table knows seed noise against the spread between configurations.
- ``meta``: the machine, torch's version, the base config every run is resolved against.

Every run is trained by ``bss_model.train.train`` -- the project's own loop, not a copy. Simulated
time comes from the throughput measured in a first phase, one configuration at a time, as samples
per second of CPU time on one thread (``measure_throughput``): on a shared machine that figure is
what the config costs on a core of its own, where the wall clock of the training phase (which runs
``--workers`` processes side by side, niced) says mostly what else was running.

Resumable: the file is rewritten atomically after each finished run, and a rerun skips what is
there; a kill loses only the runs in flight.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import multiprocessing as mp
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from bss_model.config import config_from_dict  # noqa: E402
from bss_model.io import atomic_write_json  # noqa: E402
from search.space import KINDS, Dimension, parse_space  # noqa: E402

# The scales. ``space`` mirrors configs/search.yaml dimension by dimension; ``base`` is the
# search's base at this scale. ``points`` are configs/search.yaml's points_to_evaluate, scaled.
SEARCH_SPACE = {
    "model.filters": {"choice": [32, 48, 64, 128]},
    "model.depth": {"choice": [2, 3]},
    "model.encoder_convs": {"int": [2, 3]},
    "model.bottleneck_convs": {"int": [1, 3]},
    "model.decoder_convs": {"int": [2, 4]},
    "model.decoder_mult": {"choice": [1, 2, 4]},
    "model.norm": {"choice": ["none", "batch"]},
    "model.head": {"choice": ["depthwise", "consistent"]},
    "model.output": {"choice": ["none", "relu"]},
    "train.batch_size": {"choice": [64, 128, 256]},
    "train.lr": {"loguniform": [3.0e-4, 4.0e-3]},
    "train.schedule": {"choice": ["plateau", "cosine"]},
    "train.optimizer": {"choice": ["adam", "adamw"]},
    "train.weight_decay": {"choice": [0.0, 1.0e-4, 1.0e-2]},
    "train.loss": {"choice": ["mse", "l1", "charbonnier"]},
    "train.ema_decay": {"choice": [0.0, 0.999, 0.9999]},
}
_REFERENCE = {
    "model.filters": 32, "model.depth": 2, "model.encoder_convs": 2, "model.bottleneck_convs": 2,
    "model.decoder_convs": 4, "model.decoder_mult": 4, "model.norm": "none", "model.head": "depthwise",
    "model.output": "none", "train.batch_size": 64, "train.lr": 1.0e-3, "train.schedule": "plateau",
    "train.optimizer": "adam", "train.weight_decay": 0.0, "train.loss": "mse", "train.ema_decay": 0.0,
}  # fmt: skip
SEARCH_POINTS = [
    _REFERENCE,
    {**_REFERENCE, "model.norm": "batch", "model.head": "consistent", "model.output": "relu",
     "train.batch_size": 256, "train.lr": 2.0e-3, "train.schedule": "cosine", "train.ema_decay": 0.999},
    {**_REFERENCE, "model.filters": 128, "model.decoder_convs": 2, "model.decoder_mult": 1, "model.norm": "batch",
     "model.output": "relu", "train.batch_size": 256},
]  # fmt: skip

SCALES: dict[str, dict[str, Any]] = {
    # A 2-core CPU with native bf16: the reference shape (filters 4 here) trains ~1,300 samples per CPU
    # second on one thread, and a run costs about as much again in validation, evaluation and start-up.
    # 16 epochs x 512 samples, so 182 runs fit in ~90 minutes on a machine shared with other work;
    # the reference is still improving at the end (checked in the table: ``reference_still_improving``).
    # 512 is a multiple of lcm(64, 128, 256), so every batch size sees the same samples per epoch, as
    # check_fair_budget demands of the real search.
    "cpu": {
        "width_divisor": 8,
        "configs": 150,
        "noise_configs": 16,
        "noise_seeds": 3,
        "base": {
            "data": {"val_pairs": 250, "download": False},
            "model": {"variant": "seed"},
            "train": {
                "epochs": 16,
                "samples_per_epoch": 512,
                "warmup_epochs": 0.5,
                "min_lr": 1.0e-6,
                "tensorboard": False,
                "image_every": 0,
                "threads": 1,
            },
            "eval": {"draws": 1, "pairs": 1000},
        },
    },  # fmt: skip
    # One GPU (about 10 minutes of an H200): the search's own widths, shorter budgets.
    "gpu": {
        "width_divisor": 1,
        "configs": 48,
        "noise_configs": 6,
        "noise_seeds": 3,
        "base": {
            "data": {"val_pairs": 5000, "download": False},
            "model": {"variant": "seed"},
            "train": {
                "epochs": 12,
                "samples_per_epoch": 51200,
                "warmup_epochs": 0.5,
                "min_lr": 1.0e-6,
                "tensorboard": False,
                "image_every": 0,
            },
            "eval": {"draws": 2, "pairs": 10000},
        },
    },  # fmt: skip
}

log = logging.getLogger("bss")


def table_space(width_divisor: int) -> dict[str, Any]:
    """configs/search.yaml's space with its filter widths divided by ``width_divisor``."""
    space = copy.deepcopy(SEARCH_SPACE)
    space["model.filters"] = {"choice": [max(2, f // width_divisor) for f in SEARCH_SPACE["model.filters"]["choice"]]}
    return space


def scale_point(point: dict[str, Any], width_divisor: int) -> dict[str, Any]:
    return {**point, "model.filters": max(2, point["model.filters"] // width_divisor)}


def sample_dimension(dim: Dimension, rng: np.random.Generator) -> Any:
    """One value of ``dim``, drawn as Tune's domain would: uniform choice, inclusive ints, log or linear reals."""
    kind = KINDS[dim.kind]
    if kind.categorical:
        return dim.args[int(rng.integers(len(dim.args)))]
    low, high = dim.args
    if kind.integer:
        if kind.log:
            return int(min(high, math.floor(math.exp(rng.uniform(math.log(low), math.log(high + 1))))))
        return int(rng.integers(low, high + 1))
    if kind.log:
        return float(math.exp(rng.uniform(math.log(low), math.log(high))))
    return float(rng.uniform(low, high))


def draw_configs(space: dict[str, Any], points: list[dict[str, Any]], n: int, seed: int) -> list[dict[str, Any]]:
    """The starting points first, then random draws; no duplicate parameter sets."""
    dims = parse_space(space)
    rng = np.random.default_rng(seed)
    out = [dict(p) for p in points]
    seen = {tuple(sorted(p.items())) for p in out}
    while len(out) < n:
        params = {key: sample_dimension(dim, rng) for key, dim in dims.items()}
        if params.get("train.lr") is not None:
            params["train.lr"] = float(f"{params['train.lr']:.4g}")
        key = tuple(sorted(params.items()))
        if key not in seen:
            seen.add(key)
            out.append(params)
    return out[:n]


def resolve(base: dict[str, Any], params: dict[str, Any], seed: int) -> dict[str, Any]:
    """The full config of one run, through the project's own config builder (validated)."""
    sets = [f"{k}={v}" for k, v in params.items()] + [f"train.seed={seed}"]
    from bss_model.config import apply_overrides

    return config_from_dict(apply_overrides(copy.deepcopy(base), sets)).to_dict()


def machine() -> dict[str, Any]:
    import torch

    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    lines = cpuinfo.splitlines()
    flags = next((ln for ln in lines if ln.startswith("flags")), "")
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "cpu_model": next((ln.split(":", 1)[1].strip() for ln in lines if "model name" in ln), platform.processor()),
        "cpu_native_bf16": any(f in flags.split() for f in ("avx512_bf16", "amx_bf16")),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# -- the two phases -------------------------------------------------------------------------------


_SPLITS = None


def _splits(cfg):
    global _SPLITS
    if _SPLITS is None:
        from bss_model.data import load_splits

        _SPLITS = load_splits(cfg.data)
    return _SPLITS


def measure_throughput(resolved: dict[str, Any]) -> float:
    """Training samples per second of one core's CPU time (per second of GPU time on CUDA), for one config.

    The real training loop over a short budget; the first epoch carries warm-up costs (oneDNN
    primitive creation, compile on CUDA) and is dropped. On a CPU the time is the process's CPU
    time, not the wall clock: with one intra-op thread a run's CPU time per sample hardly depends on
    what else the machine runs, while its wall time doubles when another job takes the core.
    """
    import tempfile

    import torch

    from bss_model.train import train

    d = copy.deepcopy(resolved)
    b = d["train"]["batch_size"]
    d["train"].update(epochs=3, samples_per_epoch=b * max(2, 512 // b), schedule="cosine", warmup_epochs=0.0)
    d["data"]["val_pairs"] = 16
    cfg = config_from_dict(d)
    cuda = cfg.train.device.startswith("cuda") or (cfg.train.device == "auto" and torch.cuda.is_available())
    clock = time.perf_counter if cuda else time.process_time  # CUDA: train() synchronises each epoch
    marks = [clock()]
    with tempfile.TemporaryDirectory() as tmp:
        r = train(cfg, on_epoch=lambda m, _: marks.append(clock()), out_dir=tmp, splits=_splits(cfg))
    spans = [b - a for a, b in zip(marks[1:], marks[2:], strict=False)]
    return float(cfg.train.epoch_samples / min(spans)) if spans and r.status == "completed" else math.nan


def measure_config(job: tuple[int, dict[str, Any]]) -> tuple[int, dict[str, Any]]:
    """Phase 1 for one config: its parameter count and throughput (or why it could not be measured)."""
    from bss_model.model import build_model, count_parameters

    cid, resolved = job
    fields: dict[str, Any] = {"n_params": count_parameters(build_model(config_from_dict(resolved).model))}
    try:
        fields["samples_per_s"] = round(measure_throughput(resolved), 1)
    except Exception as exc:  # e.g. out of memory on a GPU: the config stays out of the replay
        fields["samples_per_s"] = None
        fields["throughput_error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
    return cid, fields


def train_run(job: tuple[int, int, dict[str, Any]]) -> dict[str, Any]:
    """Train one (config, seed) with the project's train(), then score it on a small test protocol."""
    import tempfile

    import torch

    from bss_model.config import config_from_dict
    from bss_model.data import load_test
    from bss_model.evaluate import evaluate_model
    from bss_model.runtime import resolve_runtime
    from bss_model.train import train

    cid, seed, resolved = job
    cfg = config_from_dict(resolved)
    t0 = time.time()
    row: dict[str, Any] = {"config": cid, "seed": seed}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            r = train(cfg, out_dir=tmp, splits=_splits(cfg))
            row.update(
                status=r.status,
                reason=r.reason,
                val_mse=[h["val_mse"] for h in r.history],
                samples=[h["samples"] for h in r.history],
            )
            if r.status == "completed":
                from bss_model.checkpoint import load_model

                model, _ = load_model(Path(tmp) / "checkpoint", device="cpu")
                rt = resolve_runtime(cfg.train)
                digit, fashion = load_test(cfg.data)
                with torch.no_grad():
                    ev = evaluate_model(rt.prepare_model(model), digit, fashion, cfg.eval, rt)
                row["test_mse"] = ev["test_mse_mean"]
    except Exception as exc:  # one bad corner (e.g. out of memory) must not stop the table
        row.update(status="error", reason=f"{type(exc).__name__}: {exc}".splitlines()[0], val_mse=[], samples=[])
    row["wall_s"] = round(time.time() - t0, 2)
    return row


def _worker_init(nice: int) -> None:
    if nice:
        os.nice(nice)
    logging.getLogger("bss").setLevel(logging.WARNING)


def build(args: argparse.Namespace) -> dict[str, Any]:
    scale = SCALES[args.scale]
    n_configs = args.configs or scale["configs"]
    noise_configs = min(n_configs, scale["noise_configs"] if args.noise_configs is None else args.noise_configs)
    base = copy.deepcopy(scale["base"])
    if args.epochs:
        base["train"]["epochs"] = args.epochs
    if args.samples_per_epoch:
        base["train"]["samples_per_epoch"] = args.samples_per_epoch
    space = table_space(scale["width_divisor"])
    points = [scale_point(p, scale["width_divisor"]) for p in SEARCH_POINTS]
    params = draw_configs(space, points, n_configs, args.seed)

    out = Path(args.out)
    table: dict[str, Any] = {}
    if out.exists():
        import json

        table = json.loads(out.read_text())
        if table.get("meta", {}).get("base") != base or table.get("space") != space:
            raise SystemExit(f"{out} was built with another base or space: pass another --out, or delete it")
    meta = {"scale": args.scale, "base": base, "draw_seed": args.seed, "machine": machine()}
    # samples_per_s: per second of one core's CPU time (per second of wall time on CUDA).
    meta["throughput_clock"] = "cuda wall" if meta["machine"].get("gpu") else "cpu process time, 1 thread"
    table.setdefault("meta", meta)
    table["space"] = space
    table.setdefault("configs", [])
    table.setdefault("runs", [])
    table["noise"] = {"configs": list(range(noise_configs)), "seeds": scale["noise_seeds"]}
    known = {c["id"]: c for c in table["configs"]}
    for cid, p in enumerate(params):
        if cid not in known:
            known[cid] = {"id": cid, "params": p, "resolved": resolve(base, p, 0)}
            if cid == 0:
                known[cid]["role"] = "reference"
    table["configs"] = [known[i] for i in sorted(known)]

    def save() -> None:
        table["runs"].sort(key=lambda r: (r["config"], r["seed"]))
        atomic_write_json(out, table)

    # Phase 1: throughput, measured in CPU time (robust to the other workers: see measure_throughput).
    todo = [c for c in table["configs"] if "samples_per_s" not in c]
    ctx = mp.get_context("spawn")
    with ctx.Pool(args.workers, initializer=_worker_init, initargs=(args.nice,), maxtasksperchild=20) as pool:
        if todo:
            print(f"throughput: {len(todo)} configs", flush=True)
        for i, (cid, fields) in enumerate(pool.imap(measure_config, [(c["id"], c["resolved"]) for c in todo]), 1):
            known[cid].update(fields)
            print(f"  [{i}/{len(todo)}] config {cid}: {fields.get('samples_per_s')} samples/s", flush=True)
            if i % 10 == 0 or i == len(todo):
                save()

    # Phase 2: the runs, --workers processes side by side.
    done = {(r["config"], r["seed"]) for r in table["runs"]}
    jobs = []
    for c in table["configs"]:
        seeds = range(scale["noise_seeds"]) if c["id"] < noise_configs else range(1)
        for s in seeds:
            if (c["id"], s) not in done:
                jobs.append((c["id"], s, resolve(base, c["params"], s)))
    # In config order, a noise config's extra seeds beside it: a table killed early is a smaller whole table.
    jobs.sort(key=lambda j: (j[1] > 0 and j[0] >= noise_configs, j[0]))
    print(f"training: {len(jobs)} runs to go ({len(done)} done), {args.workers} workers", flush=True)
    t0 = time.time()
    with ctx.Pool(args.workers, initializer=_worker_init, initargs=(args.nice,), maxtasksperchild=20) as pool:
        for k, row in enumerate(pool.imap_unordered(train_run, jobs), 1):
            table["runs"].append(row)
            save()
            last = row["val_mse"][-1] if row["val_mse"] else math.nan
            print(
                f"  [{k}/{len(jobs)}] config {row['config']} seed {row['seed']}: {row['status']} "
                f"val {last:.3e} ({row['wall_s']:.0f} s, {time.time() - t0:.0f} s in)",
                flush=True,
            )
    table["summary"] = summarize(table)
    save()
    return table


def summarize(table: dict[str, Any]) -> dict[str, Any]:
    """What the table says at a glance: counts, the best, the reference, seed noise vs config spread."""
    runs = [r for r in table["runs"] if r["seed"] == 0]
    final = {r["config"]: r["val_mse"][-1] for r in runs if r["status"] == "completed" and r["val_mse"]}
    statuses: dict[str, int] = {}
    for r in runs:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    ref = next((r for r in runs if r["config"] == 0), None)
    out: dict[str, Any] = {"configs": len(table["configs"]), "runs": len(table["runs"]), "status": statuses}
    if final:
        vals = np.array(list(final.values()))
        out.update(best_val_mse=float(vals.min()), median_val_mse=float(np.median(vals)))
        out["log10_val_spread_between_configs"] = float(np.std(np.log10(vals)))
    if ref and len(ref["val_mse"]) >= 2:
        curve = ref["val_mse"]
        out["reference_final_val_mse"] = curve[-1]
        # Still improving: the last quarter of the budget lowered the val MSE by more than seed noise would.
        q = max(1, len(curve) // 4)
        out["reference_last_quarter_gain"] = float(1 - curve[-1] / min(curve[:-q]))
        out["reference_still_improving"] = bool(curve[-1] < min(curve[:-q]))
    noise = []
    for cid in table.get("noise", {}).get("configs", []):
        vals = [r["val_mse"][-1] for r in table["runs"] if r["config"] == cid and r["status"] == "completed"]
        if len(vals) >= 2:
            noise.append(float(np.std(np.log10(vals), ddof=1)))
    if noise:
        out["log10_val_seed_noise_median"] = float(np.median(noise))
        out["noise_configs_measured"] = len(noise)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    p.add_argument("--out", default=None, help="the table (default benchmarks/results/learning-curves-<scale>.json)")
    p.add_argument("--workers", type=int, default=2, help="training processes side by side")
    p.add_argument("--nice", type=int, default=10, help="niceness of the training workers (a shared machine)")
    p.add_argument("--configs", type=int, default=None, help="configurations (default: the scale's)")
    p.add_argument("--noise-configs", type=int, default=None, help="configurations trained over several seeds")
    p.add_argument("--epochs", type=int, default=None, help="override the scale's epochs (tests)")
    p.add_argument("--samples-per-epoch", type=int, default=None, help="override the scale's epoch size (tests)")
    p.add_argument("--seed", type=int, default=0, help="the seed of the configuration draw")
    args = p.parse_args(argv)
    args.out = args.out or str(ROOT / "benchmarks" / "results" / f"learning-curves-{args.scale}.json")
    table = build(args)
    print(table["summary"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
