"""What a model costs to run: its parameters, its multiply-accumulates, and its measured latency on a CPU or a GPU.

These are the costs a multi-objective search can put beside validation MSE (``tune.objectives``):

    params   the parameter count
    macs     forward multiply-accumulates per sample, as torch's FlopCounterMode counts them (FLOPs / 2) for one
             32x32 input: convolutions and transposed convolutions; ReLU, pooling, batch norm and the head's
             additions are not multiply-accumulates and are not counted
    cpu_ms   the median latency of one forward pass of a batch of ``batch`` images on ONE CPU thread, in the
             precision and memory format ``train.precision: auto`` picks for inference on that CPU (bf16 autocast
             where the CPU has native bf16, as this project's AVX-512 BF16 EPYC has; else fp32) and never compiled.
             The number only holds for that kind of CPU: ``cpu_model()`` is recorded beside it.
    gpu_ms   the same on the trial's GPU (auto precision: bf16 where the GPU supports it; eager, no CUDA graph)

Latencies are measured with ``torch.utils.benchmark.Timer``: a warm-up, then ``blocked_autorange`` (blocks of
runs until ``min_run_time`` has passed), repeated ``repeats`` times; the result is the median over all blocks.
The weights do not matter to the time, so a freshly built model is timed.

Fair on a shared machine: a trial measures its cpu_ms once, at its start, while other trials train beside it.
With a wall clock, every time the scheduler gives its core to another process the block gets longer: on this
2-core machine under load, three timings of one model differed by a median 4.8x (benchmarks/model_costs.py,
first run). So cpu_ms is timed on the measuring thread's own CPU-time clock (``time.thread_time``): the one
inference thread is only charged while it runs, which is the latency the model has on a core of its own -- on an
idle core the two clocks agree (the same file records both). gpu_ms uses the wall clock, the device synchronised.
"""

from __future__ import annotations

import dataclasses
import math
import platform
from functools import cache
from typing import Any

import torch

from bss_model.config import Config, ModelConfig
from bss_model.model import build_model, count_parameters
from bss_model.runtime import resolve_runtime
from search.objectives import MEASURED

IMAGE = 32  # the model's input size


@cache
def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo's, else the platform's), recorded beside every cpu_ms."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def gpu_model(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


def count_macs(model: torch.nn.Module, size: int = IMAGE) -> int:
    """Forward multiply-accumulates for one ``size`` x ``size`` sample, counted by FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    try:
        x = torch.zeros(1, 1, size, size, device=next(model.parameters()).device)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops()) // 2


def _inference_runtime(device: str) -> Any:
    """What ``auto`` picks for inference on ``device``: its precision and memory format, no compile, no graphs."""
    train = dataclasses.replace(Config().train, device=device, precision="auto", channels_last="auto",
                                compile="off", cuda_graphs="off")  # fmt: skip
    return resolve_runtime(train)


def latency_ms(
    model: torch.nn.Module,
    device: str,
    batch: int,
    repeats: int = 5,
    min_run_time: float = 0.2,
    clock: str = "thread",
) -> tuple[float, str]:
    """The median latency in ms of one forward pass of ``batch`` images, and the precision it ran in.

    On a CPU the timer runs on one thread (``Timer(num_threads=1)``, which restores the thread count after), on
    that thread's CPU-time clock (``clock="wall"``: the wall clock, for comparison); on a GPU it times the wall
    clock and synchronises the device around each block, as torch.utils.benchmark's default timer does.
    """
    import time

    from torch.utils import benchmark

    runtime = _inference_runtime(device)
    model = runtime.prepare_model(model).eval()
    x = torch.rand(batch, 1, IMAGE, IMAGE, device=runtime.device)
    if runtime.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def forward() -> None:
        with torch.inference_mode(), runtime.autocast():
            model(x)

    cpu = runtime.device.type == "cpu"
    options = {"num_threads": 1, "timer": time.thread_time if clock == "thread" else time.perf_counter} if cpu else {}
    timer = benchmark.Timer(stmt="forward()", globals={"forward": forward}, **options)
    timer.timeit(3)  # warm-up: oneDNN picks its kernels, the allocator its blocks
    times: list[float] = []
    for _ in range(repeats):
        times += timer.blocked_autorange(min_run_time=min_run_time).times
    median = float(torch.tensor(times).median()) * 1e3
    return median, "bf16" if runtime.bf16 else "fp32"


def model_costs(
    model_cfg: ModelConfig, measure: tuple[str, ...] = (), batch: int = 1, repeats: int = 5
) -> dict[str, Any]:
    """The costs of the U-Net ``model_cfg``: always ``params`` and ``macs`` (counted), and the latencies named in
    ``measure`` (``cpu_ms``, ``gpu_ms``) with what they hold for: ``latency_batch``, ``cpu_model`` / ``gpu_model``
    and the precision they ran in."""
    model = build_model(model_cfg)
    out: dict[str, Any] = {"params": count_parameters(model), "macs": count_macs(model)}
    if "cpu_ms" in measure:
        out["cpu_ms"], out["cpu_precision"] = latency_ms(model, "cpu", batch, repeats)
        out["cpu_model"] = cpu_model()
    if "gpu_ms" in measure:
        device = torch.device("cuda", torch.cuda.current_device())
        out["gpu_ms"], out["gpu_precision"] = latency_ms(model, str(device), batch, repeats)
        out["gpu_model"] = gpu_model(device)
    if measure:
        out["latency_batch"] = batch
    for key in MEASURED:
        if key in out and not (math.isfinite(out[key]) and out[key] > 0):
            raise RuntimeError(f"{key} measured as {out[key]!r}: the timer failed")
    return out
