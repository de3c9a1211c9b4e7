"""Training throughput of the real training step, by batch size and execution mode, side by side.

    python benchmarks/train_throughput.py [--variant seed] [--batch 32 256 1024] [--steps 20] [--reps 5]
                                          [--modes MODE ...] [--device auto] [--threads N] [--json PATH]
    python benchmarks/train_throughput.py --short-run 300 [--variant tiny]      # needs BSS_DATA_DIR

Every mode times ``bss_model.step.TrainStep.run`` -- the very code ``train()`` runs each epoch:
index draws and mixing on the device, forward, loss, backward, the optimizer step, the per-step
cosine learning rate and the finite-loss check. Modes differ only in their ``train.*`` hardware
keys, resolved by ``bss_model.runtime.resolve_runtime`` exactly as a run resolves them. The pairs
come from random uint8 images shaped like the data (speed does not depend on the pixels).

Modes (``train.precision / channels_last / compile / cuda_graphs``):
  eager-fp32          fp32, NCHW, no compile, no graphs: the baseline
  fp32+channels_last  fp32, NHWC
  bf16+channels_last  bf16 autocast, NHWC
  compile             bf16, NHWC, torch.compile (the CUDA default before CUDA graphs)
  graphs              bf16, NHWC, the whole step captured in a CUDA graph          (CUDA only)
  compile+graphs      bf16, NHWC, torch.compile inside the captured graph          (CUDA only)
  auto                the defaults: what a run picks on this device at this batch size

To be fair on a shared, noisy machine the modes are measured *interleaved*: after a warm-up, each
of ``--reps`` rounds times one window of ``--steps`` steps per mode (the order rotates per round),
and the table reports the median window. GFLOP/s = 3 x forward FLOPs x samples/s.

Each batch size starts from a clean compiler state (``torch._dynamo.reset()``), as a trial process
does. On CUDA, ``nvidia-smi`` samples the SM clock and the power draw while the windows run, and
each row gets the medians over its own windows: a compute-bound step at a large batch slows down
when the card holds its power limit, so figures from two machines compare only with their clocks.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bss_model.config import TrainConfig, load_config
from bss_model.data import PairSampler
from bss_model.errors import cli_entry
from bss_model.model import build_model, count_parameters, forward_flops
from bss_model.runtime import apply_torch_settings, cpu_has_native_bf16, native_bf16, resolve_device, resolve_runtime
from bss_model.step import TrainStep, cosine_lr
from bss_model.variants import VARIANTS

MODES: dict[str, dict[str, str]] = {
    "eager-fp32": dict(precision="fp32", channels_last="off", compile="off", cuda_graphs="off"),
    "fp32+channels_last": dict(precision="fp32", channels_last="on", compile="off", cuda_graphs="off"),
    "bf16+channels_last": dict(precision="bf16", channels_last="on", compile="off", cuda_graphs="off"),
    "compile": dict(precision="bf16", channels_last="on", compile="on", cuda_graphs="off"),
    "graphs": dict(precision="bf16", channels_last="on", compile="off", cuda_graphs="on"),
    "compile+graphs": dict(precision="bf16", channels_last="on", compile="on", cuda_graphs="on"),
    "auto": {},
}
CUDA_ONLY = {"graphs", "compile+graphs"}
BASELINE = "eager-fp32"
N_IMAGES = 4096  # per source; random uint8 images standing in for the 54k training images


@dataclass
class Mode:
    name: str
    step: TrainStep | None
    describe: str
    windows: list[float] = field(default_factory=list)  # samples/s per timed window
    spans: list[tuple[float, float]] = field(default_factory=list)  # perf_counter start/end of each window
    error: str = ""


class GpuMonitor:
    """SM clock, power and temperature of one GPU, sampled by ``nvidia-smi -lms`` in the background.

    One long-lived nvidia-smi streams a CSV line per interval, so sampling costs no process start
    per sample and nothing on the CUDA stream. Without nvidia-smi the monitor stays empty and says why.
    """

    FIELDS = ("clocks.sm", "clocks.max.sm", "power.draw", "power.limit", "temperature.gpu")

    def __init__(self, gpu: int | str, interval_ms: int = 100, command: str = "nvidia-smi") -> None:
        self.samples: list[tuple[float, tuple[float, ...]]] = []  # (perf_counter, FIELDS values)
        self.unavailable = ""
        self._proc: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None
        exe = shutil.which(command)
        if exe is None:
            self.unavailable = f"no {command} on PATH"
            return
        query = [exe, f"--id={gpu}", f"--query-gpu={','.join(self.FIELDS)}", "--format=csv,noheader,nounits"]
        self._proc = subprocess.Popen(
            [*query, f"-lms={interval_ms}"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self._proc.stdout:
            try:  # "[N/A]" or "[Not Supported]" fields drop the sample
                values = tuple(float(v) for v in line.split(","))
            except ValueError:
                continue
            if len(values) == len(self.FIELDS):
                self.samples.append((time.perf_counter(), values))

    def close(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)
            self._reader.join(timeout=10)
            if not self.samples and not self.unavailable:
                self.unavailable = f"nvidia-smi gave no readable samples (exit status {self._proc.returncode})"
            self._proc = None

    def summary(self, spans: list[tuple[float, float]]) -> dict[str, float] | None:
        """Medians of the samples taken inside ``spans`` (the SM clock's maximum is the card's)."""
        inside = [v for t, v in self.samples if any(a <= t <= b for a, b in spans)]
        if not inside:
            return None
        column = dict(zip(self.FIELDS, zip(*inside, strict=True), strict=True))
        return {
            "sm_clock_mhz": statistics.median(column["clocks.sm"]),
            "sm_clock_max_mhz": max(column["clocks.max.sm"]),
            "power_w": statistics.median(column["power.draw"]),
            "power_limit_w": max(column["power.limit"]),
            "temperature_c": max(column["temperature.gpu"]),
            "samples": len(inside),
        }


def nvidia_smi_id(device: torch.device) -> str:
    """The card's UUID as nvidia-smi names it: CUDA_VISIBLE_DEVICES renumbers torch's indices, not nvidia-smi's."""
    props = torch.cuda.get_device_properties(device)
    uuid = str(getattr(props, "uuid", "") or "")
    return (uuid if uuid.startswith("GPU-") else f"GPU-{uuid}") if uuid else str(device.index or 0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def default_modes(device: torch.device) -> list[str]:
    modes = [m for m in MODES if device.type == "cuda" or m not in CUDA_ONLY]
    if device.type == "cpu":
        modes.remove("compile")  # minutes of warm-up on a CPU for a few per cent; --modes compile asks for it
        if not cpu_has_native_bf16():
            modes.remove("bf16+channels_last")  # emulated bf16: ~0.05x fp32, measured in earlier runs
    return modes


def build_mode(name: str, template: torch.nn.Module, images: tuple, batch: int, device: torch.device) -> Mode:
    """A TrainStep with a fresh copy of the template's weights, set up the way mode ``name`` trains."""
    t = TrainConfig(device=str(device), batch_size=batch, lr=1e-3, schedule="cosine", **MODES[name])
    rt = resolve_runtime(t)
    model = rt.prepare_model(copy.deepcopy(template))
    sampler = PairSampler(*images, device, seed=0)
    return Mode(name, TrainStep(model, sampler, t, rt), rt.describe())


def time_window(mode: Mode, steps: int, batch: int, start: int, device: torch.device) -> float:
    lr_at = lambda s: cosine_lr(s, 10**6, 0, 1e-3, 1e-5)  # noqa: E731 - the per-step schedule a cosine run pays
    _sync(device)
    t0 = time.perf_counter()
    bad = mode.step.run(steps, lr_at, start=start)
    _sync(device)
    t1 = time.perf_counter()
    if bad:
        raise RuntimeError(f"{mode.name}: non-finite loss")
    mode.spans.append((t0, t1))
    return steps * batch / (t1 - t0)


def benchmark_batch(
    args: argparse.Namespace, batch: int, template, flops: int, device, images, monitor: GpuMonitor | None = None
) -> list[dict]:
    # A trial compiles one batch size in a fresh process; without a reset, this batch size would
    # inherit the previous one's compiled frames and recompile counts.
    torch._dynamo.reset()
    runs: list[Mode] = []
    for name in args.modes:
        t0 = time.perf_counter()
        try:
            mode = build_mode(name, template, images, batch, device)
            mode.step.run(args.warmup, start=0)  # compile, cuDNN autotuning, graph capture
            _sync(device)
        except Exception as exc:  # a mode that cannot run here (e.g. compile without a compiler)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            mode = Mode(name, None, "", error=f"{type(exc).__name__}: {first}"[:200])
        failed = f"  FAILED {mode.error}" if mode.error else ""
        print(f"  batch {batch:>5} warm-up {name:<20} {time.perf_counter() - t0:6.1f} s{failed}", flush=True)
        runs.append(mode)
    live = [m for m in runs if not m.error]
    for rep in range(args.reps if live else 0):
        order = live[rep % len(live) :] + live[: rep % len(live)]
        for mode in order:
            mode.windows.append(time_window(mode, args.steps, batch, args.warmup + rep * args.steps, device))
        print(f"  batch {batch:>5} round {rep + 1}/{args.reps}: "
              + ", ".join(f"{m.name} {m.windows[-1]:.0f}" for m in live), flush=True)  # fmt: skip
    base = next((statistics.median(m.windows) for m in live if m.name == BASELINE), float("nan"))
    rows = []
    for mode in runs:
        row: dict[str, Any] = {"batch": batch, "mode": mode.name, "runtime": mode.describe}
        if mode.error:
            row["error"] = mode.error
        else:
            sps = statistics.median(mode.windows)
            row.update(samples_per_s=sps, windows=mode.windows, gflops=3 * flops * sps / 1e9, vs_eager=sps / base)
            gpu = monitor.summary(mode.spans) if monitor is not None else None
            if gpu is not None:
                row["gpu"] = gpu
        rows.append(row)
    for mode in runs:  # free the graphs' memory pools before the next batch size
        mode.step = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(args.device)
    args.modes = args.modes or default_modes(device)
    if BASELINE not in args.modes:
        args.modes.insert(0, BASELINE)
    apply_torch_settings(resolve_runtime(TrainConfig(device=str(device))), args.threads)
    cfg = load_config(None, [f"model.variant={args.variant}"])
    torch.manual_seed(args.seed)
    template = build_model(cfg.model)
    flops = forward_flops(template)
    rng = np.random.default_rng(args.seed)
    images = tuple(torch.from_numpy(rng.integers(0, 256, (N_IMAGES, 32, 32), dtype=np.uint8)).to(device) for _ in "df")
    monitor = GpuMonitor(nvidia_smi_id(device)) if device.type == "cuda" else None
    try:
        rows = [r for b in args.batch for r in benchmark_batch(args, b, template, flops, device, images, monitor)]
    finally:
        if monitor is not None:
            monitor.close()
    return {
        "variant": args.variant,
        "n_params": count_parameters(template),
        "forward_gflop_per_sample": flops / 1e9,
        "steps": args.steps,
        "warmup": args.warmup,
        "reps": args.reps,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "native_bf16": native_bf16(device),  # emulated bf16 (a V100, a T4, an AVX2-only CPU) is not native
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu_telemetry": None if monitor is None else (monitor.unavailable or "nvidia-smi"),
        "results": rows,
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
        f"GFLOP/sample device={report['device']} ({report['device_name']}) threads={report['threads']} "
        f"native_bf16={report['native_bf16']} torch={report['torch']}"
    )
    print(f"samples/s, median of {report['reps']} interleaved windows of {report['steps']} steps of TrainStep.run")
    gpu = any("gpu" in row for row in report["results"])
    header = f"{'batch':>6} {'mode':<20} {'samples/s':>10} {'min..max':>17} {'GFLOP/s':>9} {'vs eager':>9}"
    header += f" {'SM MHz':>7} {'power W':>8}" if gpu else ""
    print(header)
    print("-" * len(header))
    for row in report["results"]:
        if "error" in row:
            print(f"{row['batch']:>6} {row['mode']:<20} failed: {row['error']}")
            continue
        w = row["windows"]
        spread = f"{min(w):.0f}..{max(w):.0f}"
        line = (
            f"{row['batch']:>6} {row['mode']:<20} {row['samples_per_s']:>10.0f} {spread:>17} {row['gflops']:>9.1f} "
            f"{row['vs_eager']:>8.2f}x"
        )
        if "gpu" in row:
            line += f" {row['gpu']['sm_clock_mhz']:>7.0f} {row['gpu']['power_w']:>8.0f}"
        print(line)
    for row in report["results"]:
        if row["mode"] == "auto" and "error" not in row:
            print(f"auto at batch {row['batch']}: {row['runtime']}")
    limits = [(r["gpu"]["sm_clock_max_mhz"], r["gpu"]["power_limit_w"]) for r in report["results"] if "gpu" in r]
    if limits:
        print(f"GPU: SM clock up to {max(c for c, _ in limits):.0f} MHz, power limit {max(w for _, w in limits):.0f} W "
              "(medians over each row's windows, from nvidia-smi)")  # fmt: skip
    elif report.get("gpu_telemetry") not in (None, "nvidia-smi"):
        print(f"GPU clocks not recorded: {report['gpu_telemetry']}")


def short_run(args: argparse.Namespace) -> dict[str, Any]:
    """Train the variant for N steps as eager fp32 and as the default path; compare validation MSE."""
    from bss_model.train import train

    batch = args.batch[0]
    common = [
        f"model.variant={args.variant}",
        "data.download=false",  # real data from BSS_DATA_DIR; never download here
        f"data.val_pairs={args.val_pairs}",
        "train.epochs=1",
        f"train.samples_per_epoch={args.short_run * batch}",  # exactly short_run steps
        f"train.batch_size={batch}",
        f"train.seed={args.seed}",
        f"train.device={args.device}",
        f"train.threads={args.threads}",
        "train.tensorboard=false",
    ]
    paths = {"eager-fp32": [f"train.{k}={v}" for k, v in MODES[BASELINE].items()], "auto": []}
    out: dict[str, Any] = {"variant": args.variant, "steps": args.short_run, "batch": batch}
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
    fp32, auto = out["eager-fp32"]["val_mse"], out["auto"]["val_mse"]
    out["ratio_auto_vs_fp32"] = auto / fp32
    out["no_worse"] = bool(auto <= fp32 * (1 + args.tolerance))
    return out


def print_short_run(report: dict[str, Any], tolerance: float) -> None:
    print()
    print(f"short run: variant={report['variant']} {report['steps']} steps x batch {report['batch']}, same seed")
    print(f"{'path':<12} {'val MSE':>10} {'wall s':>8}  runtime")
    for name in ("eager-fp32", "auto"):
        r = report[name]
        print(f"{name:<12} {r['val_mse']:>10.5f} {r['wall_s']:>8.1f}  {r['runtime']} ({r['status']})")
    verdict = "no worse" if report["no_worse"] else "WORSE"
    print(f"auto / eager-fp32 = {report['ratio_auto_vs_fp32']:.4f}: {verdict} (tolerance {tolerance:.0%})")


@cli_entry  # a user error (no data, bad variant) prints one line and exits 2
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", default=None, choices=sorted(VARIANTS), help="default: seed (tiny with --short-run)")
    p.add_argument(
        "--batch", type=int, nargs="+", default=None, help="batch sizes (default: 32 256 1024 on CUDA, 32 on CPU)"
    )
    p.add_argument("--steps", type=int, default=None, help="steps per timed window (default: 50 on CUDA, 3 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per mode first (default: 10 CUDA, 1 CPU)")
    p.add_argument("--reps", type=int, default=5, help="timed windows per mode (interleaved); the median is reported")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=None, help="default: every mode this device runs")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads; 0 = torch's default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--short-run", type=int, default=0, metavar="N",
                   help="instead: train N steps as eager fp32 and as auto on the real data "
                        "(BSS_DATA_DIR) and compare validation MSE")  # fmt: skip
    p.add_argument("--val-pairs", type=int, default=2000, help="validation pairs for --short-run")
    p.add_argument("--tolerance", type=float, default=0.02, help="--short-run: relative slack for 'no worse'")
    args = p.parse_args(argv)
    cuda = resolve_device(args.device).type == "cuda"
    args.variant = args.variant or ("tiny" if args.short_run else "seed")
    args.batch = args.batch or ([32, 256, 1024] if cuda and not args.short_run else [32])
    args.steps = args.steps or (50 if cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 1)
    for name in ("steps", "reps"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if min(args.batch) < 1:
        p.error("--batch sizes must be >= 1")

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
    sys.stdout.flush()
    return status


if __name__ == "__main__":
    raise SystemExit(main())
