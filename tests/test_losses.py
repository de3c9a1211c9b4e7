"""The training losses (bss_model.losses): the Sobel edge loss on hand-computed examples, λ's annealing schedule,
and λ reaching the step (a device tensor filled between steps, like the learning rate) in TrainStep and train()."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bss_model import losses
from bss_model.config import load_config
from bss_model.data import PairSampler
from bss_model.errors import ConfigError
from bss_model.model import build_model
from bss_model.runtime import resolve_runtime
from bss_model.step import TrainStep
from bss_model.train import resume_config, train

# A 4x4 residual with two lit pixels, its Sobel gradients worked out by hand (zero padding):
#   gx[i, j] = sum d[p, q] * (q - j) * w[p - i + 1],  gy[i, j] = sum d[p, q] * (p - i) * w[q - j + 1],  w = 1, 2, 1
RESIDUAL = [[0, 0, 0, 0], [0, 1, 2, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
GX = [[1, 2, -1, -2], [2, 4, -2, -4], [1, 2, -1, -2], [0, 0, 0, 0]]
GY = [[1, 4, 5, 2], [0, 0, 0, 0], [-1, -4, -5, -2], [0, 0, 0, 0]]
# MSE 5/16; edge MSE = (sum gx² + sum gy²) / (2 maps x 16 pixels) = (60 + 92) / 32 = 4.75.


def image(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)[None, None]


def test_sobel_of_a_4x4_example_matches_the_hand_computed_gradients() -> None:
    g = losses.sobel(image(RESIDUAL))
    assert g.shape == (1, 2, 4, 4)
    torch.testing.assert_close(g[0, 0], torch.tensor(GX, dtype=torch.float32), atol=0, rtol=0)
    torch.testing.assert_close(g[0, 1], torch.tensor(GY, dtype=torch.float32), atol=0, rtol=0)


def test_the_edge_loss_matches_the_hand_computed_value_on_4x4() -> None:
    target = torch.rand(1, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    pred = target + image(RESIDUAL)  # the loss depends on the residual only (S is linear)
    assert float(losses.edge_mse(pred, target)) == pytest.approx(152 / 32, rel=1e-6)
    assert float(losses.edge_loss(pred, target, 0.1)) == pytest.approx(5 / 16 + 0.1 * 4.75, rel=1e-6)
    # Two channels (digit, fashion) and a batch: each channel's gradients, averaged over everything.
    two = torch.cat([image(RESIDUAL), torch.zeros(1, 1, 4, 4)], dim=1).repeat(3, 1, 1, 1)
    assert float(losses.edge_mse(two, torch.zeros_like(two))) == pytest.approx(4.75 / 2, rel=1e-6)


def test_the_edge_loss_is_zero_for_identical_images() -> None:
    x = torch.rand(4, 2, 32, 32, generator=torch.Generator().manual_seed(1))
    assert float(losses.edge_mse(x, x.clone())) == 0.0
    assert float(losses.edge_loss(x, x.clone(), 5.0)) == 0.0
    assert float(losses.edge_mse(x, x + 0.01 * torch.rand_like(x))) > 0  # and only then


def test_the_sobel_gain_for_white_noise_is_twelve() -> None:
    """What train.edge_weight's comment states: each Sobel map has the kernel's squared taps, 1+4+1+1+4+1 = 12."""
    d = torch.randn(64, 2, 32, 32, generator=torch.Generator().manual_seed(2))
    ratio = float(losses.edge_mse(d, torch.zeros_like(d)) / d.square().mean())
    # 12 inside; the zero-padded border loses taps: 10 on the first and last rows, 6 on the first and last columns
    # (of the d/dx map; the other way round for d/dy), 5 at the corners.
    assert ratio == pytest.approx((900 * 12 + 60 * 10 + 60 * 6 + 4 * 5) / 1024, rel=0.02)


@pytest.mark.parametrize("total", [2, 3, 10, 1000, 1_600])
def test_the_edge_weight_starts_at_its_value_and_is_annealed_to_zero(total: int) -> None:
    w = 0.3
    schedule = [losses.edge_weight_at(s, total, w) for s in range(total)]
    assert schedule[0] == w
    assert schedule[-1] == 0.0  # the last step trains on the score alone
    assert all(a >= b for a, b in zip(schedule, schedule[1:], strict=False))  # never rises
    # 0 for the last quarter of the steps, from 3/4 of the run on.
    assert all(v == 0.0 for s, v in enumerate(schedule) if s / (total - 1) >= losses.EDGE_ANNEAL_FRACTION)
    assert all(v > 0.0 for s, v in enumerate(schedule) if s / (total - 1) < losses.EDGE_ANNEAL_FRACTION)


def test_the_edge_weight_schedule_is_the_stated_cosine() -> None:
    assert losses.edge_weight_at(375, 1001, 0.2) == pytest.approx(0.1)  # halfway down at 3/8 of the run
    assert losses.edge_weight_at(250, 1001, 1.0) == pytest.approx((1 + math.cos(math.pi / 3)) / 2)


def test_the_edge_objective_reads_its_weight_tensor_in_place() -> None:
    """λ is filled in place, never replaced: a captured CUDA graph holds the tensor's address."""
    objective = losses.objective("edge", edge_weight=0.5)
    pred, target = torch.rand(2, 2, 8, 8), torch.rand(2, 2, 8, 8)
    address = objective.weight.data_ptr()
    loss, mse = objective(pred, target)
    torch.testing.assert_close(loss, losses.edge_loss(pred, target, 0.5))
    torch.testing.assert_close(mse, F.mse_loss(pred, target))
    assert not mse.requires_grad
    objective.set_weight(0.0)
    assert objective.weight.data_ptr() == address and float(objective.weight) == 0.0
    loss, _ = objective(pred, target)
    torch.testing.assert_close(loss, F.mse_loss(pred, target))


