"""The training step: the one piece of code that ``train()`` runs and the benchmark times.

One step is: draw pair indices on the device, gather and mix the pairs, forward, loss, backward,
(optional) gradient clipping, the optimizer step, the loss running sum. ``TrainStep.run`` adds what
surrounds every step in a real run: the learning-rate schedule and the periodic finite-loss check.

On CUDA the step is *captured once in a CUDA graph and replayed*. At the reference batch of 32 a
U-Net step is ~200 small kernels whose launch cost exceeds their run time, so eager PyTorch (and
torch.compile without graphs, whose extra guards made it 0.78x eager there) leaves the GPU idle.
We capture by hand with ``torch.cuda.graph`` rather than ``torch.compile(mode="reduce-overhead")``:
- the *whole* step goes into one graph, optimizer included, not just the compiled forward/backward;
- nothing recompiles or re-records behind our back (validation runs the eager module, so the
  train/eval switch and the different validation batch never invalidate the graph);
- what is static is explicit: the index buffers, the lr tensor, the loss sum.
The optimizer is ``Adam(fused=True, capturable=True)`` with the learning rate as a device tensor,
so the schedule is one ``fill_`` outside the graph and never needs a recapture.

torch.compile is told ``dynamic=False``: a step has one batch size for its whole life. Left to
its default, dynamo notices when a second model in the same process (another batch size in the
benchmark, a second run in a notebook or a reused worker) is called with a new batch size, and
compiles that one with a *symbolic* batch dimension: kernels for any size rather than this one,
and on CUDA no conv layout optimisation (Inductor turns it off for symbolic shapes; for `seed`
its other heuristics turn it off anyway). A trial process compiles one batch size, statically;
this makes every other process do the same.

Index drawing stays *outside* the graph: the sampler's generator then advances exactly as in an
eager run (same pairs, same checkpointed RNG state, exact resume), for one extra tiny kernel.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from bss_model import losses
from bss_model.config import TrainConfig
from bss_model.data import PairSampler, mix
from bss_model.runtime import Runtime

# How often (in steps) the running loss is checked for NaN/inf. Checking every step would force a
# device sync per step; a non-finite loss poisons the running sum, so a periodic check of the sum
# catches it within this many steps.
FINITE_CHECK_EVERY = 50
# Eager steps run (on a side stream) before capture, so lazy state exists when the graph is
# recorded: cuDNN's autotuned algorithms, torch.compile's kernels, the optimizer's moments.
# Their effect on the weights is undone before the first real step.
CAPTURE_WARMUP = 3


def _cosine(progress: float, lr: float, min_lr: float) -> float:
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, max(0.0, progress))))


def cosine_lr(step: int, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """Linear warmup to ``lr`` over ``warmup`` steps, then cosine decay to ``min_lr``."""
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    return _cosine((step - warmup) / max(1, total - warmup), lr, min_lr)


def progress_lr(progress: float, warmup: float, lr: float, min_lr: float) -> float:
    """:func:`cosine_lr` over a fraction of the run instead of a step count (a time-limited run, whose
    progress is the larger of its step and time fractions): linear warmup over the first ``warmup``
    of the run, then cosine decay, reaching ``min_lr`` at progress 1."""
    if warmup > 0 and progress < warmup:
        return lr * max(progress, 1e-6) / warmup
    return _cosine((progress - warmup) / max(1e-12, 1 - warmup), lr, min_lr)


def build_optimizer(model: torch.nn.Module, t: TrainConfig, **kwargs) -> torch.optim.Optimizer:
    """``train.optimizer``: Adam (the reference) or AdamW; ``kwargs`` pass through (e.g. fused=True).

    Adam's weight_decay is L2 on every parameter, as in the reference and torch. AdamW's is
    decoupled and skips the 1-D tensors (biases, batch-norm scales and shifts): shrinking a BN
    scale or a bias towards 0 is no regulariser, it only fights the normalisation.
    """
    if t.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=t.lr, eps=t.adam_eps, weight_decay=t.weight_decay, **kwargs)
    params = list(model.parameters())
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": t.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=t.lr, eps=t.adam_eps, **kwargs)


def build_plateau(opt: torch.optim.Optimizer, t: TrainConfig) -> torch.optim.lr_scheduler.ReduceLROnPlateau:
    """``schedule: plateau``: torch's ReduceLROnPlateau on validation MSE, stepped once per epoch."""
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt,
        mode="min",
        factor=t.plateau_factor,
        patience=t.plateau_patience,
        threshold=t.plateau_threshold,
        threshold_mode=t.plateau_threshold_mode,
        min_lr=t.min_lr,
    )


def make_optimizer(model: torch.nn.Module, t: TrainConfig, capturable: bool, device: torch.device):
    """The optimizer as the step needs it: fused on CUDA; inside a captured graph, capturable with
    one lr *tensor per group* (a shared one would be scaled once per group by ReduceLROnPlateau)."""
    if not capturable:
        return build_optimizer(model, t, fused=True if device.type == "cuda" else None)
    opt = build_optimizer(model, t, fused=True, capturable=True)
    for group in opt.param_groups:
        group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)
    return opt


