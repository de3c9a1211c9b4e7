"""Tests for the recipe options' maths: the training losses and the optimizers, against hand computations."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bss_model import losses
from bss_model.config import load_config
from bss_model.step import build_optimizer

# Residuals d = pred - target of 0.5, -1, 2 and 0.
PRED = torch.tensor([[0.5, -1.0], [2.0, 0.0]])
TARGET = torch.zeros(2, 2)
D = [0.5, -1.0, 2.0, 0.0]


def test_mse_and_l1_by_hand() -> None:
    assert losses.mse(PRED, TARGET).item() == pytest.approx((0.25 + 1 + 4 + 0) / 4)  # 1.3125
    assert losses.l1(PRED, TARGET).item() == pytest.approx((0.5 + 1 + 2 + 0) / 4)  # 0.875
    # Only the difference matters.
    shift = torch.full((2, 2), 0.3)
    assert losses.l1(PRED + shift, TARGET + shift).item() == pytest.approx(0.875)


@pytest.mark.parametrize("eps", [0.1, 1e-3])
def test_charbonnier_by_hand(eps: float) -> None:
    pred = PRED.clone().requires_grad_(True)
    loss = losses.charbonnier(pred, TARGET, eps)
    expected = sum(math.sqrt(d * d + eps * eps) - eps for d in D) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    # d/dd of sqrt(d^2 + eps^2) is d / sqrt(d^2 + eps^2): ~sign(d) for |d| >> eps, 0 at d = 0.
    grad = [d / math.sqrt(d * d + eps * eps) / 4 for d in D]
    torch.testing.assert_close(pred.grad.flatten(), torch.tensor(grad), rtol=1e-6, atol=0)
    # A perfect prediction costs exactly 0.
    assert losses.charbonnier(TARGET, TARGET, eps).item() == 0.0


def test_charbonnier_is_between_l2_and_l1() -> None:
    # |d| << eps: quadratic, ~ d^2 / (2 eps); |d| >> eps: linear, ~ |d| - eps.
    eps = 1e-2
    small, large = torch.tensor([1e-4]), torch.tensor([10.0])
    zero = torch.zeros(1)
    assert losses.charbonnier(small, zero, eps).item() == pytest.approx(1e-8 / (2 * eps), rel=1e-3)
    assert losses.charbonnier(large, zero, eps).item() == pytest.approx(10.0 - eps, rel=1e-6)


# The pointwise losses; the edge loss (MSE + λ·Sobel on [N, C, H, W] images) is tested in tests/test_losses.py.
@pytest.mark.parametrize("name", [n for n in losses.LOSSES if n != "edge"])
def test_objective_returns_the_loss_and_a_detached_mse(name: str) -> None:
    pred = PRED.clone().requires_grad_(True)
    loss, mse = losses.objective(name, charbonnier_eps=0.1)(pred, TARGET)
    expected = {"mse": 1.3125, "l1": 0.875, "charbonnier": sum(math.sqrt(d * d + 0.01) - 0.1 for d in D) / 4}
    assert loss.item() == pytest.approx(expected[name], rel=1e-6)
    assert mse.item() == pytest.approx(1.3125)  # the score is always MSE
    assert loss.requires_grad and not mse.requires_grad
    with pytest.raises(ValueError, match="unknown loss"):
        losses.objective("huber")


def test_loss_keys_are_checked() -> None:
    cfg = load_config(None, ["train.loss=charbonnier", "train.charbonnier_eps=1e-2"])
    assert (cfg.train.loss, cfg.train.charbonnier_eps) == ("charbonnier", 1e-2)
    assert load_config().train.loss == "mse"
    from bss_model.errors import ConfigError

    with pytest.raises(ConfigError, match="train.loss"):
        load_config(None, ["train.loss=huber"])
    with pytest.raises(ConfigError, match="train.charbonnier_eps"):
        load_config(None, ["train.charbonnier_eps=0"])


# --------------------------------------------------------------------------------------
# Optimizers: one step from zero gradients shows where the weight decay goes


def _conv_with_zero_grads() -> nn.Conv2d:
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 2, 3)  # weight [2,1,3,3] (decayed by AdamW), bias [2] (not)
    for p in conv.parameters():
        p.grad = torch.zeros_like(p)
    return conv


def test_adamw_decays_weights_only_and_decoupled() -> None:
    conv = _conv_with_zero_grads()
    weight, bias = conv.weight.detach().clone(), conv.bias.detach().clone()
    t = load_config(None, ["train.optimizer=adamw", "train.lr=0.1", "train.weight_decay=0.5"]).train
    opt = build_optimizer(conv, t)
    assert isinstance(opt, torch.optim.AdamW)
    opt.step()
    # Decoupled: p <- p - lr * wd * p; the Adam part moves nothing (its gradient is 0).
    torch.testing.assert_close(conv.weight.detach(), weight * (1 - 0.1 * 0.5), rtol=1e-6, atol=0)
    assert torch.equal(conv.bias.detach(), bias)


def test_adam_weight_decay_is_an_l2_gradient_on_every_parameter() -> None:
    conv = _conv_with_zero_grads()
    weight, bias = conv.weight.detach().clone(), conv.bias.detach().clone()
    t = load_config(None, ["train.lr=0.1", "train.weight_decay=0.5"]).train
    assert t.optimizer == "adam"
    opt = build_optimizer(conv, t)
    assert type(opt) is torch.optim.Adam and len(opt.param_groups) == 1
    opt.step()
    # The gradient becomes wd * p; Adam's first step normalises it to sign(p), so every
    # parameter (the bias too) moves by lr against its sign.
    torch.testing.assert_close(conv.weight.detach(), weight - 0.1 * weight.sign(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(conv.bias.detach(), bias - 0.1 * bias.sign(), rtol=1e-5, atol=1e-6)


def test_optimizer_kwargs_pass_through() -> None:
    conv = _conv_with_zero_grads()
    for name in ("adam", "adamw"):
        opt = build_optimizer(conv, load_config(None, [f"train.optimizer={name}"]).train, foreach=False)
        assert all(g["foreach"] is False for g in opt.param_groups)