def test_the_schedule_reaches_the_objective_on_every_step() -> None:
    seen: list[float] = []

    class Recording(losses.EdgeObjective):
        def __call__(self, pred: torch.Tensor, target: torch.Tensor):
            seen.append(float(self.weight))
            return super().__call__(pred, target)

    cfg = load_config(None, ["model.variant=tiny", "model.filters=4", "train.device=cpu", "train.loss=edge"])
    rt = resolve_runtime(cfg.train)
    model = rt.prepare_model(build_model(cfg.model))
    rng = np.random.default_rng(0)
    sampler = PairSampler(*(rng.integers(0, 256, (64, 32, 32), dtype=np.uint8) for _ in range(2)), "cpu", seed=0)
    step = TrainStep(model, sampler, cfg.train, rt, objective=Recording(0.1))
    at = lambda s: losses.edge_weight_at(s, 30, 0.1)  # noqa: E731
    assert step.run(20, loss_weight_at=at, start=10) is None
    assert seen == pytest.approx([at(s) for s in range(10, 30)], rel=1e-6)
    assert seen[-1] == 0.0 and len(set(seen)) > 5


def test_train_anneals_the_edge_weight_over_the_whole_run(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[float] = []
    real_call = losses.EdgeObjective.__call__

    def recording(self, pred, target):
        seen.append(float(self.weight))
        return real_call(self, pred, target)

    monkeypatch.setattr(losses.EdgeObjective, "__call__", recording)
    sets = [f"data.dir={data_dir}", "data.download=false", "data.val_pairs=50", "model.variant=tiny",
            "train.device=cpu", "train.threads=1", "train.tensorboard=false", "train.batch_size=16",
            "train.epochs=2", "train.samples_per_epoch=64", "train.loss=edge", "train.edge_weight=0.5"]  # fmt: skip
    cfg = load_config(None, sets)
    result = train(cfg, out_dir=tmp_path / "run")
    assert result.status == "completed"
    assert seen == pytest.approx([losses.edge_weight_at(s, 8, 0.5) for s in range(8)], rel=1e-6)
    assert seen[0] == 0.5 and seen[-1] == 0.0
    first = result.history[0]
    assert first["train_loss"] > first["train_mse"] > 0  # the edge term is in the loss, the MSE is logged apart
    # Its length is part of the loss: a resume may not change train.epochs.
    with pytest.raises(ConfigError, match=r"edge loss anneals train\.edge_weight to 0 over train\.epochs"):
        resume_config(tmp_path / "run" / "checkpoint" / "checkpoint.pt", tmp_path / "run", None, ["train.epochs=3"])


def test_a_time_limited_run_anneals_the_edge_weight_on_the_clock_like_its_lr(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under train.time_limit_s with epochs on time alone (samples_per_epoch 0) the steps are unknown beforehand:
    λ follows the progress the lr follows (the clock's), not a step count of 0 that would zero it after one step."""
    seen: list[tuple[float, float]] = []  # (lr, λ) of each step, as the step reads them
    real_call = losses.EdgeObjective.__call__
    step_of: dict[str, TrainStep] = {}
    real_init = TrainStep.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        step_of["step"] = self

    def recording(self, pred, target):
        lr = step_of["step"].opt.param_groups[0]["lr"]
        seen.append((float(lr), float(self.weight)))
        return real_call(self, pred, target)

    monkeypatch.setattr(TrainStep, "__init__", init)
    monkeypatch.setattr(losses.EdgeObjective, "__call__", recording)
    sets = [f"data.dir={data_dir}", "data.download=false", "data.val_pairs=50", "model.variant=tiny",
            "train.device=cpu", "train.threads=1", "train.tensorboard=false", "train.batch_size=8",
            "train.epochs=2", "train.samples_per_epoch=0", "train.time_limit_s=2", "train.schedule=cosine",
            "train.warmup_epochs=0", "train.min_lr=0", "train.loss=edge", "train.edge_weight=0.5"]  # fmt: skip
    result = train(load_config(None, sets), out_dir=tmp_path / "run")
    assert result.status == "completed" and len(seen) >= 8, (result.reason, len(seen))
    lr0 = load_config(None, sets).train.lr
    for lr, weight in seen:
        # lr = lr0 (1 + cos(π p)) / 2 gives the run's progress p; λ must be its value at that same p.
        p = math.acos(max(-1.0, min(1.0, 2 * lr / lr0 - 1))) / math.pi
        assert weight == pytest.approx(losses.edge_weight_of_progress(p, 0.5), abs=0.02)
    weights = [w for _, w in seen]
    assert weights[0] == pytest.approx(0.5, abs=0.02) and weights[-1] == 0.0
    assert all(a >= b for a, b in zip(weights, weights[1:], strict=False))
    assert sum(0.0 < w < 0.5 for w in weights) >= 4  # annealed over the run, not switched off after a step


def test_the_edge_weight_of_progress_is_the_step_schedule_on_a_fraction() -> None:
    assert losses.edge_weight_of_progress(0.0, 0.4) == 0.4 and losses.edge_weight_of_progress(1.0, 0.4) == 0.0
    assert losses.edge_weight_of_progress(0.375, 0.2) == pytest.approx(0.1)
    assert losses.edge_weight_of_progress(500 / 999, 0.3) == losses.edge_weight_at(500, 1000, 0.3)
