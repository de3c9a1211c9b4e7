"""Tests for bss_model.ema: the EMA arithmetic against hand computations, warmup, state round trip, capture."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bss_model.ema import EMA, warmup_decay

_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


class Tiny(nn.Module):
    """Two parameters and batch-norm buffers: enough to see every rule of the update."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, -2.0]))
        self.b = nn.Parameter(torch.tensor(0.5))
        self.bn = nn.BatchNorm1d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x * self.w + self.b)


def _set(model: Tiny, w: list[float], b: float, running_mean: list[float]) -> None:
    with torch.no_grad():
        model.w.copy_(torch.tensor(w))
        model.b.fill_(b)
        model.bn.running_mean.copy_(torch.tensor(running_mean))
        model.bn.num_batches_tracked.add_(1)


def test_ema_arithmetic_by_hand() -> None:
    model = Tiny()
    ema = EMA(model, decay=0.9, warmup=False)
    # Step 1: shadow = 0.9 * initial + 0.1 * new, per element.
    _set(model, [3.0, 0.0], 1.5, [0.2, -0.4])
    ema.update(model)
    torch.testing.assert_close(ema.model.w, torch.tensor([0.9 * 1.0 + 0.1 * 3.0, 0.9 * -2.0 + 0.1 * 0.0]))
    torch.testing.assert_close(ema.model.b, torch.tensor(0.9 * 0.5 + 0.1 * 1.5))
    # Buffers are copied, not averaged.
    torch.testing.assert_close(ema.model.bn.running_mean, torch.tensor([0.2, -0.4]), atol=0, rtol=0)
    assert ema.model.bn.num_batches_tracked.item() == 1
    # Step 2 builds on step 1: 0.9 * (0.9 * 1 + 0.1 * 3) + 0.1 * 5 = 1.58.
    _set(model, [5.0, 10.0], -1.0, [0.0, 0.0])
    ema.update(model)
    torch.testing.assert_close(ema.model.w, torch.tensor([1.58, 0.9 * (0.9 * -2.0) + 0.1 * 10.0]))
    torch.testing.assert_close(ema.model.b, torch.tensor(0.9 * (0.9 * 0.5 + 0.1 * 1.5) + 0.1 * -1.0))
    assert ema.num_updates.item() == 2
    # The model itself is untouched by the EMA.
    torch.testing.assert_close(model.w.detach(), torch.tensor([5.0, 10.0]), atol=0, rtol=0)


def test_warmup_decay_by_hand() -> None:
    # min(decay, (1 + n) / (10 + n)): 1/10, 9/18, 81/90 for n = 0, 8, 80; then capped at decay.
    assert warmup_decay(0.999, 0) == pytest.approx(0.1)
    assert warmup_decay(0.999, 8) == pytest.approx(0.5)
    assert warmup_decay(0.999, 80) == pytest.approx(0.9)
    assert warmup_decay(0.95, 1000) == 0.95
    assert warmup_decay(0.0, 5) == 0.0


def test_warmup_update_uses_the_device_step() -> None:
    model = Tiny()
    ema = EMA(model, decay=0.999)  # warmup on, as in training
    expected_w = [1.0, -2.0]
    for n, new in enumerate([[3.0, 0.0], [5.0, 1.0], [-1.0, 4.0]]):
        d = warmup_decay(0.999, n)
        assert ema.current_decay().item() == pytest.approx(d, rel=1e-12)
        _set(model, new, 0.0, [0.0, 0.0])
        ema.update(model)
        expected_w = [d * s + (1 - d) * p for s, p in zip(expected_w, new, strict=True)]
        torch.testing.assert_close(ema.model.w, torch.tensor(expected_w), rtol=1e-6, atol=1e-7)
    # First update: d = 0.1, so the average is mostly the new weights, not the initial ones.
    assert warmup_decay(0.999, 0) == pytest.approx(0.1)


def test_shadow_is_a_frozen_eval_copy() -> None:
    model = Tiny().train()
    ema = EMA(model, decay=0.5)
    assert not ema.model.training and not any(p.requires_grad for p in ema.model.parameters())
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(ema.model.parameters(), model.parameters(), strict=True))
    with torch.no_grad():
        model.w.add_(1.0)
    torch.testing.assert_close(ema.model.w, torch.tensor([1.0, -2.0]), atol=0, rtol=0)  # no aliasing
    with pytest.raises(ValueError, match="decay"):
        EMA(model, decay=1.0)


def test_state_dict_round_trip_continues_bitwise() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    ema = EMA(model, decay=0.99)
    steps = [[torch.randn_like(p) for p in model.parameters()] for _ in range(6)]

    def advance(e: EMA, updates: list[list[torch.Tensor]]) -> None:
        for new in updates:
            with torch.no_grad():
                for p, v in zip(model.parameters(), new, strict=True):
                    p.copy_(v)
            e.update(model)

    advance(ema, steps[:3])
    state = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in ema.state_dict().items()}
    state["model"] = {k: v.clone() for k, v in state["model"].items()}
    advance(ema, steps[3:])

    restored = EMA(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)), decay=0.99)
    restored.load_state_dict(state)
    assert restored.num_updates.item() == 3
    advance(restored, steps[3:])
    assert restored.num_updates.item() == ema.num_updates.item() == 6
    for (name, a), b in zip(ema.model.state_dict().items(), restored.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
