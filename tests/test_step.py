"""The training step (bss_model.step) on CPU: one function for train() and the benchmark, the
optimised path against plain eager, the schedule, batch norm, divergence, fixed evaluation shapes
and the runtime's settings. The CUDA-graph path is tested in test_cuda.py."""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bss_model.config import ConfigError, TrainConfig, load_config
from bss_model.data import PairSampler
from bss_model.evaluate import batched_mse, mix_baseline
from bss_model.model import build_model
from bss_model.runtime import apply_torch_settings, resolve_runtime
from bss_model.step import FINITE_CHECK_EVERY, TrainStep, cosine_lr
from bss_model.train import train

REPO = Path(__file__).resolve().parent.parent


def images(seed: int, n: int = 256) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32), dtype=np.uint8)


def make_step(sets: list[str], objective=None, seed: int = 0) -> TrainStep:
    cfg = load_config(None, ["model.variant=tiny", "model.filters=4", "train.device=cpu", *sets])
    torch.manual_seed(seed)
    rt = resolve_runtime(cfg.train)
    model = rt.prepare_model(build_model(cfg.model))
    sampler = PairSampler(images(1), images(2), "cpu", seed=seed)
    return TrainStep(model, sampler, cfg.train, rt, objective=objective)


def load_benchmark():
    spec = importlib.util.spec_from_file_location("train_throughput", REPO / "benchmarks" / "train_throughput.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_train_and_the_benchmark_time_one_step_function(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, data_dir: Path
) -> None:
    calls: list[str] = []
    real_run = TrainStep.run

    def counting_run(self: TrainStep, n: int, *args, **kwargs):
        calls.append(type(self).__qualname__)
        return real_run(self, n, *args, **kwargs)

    monkeypatch.setattr(TrainStep, "run", counting_run)
    cfg = load_config(None, ["model.variant=tiny", "train.epochs=1", "train.samples_per_epoch=96", "train.device=cpu",
                             "train.tensorboard=false", "data.val_pairs=100", f"data.dir={data_dir}"])  # fmt: skip
    assert train(cfg, out_dir=tmp_path).status == "completed"
    assert calls == ["TrainStep"]  # one epoch = one TrainStep.run
    bench = load_benchmark()
    template = build_model(cfg.model)
    imgs = (torch.from_numpy(images(1)), torch.from_numpy(images(2)))
    mode = bench.build_mode("auto", template, imgs, 8, torch.device("cpu"))
    assert isinstance(mode.step, TrainStep)
    assert bench.time_window(mode, 2, 8, 0, torch.device("cpu")) > 0
    assert calls == ["TrainStep", "TrainStep"]


def curve(step: TrainStep, n: int) -> list[float]:
    points: list[float] = []
    step.run(n, on_step=lambda done, total: total is None or points.append(total / done), check_every=25)
    return points


def test_the_optimised_path_follows_the_eager_loss_curve() -> None:
    eager = make_step(["train.precision=fp32", "train.channels_last=off", "train.compile=off"])
    auto = make_step([])  # bf16 + channels_last where this CPU has native bf16, else fp32 + channels_last
    a, b = curve(eager, 300), curve(auto, 300)
    assert len(a) == len(b) == 12 and all(map(math.isfinite, a + b))
    assert a[-1] < 0.7 * a[0]  # it learns, so the comparison means something
    tol = 0.05 if auto.rt.bf16 else 1e-3  # bf16 rounds activations to 8 bits of mantissa
    for x, y in zip(a, b, strict=True):
        assert abs(x - y) <= tol * x, (a, b)


def test_the_schedule_reaches_the_optimizer_on_every_step() -> None:
    step = make_step(["train.schedule=cosine"])
    seen: list[float] = []
    step.opt.register_step_pre_hook(lambda opt, args, kwargs: seen.append(float(opt.param_groups[0]["lr"])))
    lr_at = lambda s: cosine_lr(s, 40, 5, 1e-3, 1e-5)  # noqa: E731
    step.run(40, lr_at, start=0)
    assert seen == pytest.approx([lr_at(s) for s in range(40)], rel=1e-6)
    assert len(set(seen)) > 30  # it really changed step by step


