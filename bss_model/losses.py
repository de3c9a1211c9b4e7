"""Training losses: pure functions of (prediction, target), and the objective the train step calls.

The *score* is always MSE (validation, the protocol, the search metric); ``train.loss`` only
changes what the optimiser descends:

- ``mse``: mean squared error, the reference.
- ``l1``: mean absolute error. Its gradient does not shrink with the error, so it keeps
  pushing on the many small residuals that MSE stops caring about.
- ``charbonnier``: ``mean(sqrt(d² + eps²) - eps)``, a smooth L1 (LapSRN, EDVR): quadratic for
  ``|d| << eps``, linear for ``|d| >> eps``. The ``- eps`` makes a perfect prediction cost 0
  (it does not change the gradient).

- ``edge``: ``mse + λ · edge_mse``, where ``edge_mse`` is the MSE of the Sobel gradients (x and y, every
  channel, zero padding). The Sobel operator is linear, so ``edge_mse`` is a quadratic form of the residual,
  ``E‖S(f - y)‖²``, minimised like the MSE by the conditional mean ``E[y | x]``: it moves no optimum, it only
  weights a finite network's high-frequency errors (the strokes' and the garments' edges) more while λ > 0.
  λ starts at ``train.edge_weight`` and is annealed to 0 (``edge_weight_at``), because the score is plain MSE.

No focal loss. A focal-weighted MSE (the weight grows with the error: ``w(|d|) · d²``, e.g. Focal-R's
``tanh(β|d|)^γ · d²``, Yang et al. 2021) is not sound for a score that is MSE. (1) Its pointwise minimiser is
not the conditional mean wherever the posterior of a pixel is skewed -- here nearly everywhere: both sources
are >= 0 with a mass of exact zeros, and where the two overlap the split is ambiguous -- so at its optimum it
has a higher MSE than MSE's own optimum. (2) Its gradient vanishes faster than MSE's as ``d -> 0``
(``w -> 0`` there), so it gives up on the many small residuals the score still counts: the opposite of L1's
reason to be here. A weight that depends on the input alone would keep the minimiser, but that is no longer a
focal (hard-example) loss. So the project has none, and ``train.loss`` offers no ``focal``.

Everything is plain tensor arithmetic (no ``.item()``, no branching on values), so an
objective can run inside a captured CUDA graph or ``torch.compile``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

LOSSES = ("mse", "l1", "charbonnier", "edge")

# (prediction, target) -> (loss to backpropagate, detached MSE for the train_mse metric)
Objective = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(pred, target)


def l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.l1_loss(pred, target)


def charbonnier(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    diff = pred - target
    return (torch.sqrt(diff * diff + eps * eps) - eps).mean()


def sobel_kernel(device: str | torch.device | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The two 3x3 Sobel kernels, ``[2, 1, 3, 3]``: d/dx (columns) then d/dy (rows), as ``F.conv2d`` applies them."""
    gx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=device, dtype=dtype)
    return torch.stack([gx, gx.T]).unsqueeze(1)


def sobel(x: torch.Tensor, kernel: torch.Tensor | None = None) -> torch.Tensor:
    """Sobel gradients of every channel of ``x`` ``[N, C, H, W]``, zero-padded: ``[N, 2C, H, W]``
    (channel 2c is d/dx of channel c, 2c + 1 its d/dy). ``kernel``: :func:`sobel_kernel`, made once by a caller
    that runs inside a captured CUDA graph (no host-to-device copy there)."""
    n, c, h, w = x.shape
    kernel = sobel_kernel(x.device, x.dtype) if kernel is None else kernel
    return F.conv2d(x.reshape(n * c, 1, h, w), kernel, padding=1).reshape(n, 2 * c, h, w)


def edge_mse(pred: torch.Tensor, target: torch.Tensor, kernel: torch.Tensor | None = None) -> torch.Tensor:
    """MSE of the Sobel gradients, ``mean((S(pred) - S(target))²)``; S is linear, so one pass over the residual.
    Its gain for white-noise residuals is 12 (the sum of a kernel's squared taps), less for smooth ones."""
    return sobel(pred - target, kernel).square().mean()


def edge_loss(
    pred: torch.Tensor, target: torch.Tensor, weight: float | torch.Tensor, kernel: torch.Tensor | None = None
) -> torch.Tensor:
    """``mse + weight · edge_mse``."""
    return mse(pred, target) + weight * edge_mse(pred, target, kernel)


# λ's schedule. The edge term is off for the last quarter of training: the weights scored at the end (and an EMA
# of them, which averages the last ~1/(1 - decay) steps) are then trained on the score alone, for at least a
# quarter of the budget, at the lr the schedule has there.
EDGE_ANNEAL_FRACTION = 0.75


def edge_weight_at(step: int, total: int, weight: float) -> float:
    """λ at optimizer step ``step`` (0-based) of ``total``: ``weight`` at the first step, then a cosine decay to 0
    at 3/4 of the steps, then 0 to the last step (0 whenever there are two steps or more)::

        λ(s) = weight · (1 + cos(π · min(1, p / 0.75))) / 2,    p = s / (total - 1)
    """
    return edge_weight_of_progress(step / max(1, total - 1), weight)


def edge_weight_of_progress(progress: float, weight: float) -> float:
    """:func:`edge_weight_at` over a fraction of the run, in [0, 1], instead of a step count: a time-limited run
    (``train.time_limit_s``), whose progress is the one its learning rate follows (the larger of its step and
    time fractions), so λ reaches 0 at 3/4 of its wall time even when the steps it will get are unknown."""
    return weight * 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, progress) / EDGE_ANNEAL_FRACTION)))


class EdgeObjective:
    """``train.loss = edge`` as the train step calls it: ``(pred, target) -> (mse + λ · edge_mse, mse)``.

    λ is a 0-d tensor on the device, changed between steps by :meth:`set_weight` (an in-place ``fill_``, like the
    learning-rate tensors): a captured CUDA graph reads it at every replay, and torch.compile sees no new
    constant. The Sobel kernel is made here, once, for the same reason.
    """

    def __init__(self, weight: float, device: str | torch.device = "cpu") -> None:
        self.weight = torch.tensor(float(weight), dtype=torch.float32, device=device)
        self.kernel = sobel_kernel(device)

    def set_weight(self, value: float) -> None:
        self.weight.fill_(value)

    def __call__(self, pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = mse(pred, target)
        return m + self.weight * edge_mse(pred, target, self.kernel), m.detach()


def objective(
    name: str, charbonnier_eps: float = 1e-3, edge_weight: float = 0.1, device: str | torch.device = "cpu"
) -> Objective:
    """The train step's loss: returns ``(loss, mse)`` where ``mse`` is detached, for logging.

    With ``mse`` both are the same tensor: the reference step computes exactly what it always did.
    ``edge`` returns an :class:`EdgeObjective` on ``device`` (its λ is set per step by the trainer).
    """
    if name == "edge":
        return EdgeObjective(edge_weight, device)
    if name == "mse":

        def mse_objective(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            loss = mse(pred, target)
            return loss, loss.detach()

        return mse_objective
    if name == "l1":
        fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = l1
    elif name == "charbonnier":

        def fn(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return charbonnier(pred, target, charbonnier_eps)
    else:
        raise ValueError(f"unknown loss {name!r}: use one of {', '.join(LOSSES)}")

    def other_objective(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return fn(pred, target), mse(pred.detach(), target)

    return other_objective
