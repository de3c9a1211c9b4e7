"""Per-device execution settings: device, bf16 autocast, channels_last, torch.compile, CUDA graphs.

``auto`` picks what is fast *and* safe on the hardware found (benchmarks/train_throughput.py
measures every choice against eager fp32):
- bf16 autocast where bf16 is native (:func:`native_bf16`): CUDA GPUs from Ampere on, and CPUs
  with AVX-512 BF16 or AMX. Elsewhere PyTorch emulates bf16 -- ~10x *slower* than fp32 on an
  AVX2-only EPYC (measured), and without cuDNN's bf16 convolutions on a V100 or T4 -- so auto
  stays in fp32 there.
- channels_last everywhere: oneDNN (CPU) and cuDNN (tensor cores) prefer NHWC.
- CUDA graphs on CUDA: small-batch steps are launch-bound, and a replayed graph removes the
  launches (bss_model/step.py).
- torch.compile on CUDA only: on CPU its warm-up (~30 s) buys a few per cent.

:func:`resolve_runtime` only *describes* the choice; :func:`apply_torch_settings` is the one place
that changes torch's process-wide settings (threads, cuDNN autotuning, TF32).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from functools import cache

import torch

from bss_model.config import TrainConfig
from bss_model.errors import ConfigError


@cache
def cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool({"avx512_bf16", "amx_bf16"} & flags)
    except OSError:
        pass
    return False


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes in bf16 natively (not emulated).

    ``torch.cuda.is_bf16_supported()`` counts emulation by default: it says True on pre-Ampere GPUs
    (V100, T4), where bf16 autocast is emulated and slower than fp32. Only the native answer counts.
    """
    if device.type == "cuda":
        with torch.cuda.device(device):  # the device asked about, not merely the current one
            return torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu" and cpu_has_native_bf16()


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    bf16: bool
    channels_last: bool
    compile: bool
    cuda_graphs: bool = False

    def autocast(self, cache_enabled: bool = True) -> contextlib.AbstractContextManager:
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, cache_enabled=cache_enabled)

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Move ``model`` to the device and memory format, in place (it keeps owning the weights)."""
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def describe(self) -> str:
        return (
            f"device={self.device} precision={'bf16' if self.bf16 else 'fp32'} "
            f"channels_last={self.channels_last} compile={self.compile} cuda_graphs={self.cuda_graphs}"
        )


def resolve_device(name: str, flag: str | None = None) -> torch.device:
    """The torch device ``name`` means here. Errors name ``flag`` (e.g. ``--device``) when the user typed
    one, else the config key ``train.device``."""
    said, fix = (f"{flag} {name}", f"use {flag} auto or cpu") if flag else (
        f"train.device={name}", "use train.device=auto or cpu")  # fmt: skip
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not (name in ("cpu", "cuda") or (name.startswith("cuda:") and name[5:].isdigit())):
        raise ConfigError(f"{said} is not a device: use auto, cpu, cuda or cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{said} but no CUDA GPU is available: {fix}")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise ConfigError(f"{said} but this machine has {torch.cuda.device_count()} CUDA GPU(s): {fix}, or cuda:0")
    return torch.device(name)


def resolve_runtime(t: TrainConfig) -> Runtime:
    """What ``t``'s hardware knobs mean on this machine; changes no global state."""
    device = resolve_device(t.device)
    cuda = device.type == "cuda"
    bf16 = t.precision == "bf16" or (t.precision == "auto" and native_bf16(device))
    channels_last = t.channels_last != "off"
    compile_ = t.compile == "on" or (t.compile == "auto" and cuda)
    graphs = t.cuda_graphs == "on" or (t.cuda_graphs == "auto" and cuda)
    if graphs and not cuda:
        raise ConfigError(f"train.cuda_graphs=on needs a CUDA device, not {device}: use train.cuda_graphs=auto")
    return Runtime(device=device, bf16=bf16, channels_last=channels_last, compile=compile_, cuda_graphs=graphs)


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity (a container's cpuset, ``taskset``), not the machine's."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no sched_getaffinity (macOS)
        return max(1, os.cpu_count() or 1)


def check_threads(threads: int, said: str | None = None) -> None:
    """Refuse more torch threads than the CPUs this process may use; ``said`` is how the user typed it
    (``--threads 100000``), else ``train.threads=N``.

    More threads than CPUs only contend: 4,096 turned a 7 s run into minutes, loaded 2 cores to 2,500 and
    starved every other process of threads; 100,000 crashed torch (a segmentation fault).
    """
    n = usable_cpus()
    if threads > n:
        said = said or f"train.threads={threads}"
        raise ConfigError(
            f"{said} is more than the {n} CPU(s) this process may use (os.sched_getaffinity): use {n} or fewer "
            "(0 = torch's default)"
        )


def check_machine(t: TrainConfig) -> None:
    """What ``t`` asks of *this* machine, before anything starts: its device and CUDA options exist here, and
    its threads fit the CPUs. (A config is validated where it is written; this runs where it will train.)"""
    resolve_runtime(t)
    check_threads(t.threads)


def apply_torch_settings(rt: Runtime, threads: int = 0) -> None:
    """Torch's process-wide settings for a run on ``rt``: the one place they are changed (a thread count this
    process's CPUs cannot hold is refused here too: on a cluster, this is where the node checks it)."""
    if threads:
        check_threads(threads)
        torch.set_num_threads(threads)
    if rt.device.type == "cuda":
        # Fixed shapes throughout a run, so cuDNN's per-shape autotuning pays for itself at once;
        # TF32 matmuls/convs keep fp32 parts of the step (the loss, non-autocast runs) on tensor cores.
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def cap_gpu_memory(fraction: float, device: torch.device) -> None:
    """Limit this process's CUDA caching allocator to ``fraction`` of the card.

    Processes sharing a GPU (fractional Ray GPUs) are not memory-isolated: without a cap one
    trial's cache can grow until its neighbours fail to allocate. With it, a trial that needs
    more than its share gets an out-of-memory error of its own.
    """
    if device.type == "cuda" and 0 < fraction < 1:
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.set_per_process_memory_fraction(fraction, index)
