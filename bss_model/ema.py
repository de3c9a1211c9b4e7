"""Exponential moving average (EMA) of the weights, for evaluation (``train.ema_decay``; 0 = off).

After every optimizer step::

    d      = min(decay, (1 + n) / (10 + n))        n = updates so far (the warmup, see below)
    shadow = d * shadow + (1 - d) * param          every parameter
    shadow_buffer = buffer                         buffers (BN running stats) are copied

The shadow is a full copy of the network (``EMA.model``), kept in eval mode and never
trained: validation, the checkpoint's evaluated weights, ``best_model.pt`` and the protocol
call it. Averaging the last ~1/(1-decay) steps' weights cancels much of the noise SGD
leaves in them, which is worth most late in training and with a high learning rate.

Choices, and why:
- **Warmup** ``(1 + n) / (10 + n)`` (TensorFlow's ``num_updates``, timm's ModelEmaV2 style):
  the shadow starts as the *initial* weights, and with decay 0.999 it would still hold 37%
  of them after 1,000 steps. With the warmup the average forgets the start quickly
  (d = 0.1, 0.5, 0.9, 0.99 after 0, 8, 80, 890 updates) and reaches ``decay`` after
  about 9/(1 - decay) updates (9,000 for 0.999), so early ASHA rungs score a sensible
  average. Always on: it costs nothing and only matters early.
- **Buffers are copied**, not averaged: batch-norm's running statistics are already a moving
  average (momentum 0.1) of recent batches. (Strictly, the statistics of the averaged weights
  differ a little; recomputing them would cost a pass over data per evaluation.)
- **CUDA-graph capturable**: the update is a handful of ``torch._foreach_*`` kernels on
  device tensors. The update count ``n`` is a device tensor and the warmup decay is
  computed on the device, so there is no ``.item()``, no host sync and no Python branching
  on tensor values; a captured graph replays it correctly every step.
- The shadow is built once from the model *after* it was moved to its device and memory
  format (``copy.deepcopy``), so the shadow has the same layout and the lerp is elementwise.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

WARMUP_OFFSET = 10  # d = (1 + n) / (WARMUP_OFFSET + n) during the warmup


def warmup_decay(decay: float, num_updates: int) -> float:
    """The decay of update number ``num_updates`` (0-based): ``min(decay, (1 + n) / (10 + n))``."""
    return min(decay, (1 + num_updates) / (WARMUP_OFFSET + num_updates))


class EMA:
    """An EMA of ``model``'s parameters; ``EMA.model`` is the averaged network to evaluate."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay {decay} must be in [0, 1)")
        self.decay = decay
        self.warmup = warmup
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        device = next(self.model.parameters()).device
        # Device tensors, so update() can be captured in a CUDA graph. int64: exact for any run length.
        self.num_updates = torch.zeros((), dtype=torch.int64, device=device)
        self._decay = torch.tensor(decay, dtype=torch.float64, device=device)

    def current_decay(self) -> torch.Tensor:
        """The decay the next :meth:`update` uses: a 0-d float64 device tensor."""
        if not self.warmup:
            return self._decay
        n = self.num_updates.to(torch.float64)
        return torch.minimum(self._decay, (1 + n) / (WARMUP_OFFSET + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step towards ``model``'s current weights (call after each optimizer step)."""
        shadow = list(self.model.parameters())
        params = [p.detach() for p in model.parameters()]
        # lerp(shadow, param, w) = shadow + w * (param - shadow) = (1 - w) * shadow + w * param.
        weight = 1 - self.current_decay()
        by_dtype = {dtype: weight.to(dtype) for dtype in {p.dtype for p in shadow}}
        torch._foreach_lerp_(shadow, params, [by_dtype[p.dtype] for p in shadow])
        buffers = list(self.model.buffers())
        if buffers:  # a static property of the model, not of tensor values
            torch._foreach_copy_(buffers, list(model.buffers()))
        self.num_updates.add_(1)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor :meth:`update` writes (a captured step saves and restores them around its warm-up)."""
        return [*self.model.parameters(), *self.model.buffers(), self.num_updates]

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "num_updates": self.num_updates, "decay": self.decay}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the shadow weights and the update count exactly (the decay comes from the config)."""
        self.model.load_state_dict(state["model"])
        self.num_updates.copy_(state["num_updates"])