def test_batch_norm_statistics_update_every_step() -> None:
    step = make_step(["model.norm=batch"])
    bn = next(m for m in step.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    mean0 = bn.running_mean.clone()
    step.run(7)
    assert int(bn.num_batches_tracked) == 7
    assert not torch.allclose(bn.running_mean, mean0)


def test_a_non_finite_loss_is_caught_within_the_check_interval() -> None:
    count = {"n": 0}

    def poisoned(pred: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        count["n"] += 1
        loss = F.mse_loss(pred, y)
        loss = loss * float("nan") if count["n"] == 7 else loss
        return loss, loss.detach()

    step = make_step([], objective=poisoned)
    bad = step.run(200)
    assert bad == FINITE_CHECK_EVERY and count["n"] == FINITE_CHECK_EVERY  # stopped at the first check after step 7


def test_each_batch_size_is_compiled_for_its_own_static_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    # Left to dynamo's default, the second batch size compiled in one process gets a symbolic batch
    # dimension, as the benchmark's 256 and 1024 rows did; a trial compiles one static shape.
    graphs: list[torch.fx.GraphModule] = []

    def recording_backend(gm: torch.fx.GraphModule, example_inputs):
        graphs.append(gm)
        return gm.forward  # run the traced graph as it is: no Inductor, so this stays fast on a CPU

    real_compile = torch.compile
    monkeypatch.setattr(
        torch, "compile", lambda model, **kw: real_compile(model, **{**kw, "backend": recording_backend})
    )
    torch._dynamo.reset()
    try:
        for batch in (4, 8, 16):
            make_step(["train.compile=on", f"train.batch_size={batch}"]).run(2)
    finally:
        torch._dynamo.reset()
    assert len(graphs) == 3  # one compile per batch size, each on its own shapes
    for gm, batch in zip(graphs, (4, 8, 16), strict=True):
        inputs = [n.meta["example_value"] for n in gm.graph.nodes if n.op == "placeholder"]
        assert not any(isinstance(v, torch.SymInt) for v in inputs), gm.graph
        shapes = [tuple(v.shape) for v in inputs if isinstance(v, torch.Tensor) and v.ndim == 4 and v.shape[1] == 1]
        assert (batch, 1, 32, 32) in shapes and all(isinstance(d, int) for d in shapes[0])


def test_evaluation_batches_have_one_shape_and_padding_changes_nothing() -> None:
    digit, fashion = torch.from_numpy(images(3, 64)), torch.from_numpy(images(4, 64))
    rng = np.random.default_rng(0)
    idx_digit, idx_fashion = rng.integers(0, 64, 250), rng.integers(0, 64, 250)
    shapes: set[tuple] = set()

    def predict(x: torch.Tensor) -> torch.Tensor:
        shapes.add(tuple(x.shape))
        return mix_baseline(x) * 0.9

    got = batched_mse(predict, digit, fashion, idx_digit, idx_fashion, 100)  # 100 + 100 + 50 (padded to 100)
    assert shapes == {(100, 1, 32, 32)}
    d, f = digit[idx_digit].double() / 255, fashion[idx_fashion].double() / 255
    x = (d + f) / 2
    expect_digit = float(((0.9 * x - d) ** 2).mean())
    expect_fashion = float(((0.9 * x - f) ** 2).mean())
    assert got["mse_digit"] == pytest.approx(expect_digit, rel=1e-6)
    assert got["mse_fashion"] == pytest.approx(expect_fashion, rel=1e-6)


def test_resolve_runtime_describes_and_apply_torch_settings_changes() -> None:
    before = torch.get_num_threads()
    try:
        rt = resolve_runtime(TrainConfig(device="cpu", threads=1))
        assert torch.get_num_threads() == before  # describing the runtime changes nothing
        assert not rt.cuda_graphs and not rt.compile
        apply_torch_settings(rt, threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_cuda_graphs_on_a_cpu_is_refused_with_the_fix() -> None:
    with pytest.raises(ConfigError, match="train.cuda_graphs=on needs a CUDA device.*cuda_graphs=auto"):
        resolve_runtime(TrainConfig(device="cpu", cuda_graphs="on"))


# -- the benchmark's GPU clocks (a stand-in nvidia-smi: the real one needs a GPU) -------------------
FAKE_NVIDIA_SMI = """#!/bin/sh
echo "$@" > "$(dirname "$0")/args"
echo "[N/A], 1980, [N/A], 700.00, 60"
while true; do echo "1755, 1980, 650.5, 700.00, 61"; sleep 0.02; done
"""


def fake_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path: str) -> Path:
    exe = tmp_path / "nvidia-smi"
    exe.write_text(FAKE_NVIDIA_SMI)
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{path}")  # the script itself needs dirname and sleep from `path`
    return tmp_path


def test_the_gpu_monitor_summarises_the_samples_inside_each_window(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_nvidia_smi(tmp_path, monkeypatch, os.environ["PATH"])
    bench = load_benchmark()
    before = time.perf_counter()
    monitor = bench.GpuMonitor(3, interval_ms=20)
    try:
        time.sleep(0.1)
        t0 = time.perf_counter()
        time.sleep(0.3)
        t1 = time.perf_counter()
    finally:
        monitor.close()
    assert not monitor.unavailable
    args = (tmp_path / "args").read_text().split()
    assert "--id=3" in args and "-lms=20" in args and f"--query-gpu={','.join(bench.GpuMonitor.FIELDS)}" in args
    gpu = monitor.summary([(t0, t1)])
    assert gpu is not None and gpu["samples"] >= 3
    assert gpu["sm_clock_mhz"] == 1755 and gpu["sm_clock_max_mhz"] == 1980
    assert gpu["power_w"] == 650.5 and gpu["power_limit_w"] == 700 and gpu["temperature_c"] == 61
    assert monitor.summary([(before - 10, before - 5)]) is None  # nothing sampled then
    assert all(v[0] == 1755 and v[4] == 61 for _, v in monitor.samples)  # the [N/A] line was dropped


def test_the_benchmark_puts_clocks_beside_each_row_and_runs_without_nvidia_smi(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = load_benchmark()
    system_path = os.environ["PATH"]
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    absent = bench.GpuMonitor(0)
    absent.close()
    assert absent.unavailable == "no nvidia-smi on PATH" and absent.summary([(0, 1e12)]) is None

    fake_nvidia_smi(tmp_path, monkeypatch, system_path)
    cfg = load_config(None, ["model.variant=tiny", "model.filters=4"])
    imgs = (torch.from_numpy(images(1)), torch.from_numpy(images(2)))
    args = argparse.Namespace(modes=["eager-fp32", "auto"], warmup=1, reps=2, steps=30)  # windows of ~50+ ms
    monitor = bench.GpuMonitor("GPU-1234", interval_ms=20)
    try:
        rows = bench.benchmark_batch(args, 4, build_model(cfg.model), 1, torch.device("cpu"), imgs, monitor)
    finally:
        monitor.close()
    assert "--id=GPU-1234" in (tmp_path / "args").read_text().split()  # a UUID, as nvidia_smi_id gives on CUDA
    assert [r["mode"] for r in rows] == ["eager-fp32", "auto"]
    for row in rows:
        assert len(row["windows"]) == 2 and row["samples_per_s"] > 0
        # a row gets clocks only from samples inside its own windows
        if "gpu" in row:
            assert row["gpu"]["sm_clock_mhz"] == 1755 and 1 <= row["gpu"]["samples"] <= len(monitor.samples)
    assert any("gpu" in row for row in rows), rows  # the monitor is wired to the rows
    report = {"variant": "tiny", "n_params": 1, "forward_gflop_per_sample": 0.0, "device": "cpu", "device_name": "x",
              "threads": 1, "native_bf16": False, "torch": torch.__version__, "reps": 2, "steps": 3,
              "gpu_telemetry": "nvidia-smi", "results": [{**rows[0], "gpu": monitor.summary([(0, 1e12)])}]}  # fmt: skip
    bench.print_table(report)
    out = capsys.readouterr().out
    assert "SM MHz" in out and " 1755 " in out and "power limit 700 W" in out