class TrainStep:
    """One optimizer step over fresh pairs; eager, or replayed from a CUDA graph.

    ``model`` owns the weights (already on the device, in the runtime's memory format);
    ``net`` is what is called (``model`` itself, or torch.compile of it).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        sampler: PairSampler,
        t: TrainConfig,
        rt: Runtime,
        objective: losses.Objective | None = None,
        ema=None,
    ) -> None:
        self.model, self.sampler, self.rt, self.ema = model, sampler, rt, ema
        self.objective = objective or losses.objective("mse")
        self.grad_clip = t.grad_clip
        self.net = torch.compile(model, dynamic=False) if rt.compile else model
        self.graphed = rt.cuda_graphs
        dev = rt.device
        self.opt = make_optimizer(model, t, capturable=self.graphed, device=dev)
        self._lrs = [g["lr"] for g in self.opt.param_groups] if self.graphed else []  # tensors the graph reads
        self.idx_digit = torch.zeros(t.batch_size, dtype=torch.long, device=dev)
        self.idx_fashion = torch.zeros(t.batch_size, dtype=torch.long, device=dev)
        self.loss_sum = torch.zeros((), device=dev)  # sums of step losses since reset_sums()
        self.mse_sum = torch.zeros((), device=dev)  # ... and of step MSEs (== loss_sum with the mse loss)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.steps_run = 0  # steps the last run() call ran

    # -- the learning rate -------------------------------------------------------------
    def set_lr(self, lr: float) -> None:
        for group in self.opt.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr

    def _adopt_lr(self) -> None:
        """Put the graph's lr tensors back into the optimizer after a load replaced them."""
        for group, lr in zip(self.opt.param_groups, self._lrs, strict=False):
            if group["lr"] is not lr:
                lr.fill_(float(group["lr"]))
                group["lr"] = lr

    def reset_sums(self) -> None:
        self.loss_sum.zero_()
        self.mse_sum.zero_()

    def load_optimizer_state(self, state: dict) -> None:
        if self.graph is not None:
            raise RuntimeError("load the optimizer state before the first step: the graph holds its tensors")
        self.opt.load_state_dict(state)
        self._adopt_lr()

    # -- one step ----------------------------------------------------------------------
    def _body(self) -> None:
        """Everything on the device between two index draws (captured as-is on CUDA)."""
        x, y = mix(self.sampler.digit[self.idx_digit], self.sampler.fashion[self.idx_fashion])
        if self.rt.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self.rt.autocast(cache_enabled=not self.graphed):  # autocast's weight cache breaks replays
            pred = self.net(x)
        loss, mse = self.objective(pred.float(), y)
        loss.backward()
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip, foreach=True)
        self.opt.step()
        if self.ema is not None:
            self.ema.update(self.model)
        self.loss_sum += loss.detach()
        self.mse_sum += mse

    def __call__(self) -> None:
        self.sampler.draw_indices(self.idx_digit, self.idx_fashion)
        if not self.graphed:
            self.opt.zero_grad(set_to_none=True)
            self._body()
            return
        if self.graph is None:
            self._capture()
        self.graph.replay()

    def _state_tensors(self) -> list[torch.Tensor]:
        tensors = [*self.model.parameters(), *self.model.buffers(), self.loss_sum, self.mse_sum]
        for state in self.opt.state.values():
            tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
        if self.ema is not None:
            tensors += list(self.ema.tensors())
        return tensors

    def _capture(self) -> None:
        """Record ``_body`` once; the warm-up steps it needs first leave no trace in the run."""
        before = {id(t): t.detach().clone() for t in self._state_tensors()}
        side = torch.cuda.Stream(self.rt.device)
        side.wait_stream(torch.cuda.current_stream(self.rt.device))
        with torch.cuda.stream(side):
            for _ in range(CAPTURE_WARMUP):
                self.opt.zero_grad(set_to_none=True)
                self._body()
        torch.cuda.current_stream(self.rt.device).wait_stream(side)
        self.opt.zero_grad(set_to_none=True)  # backward in the graph then *writes* fresh .grad buffers
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._body()
        # Undo the warm-up: every tensor the run had goes back to its value; optimizer state the
        # warm-up created (a fresh run's Adam moments and step counts) goes back to Adam's zeros.
        with torch.no_grad():
            for t in self._state_tensors():
                saved = before.get(id(t))
                t.copy_(saved) if saved is not None else t.zero_()

    # -- steps with the schedule and the finite check ------------------------------------
    def run(
        self,
        n: int,
        lr_at: Callable[[int], float] | None = None,
        start: int = 0,
        on_step: Callable[[int, float | None], None] | None = None,
        check_every: int = FINITE_CHECK_EVERY,
        until: Callable[[], bool] | None = None,
    ) -> int | None:
        """Run ``n`` steps (global step numbers ``start``, ``start + 1``, ...), or fewer: ``until()`` is asked
        after every step (a time-limited epoch's clock) and ends the call when it says so. ``steps_run`` then
        holds the steps this call ran.

        Returns None, or the step (1-based within this call) at whose check the running loss was
        found non-finite; the run stops there.
        ``lr_at(step)`` is the per-step schedule (None: the lr only changes between calls).
        ``on_step(steps_done, loss_sum)`` is called after every step; ``loss_sum`` is the running
        sum at each finite check (every ``check_every`` steps, at most FINITE_CHECK_EVERY), where
        the loop syncs with the device anyway, and None in between: progress lines and bars
        read the loss at no extra cost.
        """
        check_every = max(1, min(check_every, FINITE_CHECK_EVERY))
        self.steps_run = 0
        for i in range(n):
            if lr_at is not None:
                self.set_lr(lr_at(start + i))
            self()
            self.steps_run = i + 1
            last = i + 1 == n or (until is not None and until())
            if (i + 1) % check_every == 0 or last:
                total = float(self.loss_sum)
                if on_step is not None:
                    on_step(i + 1, total)
                if not math.isfinite(total):
                    return i + 1
            elif on_step is not None:
                on_step(i + 1, None)
            if last:
                break
        return None
