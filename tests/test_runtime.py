"""bf16 for ``precision: auto`` only where it is native: torch's emulated bf16 (pre-Ampere GPUs) is not taken."""

from __future__ import annotations

import contextlib
import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch

import bss_model.runtime as runtime
from bss_model.config import TrainConfig

REPO = Path(__file__).resolve().parent.parent


def fake_gpu(monkeypatch: pytest.MonkeyPatch, native: bool) -> list[dict]:
    """A CUDA device whose bf16 is native (an A100) or only emulated (a V100, a T4), as torch 2.13 answers:
    ``is_bf16_supported()`` counts emulation unless asked ``including_emulation=False``."""
    calls: list[dict] = []

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        calls.append({"including_emulation": including_emulation})
        return native or including_emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(runtime, "resolve_device", lambda name, flag=None: torch.device("cuda"))
    return calls


@pytest.mark.parametrize("native", [False, True])
def test_auto_takes_bf16_only_where_it_is_native(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    calls = fake_gpu(monkeypatch, native)
    t = TrainConfig(device="cuda", precision="auto", compile="off", cuda_graphs="off")
    assert runtime.resolve_runtime(t).bf16 is native
    assert calls and all(c == {"including_emulation": False} for c in calls)
    assert runtime.native_bf16(torch.device("cuda")) is native
    # Asked for by name, bf16 is still bf16 (emulated or not): the user's choice.
    assert runtime.resolve_runtime(TrainConfig(device="cuda", precision="bf16", compile="off", cuda_graphs="off")).bf16


def test_the_benchmark_labels_a_machine_by_the_same_native_check(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location("train_throughput", REPO / "benchmarks" / "train_throughput.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    fake_gpu(monkeypatch, native=False)
    assert module.native_bf16 is runtime.native_bf16 and module.native_bf16(torch.device("cuda")) is False
    # Nowhere in the project is torch's emulation-counting default asked.
    for path in [*REPO.glob("bss_model/*.py"), *REPO.glob("search/*.py"), *REPO.glob("benchmarks/*.py")]:
        for call in re.findall(r"(?<!`)torch\.cuda\.is_bf16_supported\(([^)]*)\)", path.read_text()):  # (not ``docs``)
            assert call == "including_emulation=False", (path, call)
