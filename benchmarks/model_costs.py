"""The costs of every configuration of the learning-curve table, for the multi-objective replay.

    python benchmarks/model_costs.py [--table FILE] [--out FILE] [--batch 1] [--repeats 5]
    python benchmarks/model_costs.py --models results/x/best_model.pt results/x/picks/y/best_model.pt [--json OUT]

For each configuration: ``params`` and ``macs`` (counted, search/costs.py) and ``cpu_ms`` -- measured, not derived
from the table's training throughput (a training step's samples/s mixes the backward pass, the optimiser and the
batch size the config trains with into a number that is not an inference latency). Every configuration is timed in
this one process, one after another, on one thread, with search/costs.py's own timer (median of ``--repeats``
blocks), so the figures are side by side on one machine; two more passes over the first ``--noise`` configurations
give the spread of the measurement. The file records the CPU model and the precision beside them.

``--models``: the same costs of trained models (best_model.pt files), timed side by side in one process, in turns
(``--rounds`` rounds of each model in order), so their ratio is measured under the same conditions.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from bss_model.config import with_overrides  # noqa: E402
from bss_model.model import build_model  # noqa: E402
from search.costs import cpu_model, latency_ms, model_costs  # noqa: E402

DEFAULT_TABLE = ROOT / "benchmarks" / "results" / "learning-curves-cpu.json"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--table", default=str(DEFAULT_TABLE))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "learning-curves-cpu-costs.json"))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--noise", type=int, default=10, help="configs timed twice more, for the measurement's spread")
    p.add_argument("--models", nargs="+", default=None, help="time these checkpoints side by side instead")
    p.add_argument("--rounds", type=int, default=3, help="with --models: timings of each model, in turns")
    p.add_argument("--json", default=None, help="with --models: write the timings here")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)  # the timer uses one thread anyway; the model building too
    if args.models:
        return time_models(args)
    table = json.loads(Path(args.table).read_text())
    rows, t0 = [], time.time()
    for i, c in enumerate(table["configs"]):
        model = with_overrides(table["meta"]["base"], c["params"]).model
        costs = model_costs(model, measure=("cpu_ms",), batch=args.batch, repeats=args.repeats)
        if c.get("n_params") is not None and c["n_params"] != costs["params"]:
            raise SystemExit(f"config {c['id']}: {costs['params']} params here, {c['n_params']} in the table")
        # The same model on the wall clock, right after: what the thread-CPU-time clock spares a shared machine.
        wall, _ = latency_ms(build_model(model), "cpu", args.batch, args.repeats, clock="wall")
        rows.append({"id": c["id"], **{k: costs[k] for k in ("params", "macs", "cpu_ms")}, "cpu_ms_wall": wall})
        print(f"{i + 1}/{len(table['configs'])} config {c['id']}: {costs['params']:,} params, {costs['macs']:,} MACs, "
              f"{costs['cpu_ms']:.3f} ms", flush=True)  # fmt: skip
    noise = []
    for c in table["configs"][: args.noise]:
        model = with_overrides(table["meta"]["base"], c["params"]).model
        first = next(r for r in rows if r["id"] == c["id"])
        entry = {"id": c["id"]}
        for key, clock in (("cpu_ms", "thread"), ("cpu_ms_wall", "wall")):
            again = [latency_ms(build_model(model), "cpu", args.batch, args.repeats, clock=clock)[0] for _ in range(2)]
            times = [first[key], *again]
            entry[key], entry[f"{key}_spread"] = times, max(times) / min(times)
        noise.append(entry)
    out = {
        "table": str(Path(args.table).name),
        "measured": {
            "cpu_ms": f"median latency of one forward pass of a batch of {args.batch} on one CPU thread, "
            f"{costs['cpu_precision']} (what train.precision=auto picks for inference here), channels_last, "
            f"eager; torch.utils.benchmark, {args.repeats} blocks of >= 0.2 s, on the thread's CPU-time clock "
            "(search/costs.py)",
            "cpu_ms_wall": "the same, timed right after on the wall clock",
            "macs": "forward multiply-accumulates per 32x32 sample (torch.utils.flop_counter.FlopCounterMode / 2)",
            "params": "parameter count (equal to the table's n_params, checked)",
        },
        "machine": {
            "cpu_model": cpu_model(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": 1,
        },  # fmt: skip
        "latency_batch": args.batch,
        "wall_s": round(time.time() - t0, 1),
        "configs": rows,
        "noise": noise,
    }
    Path(args.out).write_text(json.dumps(out, indent=1))
    for key in ("cpu_ms", "cpu_ms_wall"):
        spreads = sorted(n[f"{key}_spread"] for n in noise)
        if spreads:
            mid = spreads[len(spreads) // 2]
            print(f"{key}: spread (max/min of 3 timings) over {len(spreads)} configs: median {mid:.3f}, "
                  f"max {spreads[-1]:.3f}")  # fmt: skip
    print(f"wrote {args.out} in {out['wall_s']} s")
    return 0


def time_models(args: argparse.Namespace) -> int:
    import statistics

    from bss_model.checkpoint import load_model

    models = {}
    for path in args.models:
        model, cfg = load_model(path)
        models[path] = (model, model_costs(cfg.model))
    timings: dict[str, list[float]] = {path: [] for path in models}
    precision = ""
    for _ in range(args.rounds):  # in turns: a change in the machine's load falls on every model alike
        for path, (model, _) in models.items():
            ms, precision = latency_ms(model, "cpu", args.batch, args.repeats)
            timings[path].append(ms)
    rows = []
    for path, (_, costs) in models.items():
        ms = statistics.median(timings[path])
        rows.append({"model": path, **costs, "cpu_ms": ms, "cpu_ms_rounds": timings[path]})
        print(f"{path}: {costs['params']:,} params, {costs['macs']:,} MACs, cpu_ms {ms:.3f} "
              f"(rounds {', '.join(f'{t:.3f}' for t in timings[path])})")  # fmt: skip
    first = rows[0]["cpu_ms"]
    for r in rows[1:]:
        print(f"{r['model']}: {r['cpu_ms'] / first:.2f}x the latency of {rows[0]['model']}")
    out = {"measured": f"batch {args.batch}, one thread, {precision}, thread CPU-time clock, median of "
                       f"{args.rounds} rounds of {args.repeats} blocks (search/costs.py)",
           "machine": {"cpu_model": cpu_model(), "platform": platform.platform()}, "models": rows}  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
