"""The CUDA path: the training step captured in a CUDA graph, fair GPU sharing, no recompiles.

These tests need a CUDA GPU. On a machine without one (CI, laptops) the whole module is skipped,
and says so: the CPU suite covers the same step code uncaptured (test_step.py).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bss_model import checkpoint as ckpt
from bss_model.config import load_config
from bss_model.data import PairSampler
from bss_model.ema import EMA
from bss_model.model import build_model
from bss_model.runtime import apply_torch_settings, resolve_runtime
from bss_model.step import FINITE_CHECK_EVERY, TrainStep, cosine_lr
from bss_model.train import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; CPU runs skip this module")

EXACT = ["train.precision=fp32", "train.compile=off"]  # the graph alone, against eager, in fp32


def make_step(sets: list[str], objective=None) -> TrainStep:
    cfg = load_config(None, ["model.variant=tiny", "model.norm=batch", "train.device=cuda", *sets])
    torch.manual_seed(0)
    rt = resolve_runtime(cfg.train)
    apply_torch_settings(rt)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # compare in true fp32
    model = rt.prepare_model(build_model(cfg.model))
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (512, 32, 32), dtype=np.uint8) for _ in range(2)]
    return TrainStep(model, PairSampler(*imgs, "cuda", seed=0), cfg.train, rt, objective=objective)


def test_the_graphed_step_trains_like_the_eager_step() -> None:
    eager, graphed = make_step([*EXACT, "train.cuda_graphs=off"]), make_step([*EXACT, "train.cuda_graphs=on"])
    lr_at = lambda s: cosine_lr(s, 120, 10, 2e-3, 1e-5)  # noqa: E731 - a schedule that moves every step
    curves = {}
    for name, step in (("eager", eager), ("graphed", graphed)):
        points: list[float] = []
        assert step.run(120, lr_at, on_step=lambda d, t, p=points: t is None or p.append(t / d), check_every=10) is None
        curves[name] = points
    assert graphed.graph is not None and eager.graph is None
    np.testing.assert_allclose(curves["graphed"], curves["eager"], rtol=1e-3)
    # Weights are compared as whole tensors: Adam moves each weight by ~lr * sign(grad), so a few
    # weights whose gradients sit near zero flip under any change of summation order (seen on an
    # H100: 9 of 4,608 weights off by 1e-3 after 120 steps, a relative norm of ~5e-4). A missing,
    # doubled or stale-lr step moves every weight and shows as a relative norm of several per cent.
    for p, q in zip(eager.model.parameters(), graphed.model.parameters(), strict=True):
        assert float((p - q).norm() / p.norm().clamp_min(1e-12)) < 1e-2
    # The warm-up before capture left no trace: the graphed run took exactly 120 optimizer steps.
    steps = {float(s["step"]) for s in graphed.opt.state.values()}
    assert steps == {120.0}


def test_capture_warm_up_leaves_no_trace() -> None:
    # Capture runs warm-up steps first. Had they leaked, the first replay's forward would see moved
    # weights (another loss) and batch norm would have averaged 4 batches instead of 1.
    # (Weights after one Adam step are no test: step 1 moves each weight by ~lr * sign(grad),
    # which flips for gradients near zero under any change of summation order.)
    eager, graphed = make_step([*EXACT, "train.cuda_graphs=off"]), make_step([*EXACT, "train.cuda_graphs=on"])
    eager.run(1)
    graphed.run(1)
    assert float(graphed.loss_sum) == pytest.approx(float(eager.loss_sum), rel=1e-5)
    bns = [[m for m in s.model.modules() if isinstance(m, torch.nn.BatchNorm2d)] for s in (eager, graphed)]
    for a, b in zip(*bns, strict=True):
        assert int(a.num_batches_tracked) == int(b.num_batches_tracked) == 1
        torch.testing.assert_close(a.running_mean, b.running_mean, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(a.running_var, b.running_var, rtol=1e-4, atol=1e-6)
    assert {float(s["step"]) for s in graphed.opt.state.values()} == {1.0}


def test_a_learning_rate_set_outside_reaches_the_graph() -> None:
    step = make_step(["train.cuda_graphs=on"])
    step.run(3)
    before = [p.detach().clone() for p in step.model.parameters()]
    step.set_lr(0.0)
    step.run(5)
    for p, q in zip(before, step.model.parameters(), strict=True):
        assert torch.equal(p, q)  # lr 0: Adam moves nothing
    step.set_lr(1e-3)
    step.run(1)
    assert any(not torch.equal(p, q) for p, q in zip(before, step.model.parameters(), strict=True))


def test_batch_norm_statistics_update_in_the_graph() -> None:
    step = make_step(["train.cuda_graphs=on"])
    bn = next(m for m in step.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    step.run(4)
    mean4 = bn.running_mean.clone()
    step.run(4)
    assert int(bn.num_batches_tracked) == 8
    assert not torch.equal(bn.running_mean, mean4)


def test_a_non_finite_loss_in_the_graph_is_caught_within_the_check_interval() -> None:
    scale = torch.ones((), device="cuda")

    def scaled(pred: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss = F.mse_loss(pred, y) * scale
        return loss, loss.detach()

    step = make_step(["train.cuda_graphs=on"], objective=scaled)
    assert step.run(10) is None
    scale.fill_(float("nan"))  # read by the captured graph on its next replay
    assert step.run(200) == FINITE_CHECK_EVERY


def test_the_edge_loss_weight_set_outside_reaches_the_graph() -> None:
    """train.loss = edge: λ is read by the captured graph at each replay; the graphed step follows the eager one."""
    from bss_model.losses import EdgeObjective, edge_weight_at

    steps = {}
    for graphs in ("off", "on"):
        steps[graphs] = make_step([*EXACT, f"train.cuda_graphs={graphs}", "train.loss=edge"],
                                  objective=EdgeObjective(0.5, "cuda"))  # fmt: skip
    at = lambda s: edge_weight_at(s, 40, 0.5)  # noqa: E731
    for step in steps.values():
        step.run(40, loss_weight_at=at, check_every=10)
    assert steps["on"].graph is not None
    assert float(steps["on"].loss_sum) == pytest.approx(float(steps["off"].loss_sum), rel=1e-3)
    # With λ at 0 the graphed loss is the MSE it logs: the fill reached the graph.
    steps["on"].reset_sums()
    steps["on"].run(3, loss_weight_at=lambda s: 0.0)
    assert float(steps["on"].loss_sum) == pytest.approx(float(steps["on"].mse_sum), rel=1e-6)
    steps["on"].reset_sums()
    steps["on"].run(3, loss_weight_at=lambda s: 5.0)
    assert float(steps["on"].loss_sum) > 1.5 * float(steps["on"].mse_sum)


def run_cfg(data_dir: Path, epochs: int) -> object:
    return load_config(None, ["model.variant=tiny", "model.norm=batch", "train.device=cuda", f"train.epochs={epochs}",
                              "train.samples_per_epoch=960", "train.image_every=1",
                              "data.val_pairs=700", f"data.dir={data_dir}"])  # fmt: skip


def test_resume_is_exact_on_the_same_device(tmp_path: Path, data_dir: Path) -> None:
    whole = train(run_cfg(data_dir, 3), out_dir=tmp_path / "whole")
    first = train(run_cfg(data_dir, 2), out_dir=tmp_path / "split")
    assert first.status == whole.status == "completed"
    cfg3 = run_cfg(data_dir, 3)
    resumed = train(cfg3, out_dir=tmp_path / "split", resume=tmp_path / "split" / "checkpoint" / ckpt.FILENAME)
    a = ckpt.load(tmp_path / "whole" / "checkpoint" / ckpt.FILENAME)
    b = ckpt.load(tmp_path / "split" / "checkpoint" / ckpt.FILENAME)
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert resumed.metrics["val_mse"] == whole.metrics["val_mse"]


def test_validation_and_images_never_recompile(tmp_path: Path, data_dir: Path) -> None:
    import torch._dynamo.utils as dynamo_utils

    seen: list[int] = []
    cfg = run_cfg(data_dir, 3)
    cfg.train.compile = "on"
    result = train(
        cfg, out_dir=tmp_path, on_epoch=lambda m, d: seen.append(dynamo_utils.counters["stats"]["unique_graphs"])
    )
    assert result.status == "completed"
    assert seen[0] >= 1 and seen == [seen[0]] * 3, seen  # compiled once, in epoch 1; nothing after


def test_a_fractional_trial_is_capped_at_its_share() -> None:
    # In a subprocess: the cap is per process, like a Ray trial's.
    code = (
        "import torch; from bss_model.runtime import cap_gpu_memory\n"
        "cap_gpu_memory(0.05, torch.device('cuda'))\n"
        "total = torch.cuda.get_device_properties(0).total_memory\n"
        "torch.empty(int(total * 0.03), dtype=torch.uint8, device='cuda')\n"
        "try:\n    torch.empty(int(total * 0.1), dtype=torch.uint8, device='cuda')\nexcept torch.OutOfMemoryError:\n"
        "    print('capped')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "capped", out.stderr


def test_the_ema_update_replays_correctly_from_a_cuda_graph() -> None:
    device = "cuda"
    # Capturable: no host sync, the warmup step lives on the device. Replaying the captured update
    # must match eager updates exactly, warmup included.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8)).to(device)
    eager, graphed = EMA(model, decay=0.99), EMA(model, decay=0.99)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        graphed.update(model)  # warm up outside the graph, as CUDA graphs require
    torch.cuda.current_stream().wait_stream(side)
    eager.update(model)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed.update(model)
    # Capture recorded the update without running it; the graph now replays it.
    for _ in range(20):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        eager.update(model)
        graph.replay()
    torch.cuda.synchronize()
    assert graphed.num_updates.item() == eager.num_updates.item() == 21
    for (name, a), b in zip(eager.model.state_dict().items(), graphed.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def test_gpu_ms_is_timed_on_the_gpu():
    """search/costs.py's gpu_ms (tune.objectives [val_mse, gpu_ms]): a real, synchronised timing on the card."""
    from bss_model.config import ModelConfig
    from search.costs import model_costs

    tiny = ModelConfig(filters=2, depth=1, encoder_convs=1, bottleneck_convs=1, decoder_convs=1, decoder_mult=1)
    small = model_costs(tiny, measure=("gpu_ms",), batch=4, repeats=2)
    assert 0 < small["gpu_ms"] < 1e3 and small["gpu_model"] == torch.cuda.get_device_name()
    assert small["gpu_precision"] == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")
    big = model_costs(ModelConfig(filters=64), measure=("gpu_ms",), batch=256, repeats=2)
    assert big["gpu_ms"] > small["gpu_ms"]  # 1,000x the work: a timer that did not wait for the GPU would not see it
