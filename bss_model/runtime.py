"""Per-device execution settings: device, bf16 autocast, channels_last, torch.compile.

``auto`` picks what is fast *and* safe on the hardware found:
- bf16 autocast on CUDA GPUs that support it, and on CPUs with native bf16 (AVX-512
  BF16 or AMX). On CPUs without it PyTorch emulates bf16 and runs ~10x *slower*
  than fp32 (measured on an AVX2-only EPYC), so auto stays in fp32 there.
- channels_last everywhere: oneDNN (CPU) and cuDNN (tensor cores) prefer NHWC.
- torch.compile on CUDA only: on CPU its warm-up (~30 s) buys a few per cent.
"""

from __future__ import annotations

import contextlib
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


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    bf16: bool
    channels_last: bool
    compile: bool

    def autocast(self) -> contextlib.AbstractContextManager:
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def prepare_model(self, model: torch.nn.Module, compile_model: bool | None = None) -> torch.nn.Module:
        """Move to device/memory format. Returns the module to *call* (maybe compiled);
        keep a reference to the original for ``state_dict`` (compile prefixes keys)."""
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if self.compile if compile_model is None else compile_model:
            return torch.compile(model)
        return model

    def describe(self) -> str:
        return (
            f"device={self.device} precision={'bf16' if self.bf16 else 'fp32'} "
            f"channels_last={self.channels_last} compile={self.compile}"
        )


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name} but no CUDA GPU is available: use train.device=auto or cpu")
    return torch.device(name)


def resolve_runtime(t: TrainConfig) -> Runtime:
    device = resolve_device(t.device)
    if t.threads:
        torch.set_num_threads(t.threads)
    if device.type == "cuda":
        native_bf16 = torch.cuda.is_bf16_supported()
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        native_bf16 = cpu_has_native_bf16()
    bf16 = t.precision == "bf16" or (t.precision == "auto" and native_bf16)
    channels_last = t.channels_last != "off"
    compile_ = t.compile == "on" or (t.compile == "auto" and device.type == "cuda")
    return Runtime(device=device, bf16=bf16, channels_last=channels_last, compile=compile_)
