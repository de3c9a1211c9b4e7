"""Training losses: pure functions of (prediction, target), and the objective the train step calls.

The *score* is always MSE (validation, the protocol, the search metric); ``train.loss`` only
changes what the optimiser descends:

- ``mse``: mean squared error, the reference.
- ``l1``: mean absolute error. Its gradient does not shrink with the error, so it keeps
  pushing on the many small residuals that MSE stops caring about.
- ``charbonnier``: ``mean(sqrt(d² + eps²) - eps)``, a smooth L1 (LapSRN, EDVR): quadratic for
  ``|d| << eps``, linear for ``|d| >> eps``. The ``- eps`` makes a perfect prediction cost 0
  (it does not change the gradient).

Everything is plain tensor arithmetic (no ``.item()``, no branching on values), so an
objective can run inside a captured CUDA graph or ``torch.compile``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

LOSSES = ("mse", "l1", "charbonnier")

# (prediction, target) -> (loss to backpropagate, detached MSE for the train_mse metric)
Objective = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(pred, target)


def l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.l1_loss(pred, target)


def charbonnier(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    diff = pred - target
    return (torch.sqrt(diff * diff + eps * eps) - eps).mean()


def objective(name: str, charbonnier_eps: float = 1e-3) -> Objective:
    """The train step's loss: returns ``(loss, mse)`` where ``mse`` is detached, for logging.

    With ``mse`` both are the same tensor: the reference step computes exactly what it always did.
    """
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
