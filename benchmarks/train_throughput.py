"""Training throughput of one U-Net variant under several execution modes, side by side.

    python benchmarks/train_throughput.py [--variant seed] [--batch 32] [--steps 3] [--warmup 1] [--reps 5]
                                          [--device auto] [--modes MODE ...] [--all] [--compile] [--threads N]
                                          [--json PATH]
    python benchmarks/train_throughput.py --short-run 300 [--variant tiny]      # needs BSS_DATA_DIR

A step is what ``bss_model.train`` does per step: forward, MSE, backward, Adam. The data are
random tensors shaped like the real mixtures (targets uniform in [0, 1], x = their mean), made up
front from fixed seeds, so only the model is timed. Every mode gets its own copy of the same
initial weights.

Modes:
  eager-fp32          the baseline: plain eager fp32, contiguous NCHW, built without bss_model.runtime
  fp32+channels_last  fp32, NHWC memory format
  bf16                bf16 autocast, NCHW
  bf16+channels_last  bf16 autocast, NHWC
  default             whatever bss_model.runtime.resolve_runtime(TrainConfig()) picks on this device
  compile             (--compile) torch.compile of fp32+channels_last
  compile-bf16        (--compile) torch.compile of bf16+channels_last

To be fair on a shared, noisy machine the modes are measured *interleaved*: after a warm-up, each
of ``--reps`` rounds times one window of ``--steps`` steps per mode (the mode order rotates per
round), and the table reports the median window. GFLOP/s = 3 x forward FLOPs x samples/s (forward
plus the two backward matmuls per conv).

On a CPU without native bf16 (no AVX-512 BF16 / AMX, e.g. an AVX2 EPYC) PyTorch emulates bf16 at
a fraction of fp32's speed, so the bf16 modes are skipped there unless ``--all`` is given, and
then run ``--slow-steps`` steps per window.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bss_model.config import TrainConfig, load_config
from bss_model.errors import cli_entry
from bss_model.model import build_model, count_parameters, forward_flops
from bss_model.runtime import cpu_has_native_bf16, resolve_runtime
from bss_model.variants import VARIANTS

BASE_MODES = ["eager-fp32", "fp32+channels_last", "bf16", "bf16+channels_last", "default"]
COMPILE_MODES = ["compile", "compile-bf16"]
ALL_MODES = BASE_MODES + COMPILE_MODES
BASELINE = "eager-fp32"
N_BATCHES = 4  # distinct pre-made batches, cycled


@dataclass
class Mode:
    name: str
    model: torch.nn.Module  # owns the weights
    net: Callable[[torch.Tensor], torch.Tensor]  # what is called (maybe compiled)
    channels_last: bool
    autocast: Callable[[], contextlib.AbstractContextManager]
    steps: int
    note: str = ""
    windows: list[float] = field(default_factory=list)  # samples/s per timed window
    error: str = ""


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _native_bf16(device: torch.device) -> bool:
    return torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_native_bf16()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _make_batches(batch: int, device: torch.device, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(N_BATCHES):
        y = torch.rand(batch, 2, 32, 32, generator=g)
        x = y.mean(dim=1, keepdim=True)  # the mixture (a + b) / 2
        out.append((x.to(device), y.to(device)))
    return out


def _bf16_autocast(device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def build_mode(name: str, template: torch.nn.Module, device: torch.device, steps: int) -> Mode:
    """A fresh copy of the template's weights, set up the way mode ``name`` trains."""
    model = copy.deepcopy(template)
    null = contextlib.nullcontext
    if name == "eager-fp32":  # no bss_model.runtime here: the plain baseline
        model = model.to(device)
        return Mode(name, model, model, False, null, steps)
    if name == "default":
        rt = resolve_runtime(TrainConfig(device=str(device)))
        net = rt.prepare_model(model)  # Module.to works in place: `model` still owns the (moved) weights
        return Mode(name, model, net, rt.channels_last, rt.autocast, steps, note=rt.describe())
    bf16 = "bf16" in name
    channels_last = "channels_last" in name or name.startswith("compile")
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = torch.compile(model) if name.startswith("compile") else model
    return Mode(name, model, net, channels_last, _bf16_autocast(device) if bf16 else null, steps)


