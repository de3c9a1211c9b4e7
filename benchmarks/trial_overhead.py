"""What a trial costs besides its training: Ray's actor start, imports, the data, the model; and what cuts it.

    python benchmarks/trial_overhead.py [--trials 10] [--rounds 3] [--json OUT]

A budgeted search time-boxes its trials (search/budget.py), so every second a trial spends starting is a
second it does not train. This runs the project's own trainable (search/trainable.py) through Tune on a
local Ray, with trials that train a tiny model for a fraction of a second, four ways:

    fresh           a new actor per trial, each trial reading and checking the data files (the default)
    reuse           Tune's reuse_actors: the next trial runs in the actor the last one used
    shared          the data loaded once in the driver and passed through Ray's object store
    reuse+shared    both (what a budgeted search on CPUs does)

Per trial: overhead = (workers x the search's wall time - the trials' own epoch time) / trials. The four
are run round-robin, ``--rounds`` times, in one process on one Ray: ratios side by side, as the machine's
load drifts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from bss_model.io import atomic_write_json  # noqa: E402

VARIANTS = {"fresh": (False, False), "reuse": (True, False), "shared": (False, True), "reuse+shared": (True, True)}
TINY = ["model.variant=tiny", "train.epochs=1", "train.samples_per_epoch=640", "data.val_pairs=200",
        "train.tensorboard=false", "train.image_every=0"]  # fmt: skip


def one_search(name: str, reuse: bool, shared: bool, trials: int, workers: int, storage: Path, splits: Any) -> dict:
    from ray import tune

    from bss_model.config import load_config
    from search.trainable import train_trial

    base = load_config(None, TINY)
    fn = tune.with_parameters(train_trial, base=base.to_dict(), splits=splits if shared else None)
    tuner = tune.Tuner(
        tune.with_resources(fn, {"cpu": 1}),
        param_space={"train.seed": tune.grid_search(list(range(trials)))},
        tune_config=tune.TuneConfig(max_concurrent_trials=workers, reuse_actors=reuse),
        run_config=tune.RunConfig(name=name, storage_path=str(storage), verbose=0),
    )
    t0 = time.perf_counter()
    results = tuner.fit()
    wall = time.perf_counter() - t0
    epochs = [r.metrics["epoch_time_s"] for r in results if r.metrics and "epoch_time_s" in r.metrics]
    if len(epochs) != trials:
        raise RuntimeError(f"{name}: {len(epochs)} of {trials} trials reported")
    return {"wall_s": wall, "train_s": sum(epochs), "overhead_s": (workers * wall - sum(epochs)) / trials}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, default=min(2, len(os.sched_getaffinity(0))))
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "trial-overhead-cpu.json"))
    args = p.parse_args(argv)
    import ray

    from bss_model.config import load_config
    from bss_model.data import load_splits
    from search.cluster import WORKER_SETUP

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    ray.init(address="local", num_cpus=args.workers, include_dashboard=False, runtime_env=WORKER_SETUP,
             logging_level="WARNING")  # fmt: skip
    splits = load_splits(load_config(None, TINY).data)
    rows: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, (reuse, shared) in VARIANTS.items():
                row = one_search(f"{name}-{r}", reuse, shared, args.trials, args.workers, Path(tmp), splits)
                rows[name].append(row)
                print(f"round {r} {name}: {row['overhead_s']:.2f} s per trial ({row['wall_s']:.1f} s wall)", flush=True)
    ray.shutdown()
    from benchmarks.time_to_quality import machine

    summary = {name: statistics.median(x["overhead_s"] for x in v) for name, v in rows.items()}
    data = {
        "machine": machine(),
        "trials": args.trials,
        "workers": args.workers,
        "rounds": args.rounds,
        "runs": rows,
        "median_overhead_s": summary,
        "ratio_to_fresh": {name: summary[name] / summary["fresh"] for name in summary},
    }
    atomic_write_json(Path(args.json), data)
    print("| trials | overhead per trial (median of rounds) | vs fresh |\n|---|---|---|")
    for name, s in summary.items():
        print(f"| {name} | {s:.2f} s | {s / summary['fresh']:.2f}x |")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