def run_steps(mode: Mode, opt: torch.optim.Optimizer, batches, n: int, start: int) -> None:
    loss = torch.zeros(())
    for i in range(n):
        x, y = batches[(start + i) % len(batches)]
        if mode.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with mode.autocast():
            pred = mode.net(x)
        loss = F.mse_loss(pred.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if not torch.isfinite(loss):
        raise RuntimeError(f"{mode.name}: non-finite loss")


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    device = _device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(None, [f"model.variant={args.variant}"])
    torch.manual_seed(args.seed)
    template = build_model(cfg.model)
    flops = forward_flops(template)
    native_bf16 = _native_bf16(device)

    modes = list(args.modes or BASE_MODES)
    if args.compile:
        modes += [m for m in COMPILE_MODES if m not in modes]
    notes = []
    slow = [m for m in modes if "bf16" in m] if not native_bf16 else []
    if slow and not args.all:
        modes = [m for m in modes if m not in slow]
        notes.append(
            f"skipped {', '.join(slow)}: this {device.type} has no native bf16 (AVX-512 BF16 / AMX), so PyTorch "
            "emulates it at a fraction of fp32's speed; pass --all to measure them anyway"
        )
    elif slow:
        notes.append(f"{', '.join(slow)}: emulated bf16 on this CPU, timed over {args.slow_steps} step(s) per window")
    if BASELINE not in modes:
        modes.insert(0, BASELINE)

    batches = _make_batches(args.batch, device, args.seed)
    runs: list[Mode] = []
    for name in modes:
        steps = args.slow_steps if name in slow else args.steps
        mode = build_mode(name, template, device, steps)
        runs.append(mode)
    opts = {m.name: torch.optim.Adam(m.model.parameters(), lr=1e-3) for m in runs}

    # Warm-up (allocator, oneDNN primitive caches, cuDNN autotuning, torch.compile).
    for mode in runs:
        t0 = time.perf_counter()
        warmup = min(args.warmup, 1) if mode.name in slow else args.warmup
        try:
            run_steps(mode, opts[mode.name], batches, warmup, 0)
            _sync(device)
        except Exception as exc:  # a mode that cannot run here (e.g. compile without a compiler)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            mode.error = f"{type(exc).__name__}: {first}"
        failed = f"  FAILED {mode.error}" if mode.error else ""
        print(f"  warm-up {mode.name:<20} {time.perf_counter() - t0:6.1f} s{failed}")
        sys.stdout.flush()

    # Timed windows, interleaved round-robin; the order rotates so no mode always runs first.
    live = [m for m in runs if not m.error]
    for rep in range(args.reps if live else 0):
        order = live[rep % len(live) :] + live[: rep % len(live)]
        for mode in order:
            _sync(device)
            t0 = time.perf_counter()
            run_steps(mode, opts[mode.name], batches, mode.steps, rep * mode.steps)
            _sync(device)
            mode.windows.append(mode.steps * args.batch / (time.perf_counter() - t0))
        print(f"  round {rep + 1}/{args.reps}: " + ", ".join(f"{m.name} {m.windows[-1]:.1f}" for m in live))
        sys.stdout.flush()

    base_windows = next(m for m in runs if m.name == BASELINE).windows
    base = statistics.median(base_windows) if base_windows else float("nan")
    results = []
    for mode in runs:
        row: dict[str, Any] = {"mode": mode.name, "steps_per_window": mode.steps, "note": mode.note}
        if mode.error:
            row.update(error=mode.error)
        else:
            sps = statistics.median(mode.windows)
            row.update(
                samples_per_s=sps,
                samples_per_s_windows=mode.windows,
                gflops=3 * flops * sps / 1e9,
                ratio_vs_eager_fp32=sps / base,
            )
        results.append(row)
    return {
        "variant": args.variant,
        "n_params": count_parameters(template),
        "forward_gflop_per_sample": flops / 1e9,
        "batch": args.batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "reps": args.reps,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "native_bf16": native_bf16,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "notes": notes,
        "results": results,
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def print_table(report: dict[str, Any]) -> None:
    print()
    print(
        f"variant={report['variant']} params={report['n_params']:,} forward={report['forward_gflop_per_sample']:.3f} "
        f"GFLOP/sample batch={report['batch']} device={report['device']} ({report['device_name']}) "
        f"threads={report['threads']} native_bf16={report['native_bf16']} torch={report['torch']}"
    )
    print(f"median of {report['reps']} interleaved windows of {report['steps']} steps (warm-up {report['warmup']})")
    header = f"{'mode':<20} {'samples/s':>10} {'min..max':>15} {'GFLOP/s':>9} {'vs eager-fp32':>14}"
    print(header)
    print("-" * len(header))
    for row in report["results"]:
        if "error" in row:
            print(f"{row['mode']:<20} {'failed: ' + row['error']}")
            continue
        w = row["samples_per_s_windows"]
        spread = f"{min(w):.1f}..{max(w):.1f}"
        print(
            f"{row['mode']:<20} {row['samples_per_s']:>10.1f} {spread:>15} {row['gflops']:>9.1f} "
            f"{row['ratio_vs_eager_fp32']:>13.2f}x"
        )
    for row in report["results"]:
        if row["note"]:
            print(f"{row['mode']}: {row['note']}")
        if row.get("steps_per_window") != report["steps"] and "error" not in row:
            print(f"{row['mode']}: {row['steps_per_window']} step(s) per window")
    spreads = [
        max(r["samples_per_s_windows"]) / min(r["samples_per_s_windows"]) for r in report["results"] if "error" not in r
    ]
    if spreads and max(spreads) > 1.5:
        print(
            f"note: windows of one mode differ up to {max(spreads):.1f}x: the machine is busy (shared CPU); "
            "compare medians with care, rerun, or try --threads 1"
        )
    for note in report["notes"]:
        print(f"note: {note}")


def short_run(args: argparse.Namespace) -> dict[str, Any]:
    """Train the variant for N steps as eager fp32 and as the default path; compare validation MSE."""
    from bss_model.train import train

    common = [
        f"model.variant={args.variant}",
        "data.download=false",  # real data from BSS_DATA_DIR; never download here
        f"data.val_pairs={args.val_pairs}",
        "train.epochs=1",
        f"train.samples_per_epoch={args.short_run * args.batch}",  # exactly short_run steps
        f"train.batch_size={args.batch}",
        f"train.seed={args.seed}",
        f"train.device={args.device}",
        f"train.threads={args.threads}",
        "train.tensorboard=false",
    ]
    paths = {
        "eager-fp32": ["train.precision=fp32", "train.channels_last=off", "train.compile=off"],
        "default": [],
    }
    out: dict[str, Any] = {"variant": args.variant, "steps": args.short_run, "batch": args.batch}
    with tempfile.TemporaryDirectory(prefix="bss-short-run-") as tmp:
        for name, sets in paths.items():
            cfg = load_config(None, common + sets)
            t0 = time.perf_counter()
            result = train(cfg, out_dir=Path(tmp) / name)
            out[name] = {
                "status": result.status,
                "val_mse": result.metrics.get("val_mse", float("nan")),
                "runtime": resolve_runtime(cfg.train).describe(),
                "wall_s": time.perf_counter() - t0,
            }
    fp32, default = out["eager-fp32"]["val_mse"], out["default"]["val_mse"]
    out["ratio_default_vs_fp32"] = default / fp32
    out["no_worse"] = bool(default <= fp32 * (1 + args.tolerance))
    return out


def print_short_run(report: dict[str, Any], tolerance: float) -> None:
    print()
    print(f"short run: variant={report['variant']} {report['steps']} steps x batch {report['batch']}, same seed")
    print(f"{'path':<12} {'val MSE':>10} {'wall s':>8}  runtime")
    for name in ("eager-fp32", "default"):
        r = report[name]
        print(f"{name:<12} {r['val_mse']:>10.5f} {r['wall_s']:>8.1f}  {r['runtime']} ({r['status']})")
    verdict = "no worse" if report["no_worse"] else "WORSE"
    print(f"default / eager-fp32 = {report['ratio_default_vs_fp32']:.4f}: {verdict} (tolerance {tolerance:.0%})")


@cli_entry  # a user error (no data, bad variant) prints one line and exits 2
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", default=None, choices=sorted(VARIANTS), help="default: seed (tiny with --short-run)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=3, help="steps per timed window")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per mode before timing (>= 1 advised)")
    p.add_argument("--reps", type=int, default=5, help="timed windows per mode (interleaved); the median is reported")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--modes", nargs="+", choices=ALL_MODES, default=None, help=f"default: {' '.join(BASE_MODES)}")
    p.add_argument("--compile", action="store_true", help="also measure the torch.compile modes")
    p.add_argument("--all", action="store_true", help="include bf16 modes on CPUs that only emulate bf16")
    p.add_argument("--slow-steps", type=int, default=1, help="steps per window for emulated-bf16 modes (--all)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads; 0 = torch's default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--short-run", type=int, default=0, metavar="N",
                   help="instead: train N steps as eager fp32 and as the default path on the real data "
                        "(BSS_DATA_DIR) and compare validation MSE")  # fmt: skip
    p.add_argument("--val-pairs", type=int, default=2000, help="validation pairs for --short-run")
    p.add_argument("--tolerance", type=float, default=0.02, help="--short-run: relative slack for 'no worse'")
    args = p.parse_args(argv)
    if args.variant is None:
        args.variant = "tiny" if args.short_run else "seed"
    for name in ("batch", "steps", "reps", "slow_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")

    status = 0
    if args.short_run:
        report = short_run(args)
        print_short_run(report, args.tolerance)
        status = 0 if report["no_worse"] else 1
    else:
        print(f"benchmarking {args.variant}: warm-up, then {args.reps} interleaved rounds (samples/s per window)")
        report = benchmark(args)
        print_table(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
