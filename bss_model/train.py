"""Training: one ``train(config, on_epoch=None)`` used by the CLI, the search trials and the retrain.

Each step draws fresh random (digit, fashion) pairs on the device and mixes them
there (no DataLoader: 60k 32x32 uint8 images fit on any device). Each epoch ends
with a validation pass over one fixed, seeded list of pairs from the held-out 10% of
the *training* sets, an atomic checkpoint, TensorBoard scalars, and a call to
``on_epoch(metrics, checkpoint_dir)`` -- which is how a Ray trial reports.

    python -m bss_model.train --config configs/seed.yaml [--set train.lr=3e-4] [--out runs]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import logging
import math
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bss_model import checkpoint as ckpt
from bss_model import losses
from bss_model.cli import add_common_flags, command_name, overrides, print_config, require_extra, resolve_config
from bss_model.config import (
    Config,
    apply_overrides,
    config_diff,
    config_from_dict,
    describe_diff,
    load_config,
    parse_set,
    save_config,
    set_string,
)
from bss_model.data import PairSampler, Splits, draw_pairs, load_splits, mix
from bss_model.ema import EMA
from bss_model.errors import CheckpointError, ConfigError, cli_entry
from bss_model.evaluate import batched_mse, model_predictor
from bss_model.io import atomic_write_json, atomic_write_text, logging_to, next_run_dir
from bss_model.model import build_model, count_parameters
from bss_model.progress import EpochProgress
from bss_model.runtime import Runtime, apply_torch_settings, check_machine, resolve_runtime
from bss_model.step import FINITE_CHECK_EVERY, TrainStep, build_plateau, cosine_lr, progress_lr
from bss_model.viz import separation_grid

log = logging.getLogger("bss")

OnEpoch = Callable[[dict[str, Any], Path], None]
# The step cap of an epoch that ends on time alone (train.samples_per_epoch 0 with a time limit).
UNCAPPED_STEPS = 2**62

# Each epoch's metrics, one JSON line, appended as the epoch ends (after its checkpoint), so that an outside
# agent (a W&B agent, Syne Tune's local backend, an Optuna ask/tell loop) can follow a run while it trains.
# metrics.json, written at the end, holds the same history with the run's status.
METRICS_LOG = "metrics.jsonl"


@dataclass
class TrainResult:
    status: str  # "completed" | "diverged"
    reason: str
    epochs_done: int
    metrics: dict[str, Any]  # the last epoch's metrics
    history: list[dict[str, Any]] = field(default_factory=list)
    out_dir: Path | None = None
    checkpoint_dir: Path | None = None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


class _Trainer:
    """The state of one run; ``train()`` below is the public entry point."""

    def __init__(
        self, cfg: Config, out_dir: Path, splits: Splits | None, ckpt_dir: Path, tb_dir: Path | None = None
    ) -> None:
        self.cfg = cfg
        self.out_dir = out_dir
        self.tb_dir = tb_dir if tb_dir is not None else out_dir / "tb"
        self.ckpt_dir = ckpt_dir
        t = cfg.train
        seed_everything(t.seed)
        self.rt: Runtime = resolve_runtime(t)
        apply_torch_settings(self.rt, t.threads)
        splits = splits if splits is not None else load_splits(cfg.data)
        dev = self.rt.device
        self.sampler = PairSampler(splits.train_digit, splits.train_fashion, dev, seed=t.seed)
        self.val_digit = torch.as_tensor(splits.val_digit, device=dev)
        self.val_fashion = torch.as_tensor(splits.val_fashion, device=dev)
        # The same validation pairs for every epoch, trial and seed: val MSEs are comparable.
        self.val_idx = draw_pairs(len(splits.val_digit), len(splits.val_fashion), cfg.data.val_pairs, cfg.data.val_seed)
        self.model = self.rt.prepare_model(build_model(cfg.model))
        self.n_params = count_parameters(self.model)
        # The EMA shadow is copied from the model after prepare_model (same device and layout).
        # eval_model: the weights validation, checkpoints and the protocol score (always eager:
        # evaluation never triggers a recompile or touches the captured step).
        self.ema = EMA(self.model, t.ema_decay) if t.ema_decay > 0 else None
        self.eval_model = self.ema.model if self.ema else self.model
        # (loss to descend, detached MSE): the score is always MSE, whatever train.loss is.
        objective = losses.objective(t.loss, t.charbonnier_eps)
        self.step_fn = TrainStep(self.model, self.sampler, t, self.rt, objective=objective, ema=self.ema)
        self.opt = self.step_fn.opt
        self.plateau = build_plateau(self.opt, t) if t.schedule == "plateau" else None
        self.epoch = 0  # epochs completed
        self.step = 0  # optimizer steps completed
        self.samples = 0  # training samples seen (steps x batch_size, summed over epochs)
        # A time-limited run's clock: the wall time it has used (checkpointed, so a resumed run goes on with
        # what is left), and the seconds the last epoch spent after training (validation, checkpoint,
        # reporting), which the next epoch leaves free at the end of its time slice.
        self.time_used = 0.0
        self.clock0 = time.perf_counter()
        self.epoch_tail = 0.0
        self.history: list[dict[str, Any]] = []
        self.writer = None
        self.progress_bar = False  # a per-epoch bar on stderr (bss_model.progress); the CLI turns it on for terminals

    def open_writer(self) -> None:
        """Start TensorBoard logging (after a resume was accepted: a refused one leaves no event file)."""
        if self.cfg.train.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.tb_dir))

    # -- checkpoint --------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        # "model" is always the weights to *evaluate* (checkpoint.load_model, best_model.pt); with
        # an EMA those are the average, and the raw weights travel as "train_model" for resume.
        ema = {}
        if self.ema:
            ema = {
                "train_model": self.model.state_dict(),
                "ema": {"num_updates": self.ema.num_updates, "decay": self.ema.decay},
            }
        return {
            "config": self.cfg.to_dict(),
            "model": self.eval_model.state_dict(),
            **ema,
            "optimizer": self.opt.state_dict(),
            "scheduler": self.plateau.state_dict() if self.plateau else {},
            "sampler": self.sampler.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "python": random.getstate(),
            },
            "epoch": self.epoch,
            "step": self.step,
            "samples": self.samples,
            "time_used_s": self.elapsed(),
            "history": self.history,
            "n_params": self.n_params,
        }

    def save(self) -> Path:
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        ckpt.save(self.state(), self.ckpt_dir / ckpt.FILENAME)
        save_config(self.cfg, self.ckpt_dir / "config.yaml")
        return self.ckpt_dir

    def restore(self, path: str | Path) -> None:
        state = ckpt.load(path, map_location=self.rt.device)
        saved = ckpt.config_of(state, path)
        if saved.model != self.cfg.model:
            diff = config_diff(
                {"model": dataclasses.asdict(saved.model)}, {"model": dataclasses.asdict(self.cfg.model)}
            )
            raise CheckpointError(
                f"checkpoint {path} was trained as another model ({describe_diff(diff, 'checkpoint', 'asked')}): "
                "resume with the checkpoint's config or start a new run"
            )
        weights = ckpt.model_weights(state, path)
        train_weights = ckpt.model_weights(state, path, "train_model") if "train_model" in state else weights
        ckpt.load_weights(self.model, train_weights, path)
        try:
            self._restore_training_state(state, weights, path)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as exc:
            # A body that carries the format marker but not what training wrote (a hand-edited or foreign file).
            raise CheckpointError(
                f"{path} is damaged: its training state cannot be restored ({type(exc).__name__}: "
                f"{' '.join(str(exc).split())[:200]}): resume from another checkpoint, or start a new run"
            ) from None
        log.info("resumed from %s at epoch %d (step %d)", path, self.epoch, self.step)

    def _restore_training_state(
        self, state: dict[str, Any], weights: dict[str, torch.Tensor], path: str | Path
    ) -> None:
        if self.ema and "ema" in state:
            self.ema.load_state_dict({"model": weights, "num_updates": state["ema"]["num_updates"]})
        elif self.ema:
            # The checkpoint was trained without an EMA: start the average at the restored weights.
            log.warning("%s has no EMA state: the EMA starts from its weights", path)
            ckpt.load_weights(self.ema.model, self.model.state_dict(), path)
        self.step_fn.load_optimizer_state(state["optimizer"])
        if self.plateau and state["scheduler"]:
            self.plateau.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["rng"]["torch"].cpu())
        if state["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["rng"]["cuda"]])
        random.setstate(state["rng"]["python"])
        epoch, step, history = state["epoch"], state["step"], list(state["history"])
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in (epoch, step)):
            raise ValueError(f"epoch {epoch!r} and step {step!r} must be counts")
        self.epoch, self.step, self.history = epoch, step, history
        # Checkpoints from before sample budgets lack the count: their batch size never changed mid-run.
        self.samples = state.get("samples", self.step * self.cfg.train.batch_size)
        self.time_used = float(state.get("time_used_s", 0.0))

    # -- the clock of a time-limited run -------------------------------------------------
    def start_clock(self) -> None:
        """Start (or, after a resume, continue) the run's clock: just before its first step."""
        self.clock0 = time.perf_counter() - self.time_used

    def elapsed(self) -> float:
        return time.perf_counter() - self.clock0

    def progress(self, step: int) -> float:
        """How far the run is, in [0, 1]: the larger of its step fraction (when it has a sample budget) and,
        with a time limit, its time fraction. The schedule follows it, so it reaches its end either way."""
        t = self.cfg.train
        total = t.epochs * t.steps_per_epoch
        p = step / total if total else 0.0
        if t.time_limit_s:
            p = max(p, self.elapsed() / t.time_limit_s)
        return min(p, 1.0)

    # -- one epoch ---------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        t = self.cfg.train
        if t.time_limit_s:
            return progress_lr(self.progress(step), t.warmup_epochs / t.epochs, t.lr, t.min_lr)
        total = t.epochs * t.steps_per_epoch
        return cosine_lr(step, total, int(t.warmup_epochs * t.steps_per_epoch), t.lr, t.min_lr)

    def epoch_clock(self) -> tuple[int, Callable[[], bool] | None]:
        """This epoch's step cap, and (with a time limit) when it must stop: at the end of its time slice,
        k/epochs of the limit, less the time the last epoch needed after training (validation, checkpoint)."""
        t = self.cfg.train
        cap = t.steps_per_epoch or UNCAPPED_STEPS
        if not t.time_limit_s:
            return cap, None
        end = self.clock0 + t.time_limit_s * (self.epoch + 1) / t.epochs - self.epoch_tail
        return cap, lambda: time.perf_counter() >= end

    def train_epoch(self) -> tuple[float, float, int, str]:
        """Run one epoch; returns (mean train loss, mean train MSE, steps run, reason if the loss went non-finite)."""
        t = self.cfg.train
        self.model.train()
        self.step_fn.reset_sums()
        lr_at = self.lr_at if t.schedule == "cosine" else None
        cap, until = self.epoch_clock()
        bar = EpochProgress(self.epoch + 1, t.epochs, t.steps_per_epoch, t.batch_size, self.progress_bar)

        def on_step(done: int, loss_sum: float | None) -> None:
            # The loss arrives only at the finite checks, where the step loop has just synced.
            bar.update(done, None if loss_sum is None else loss_sum / done)
            if loss_sum is not None and t.log_every and done % t.log_every == 0:
                log.info("epoch %d step %d/%d loss %.3e", self.epoch + 1, done, t.steps_per_epoch, loss_sum / done)

        try:
            check_every = t.log_every or FINITE_CHECK_EVERY
            bad = self.step_fn.run(cap, lr_at, start=self.step, on_step=on_step, check_every=check_every, until=until)
        finally:
            bar.close()
        n = self.step_fn.steps_run
        self.step += n
        if bad:
            reason = f"non-finite loss at epoch {self.epoch + 1} step {bad} (lr={t.lr:g})"
            return float("nan"), float("nan"), n, reason
        return float(self.step_fn.loss_sum) / n, float(self.step_fn.mse_sum) / n, n, ""

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        self.eval_model.eval()
        # The eager module, not the compiled/graphed step: evaluation never triggers a recompile.
        predict = model_predictor(self.eval_model, self.rt)
        return batched_mse(predict, self.val_digit, self.val_fashion, *self.val_idx, self.cfg.eval.batch_size)

    @torch.no_grad()
    def log_images(self) -> None:
        n = 8
        dev = self.rt.device
        i_digit, i_fashion = (torch.as_tensor(idx[:n], device=dev) for idx in self.val_idx)
        x, y = mix(self.val_digit[i_digit], self.val_fashion[i_fashion])
        self.eval_model.eval()
        pred = model_predictor(self.eval_model, self.rt)(x).float().clamp(0, 1)
        grid = separation_grid(x.cpu().numpy(), y.cpu().numpy(), pred.cpu().numpy())
        self.writer.add_image("val/separation", grid[None], self.epoch, dataformats="CHW")

    def close(self) -> None:
        if self.writer:
            self.writer.close()


def train(
    cfg: Config,
    on_epoch: OnEpoch | None = None,
    out_dir: str | Path = ".",
    resume: str | Path | None = None,
    splits: Splits | None = None,
    checkpoint_dir: str | Path | None = None,
    progress: bool = False,
    tensorboard_dir: str | Path | None = None,
) -> TrainResult:
    """Train ``cfg`` into ``out_dir`` (checkpoint/, tb/, metrics.jsonl as it goes, metrics.json), resuming if asked.

    The checkpoint goes to ``checkpoint_dir`` (default ``out_dir/checkpoint``), rewritten
    atomically after every epoch; the TensorBoard events go to ``tensorboard_dir`` (default
    ``out_dir/tb``). ``progress`` shows a per-epoch bar on stderr (for terminals).

    A non-finite loss does not raise: it ends the run with ``status="diverged"`` and the
    reason, leaving the last good checkpoint in place.
    """
    # The run seeds Python's, numpy's and torch's global generators (seed_everything) and a resume sets them
    # from its checkpoint; the caller gets them back as they were: seeding is the run's, not the process's.
    with _global_rng_restored():
        return _train(cfg, on_epoch, out_dir, resume, splits, checkpoint_dir, progress, tensorboard_dir)


@contextlib.contextmanager
def _global_rng_restored() -> Iterator[None]:
    state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.set_rng_state(state[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def _train(
    cfg: Config,
    on_epoch: OnEpoch | None,
    out_dir: str | Path,
    resume: str | Path | None,
    splits: Splits | None,
    checkpoint_dir: str | Path | None,
    progress: bool,
    tensorboard_dir: str | Path | None,
) -> TrainResult:
    out_dir = Path(out_dir)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir else out_dir / "checkpoint"
    tr = _Trainer(cfg, out_dir, splits, ckpt_dir, Path(tensorboard_dir) if tensorboard_dir else None)
    tr.progress_bar = progress
    if resume is not None:
        tr.restore(resume)  # before writing anything: a refused resume must leave the run folder as it was
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")
    # The epochs the checkpoint holds (none for a new run): a run resumed after a kill between a checkpoint and
    # its line has every epoch once, and one resumed from an older checkpoint drops the epochs it will redo.
    metrics_log = out_dir / METRICS_LOG
    atomic_write_text(metrics_log, "".join(json.dumps(m) + "\n" for m in tr.history))
    tr.open_writer()
    t = cfg.train
    budget = (
        f"{t.epochs} epochs x {t.steps_per_epoch} steps x batch {t.batch_size} = {t.epochs * t.epoch_samples} samples"
    )
    if t.time_limit_s:
        budget = (f"{t.epochs} epochs in {t.time_limit_s:.0f} s" + (f", at most {t.epochs * t.epoch_samples} samples"
                  if t.steps_per_epoch else ", as many samples as fit"))  # fmt: skip
    log.info(
        "training %s (%d params) %s into %s: %s", cfg.model.variant, tr.n_params, tr.rt.describe(), out_dir, budget
    )
    status, reason = "completed", ""
    tr.start_clock()
    try:
        while tr.epoch < t.epochs:
            t0 = time.perf_counter()
            train_loss, train_mse, steps, reason = tr.train_epoch()
            if reason:
                status = "diverged"
                log.warning("run diverged: %s", reason)
                break
            train_time = time.perf_counter() - t0
            val = tr.validate()
            if not math.isfinite(val["mse"]):
                # The loss checks run every few steps; weights can go non-finite after the last one.
                # A NaN score must not pass for a finished run (nor be checkpointed as one).
                status, reason = "diverged", f"non-finite validation MSE at epoch {tr.epoch + 1} (lr={t.lr:g})"
                log.warning("run diverged: %s", reason)
                break
            if tr.plateau:
                tr.plateau.step(val["mse"])
            tr.epoch += 1
            epoch_samples = steps * t.batch_size
            tr.samples += epoch_samples
            metrics = {
                "epoch": tr.epoch,
                "step": tr.step,
                "samples": tr.samples,  # cumulative: the x-axis that compares batch sizes fairly
                "train_mse": train_mse,
                "train_loss": train_loss,  # train.loss's value (== train_mse with the reference's mse)
                "val_mse": val["mse"],
                "val_mse_digit": val["mse_digit"],
                "val_mse_fashion": val["mse_fashion"],
                "lr": tr.opt.param_groups[0]["lr"],
                "samples_per_s": epoch_samples / train_time,
                "train_time_s": train_time,  # the epoch's training; epoch_time_s adds its validation and checkpoint
                "epoch_time_s": time.perf_counter() - t0,
                "time_used_s": tr.elapsed(),  # the run's clock (a time-limited run ends at train.time_limit_s)
            }
            tr.history.append(metrics)
            if tr.writer:
                w, e = tr.writer, tr.epoch
                w.add_scalar("mse/train", train_mse, e)
                w.add_scalar("loss/train", train_loss, e)
                w.add_scalar("mse/val", val["mse"], e)
                w.add_scalar("mse/val_digit", val["mse_digit"], e)
                w.add_scalar("mse/val_fashion", val["mse_fashion"], e)
                w.add_scalar("lr", metrics["lr"], e)
                w.add_scalar("perf/samples_per_s", metrics["samples_per_s"], e)
                if t.image_every and (e % t.image_every == 0 or e == t.epochs or e == 1):
                    tr.log_images()
                w.flush()
            tr.save()
            with open(metrics_log, "a", encoding="utf-8") as f:
                f.write(json.dumps(metrics) + "\n")
            log.info(
                "epoch %d/%d train %.3e val %.3e lr %.1e %.0f samples/s",
                tr.epoch, t.epochs, train_mse, val["mse"], metrics["lr"], metrics["samples_per_s"],
            )  # fmt: skip
            if on_epoch is not None:
                on_epoch(metrics, tr.ckpt_dir)
            tr.epoch_tail = time.perf_counter() - t0 - train_time  # validation, checkpoint, reporting
    finally:
        tr.close()
    last = tr.history[-1] if tr.history else {}
    result = TrainResult(status, reason, tr.epoch, last, tr.history, out_dir, tr.ckpt_dir)
    atomic_write_json(
        out_dir / "metrics.json",
        {"status": status, "reason": reason, "epochs_done": tr.epoch, "n_params": tr.n_params,
         # The budget as run: samples seen in total, and per epoch (= steps_per_epoch x batch_size).
         "samples": tr.samples, "samples_per_epoch": t.epoch_samples, "steps_per_epoch": t.steps_per_epoch,
         "batch_size": t.batch_size, "time_limit_s": t.time_limit_s, "time_used_s": tr.elapsed(),
         "final": last, "history": tr.history},
    )  # fmt: skip
    return result


# What a resumed run may change, each only when asked for by name (--set, --data-dir): where the data
# lives, how the hardware runs it, what it logs, how it is evaluated, and (checked below) its length.
# Everything else is what the checkpoint was trained as: changing it mid-run trains a model nobody asked for.
RESUMABLE = (
    "data.dir", "data.download", "train.device", "train.precision", "train.channels_last", "train.compile",
    "train.cuda_graphs", "train.threads", "train.tensorboard", "train.image_every", "train.log_every",
    "train.epochs", "eval.",
)  # fmt: skip


def resume_config(
    resume: Path, run: Path, config: str | None, sets: list[str]
) -> tuple[Config, dict[str, tuple[Any, Any]]]:
    """The config to resume ``run`` with: its checkpoint's own, plus the changes asked for by name
    (``--set``, and ``--data-dir``, which arrives as a ``--set data.dir=``).

    Returns it with those changes (``{key: (run's, new)}``, for the log). Anything else a ``--config``
    or ``--set`` would change is refused in one line naming each key with both values, before the run
    folder is touched.
    """
    state = ckpt.load(resume)
    saved = ckpt.config_of(state, resume)
    ckpt.model_weights(state, resume)  # damaged or non-finite weights: refused now, not after loading the data
    asked = load_config(config, sets) if config else config_from_dict(apply_overrides(saved.to_dict(), sets))
    named = {".".join(parse_set(item)[0]) for item in sets}
    diff = config_diff(saved, asked)
    allowed = {k: v for k, v in diff.items() if k in named and k.startswith(RESUMABLE)}
    refused = {k: v for k, v in diff.items() if k not in allowed}
    source = f"--config {config}" if config else "--set"
    if refused:
        raise ConfigError(
            f"cannot resume {run}: {source} differs from the run's config ({describe_diff(refused)}); drop "
            f"{'--config' if config else 'those --set'} to resume with the run's own config (config.yaml), or start "
            "a new run without --resume (nothing was written)"
        )
    if "train.epochs" in allowed:
        done, epochs = state.get("epoch", 0), asked.train.epochs
        if epochs < done:
            raise ConfigError(
                f"cannot resume {run} with train.epochs={epochs}: it has already trained {done} epochs; "
                f"set train.epochs to {done} or more"
            )
        if saved.train.schedule == "cosine":
            raise ConfigError(
                f"cannot resume {run} with train.epochs={epochs} (was {saved.train.epochs}): its cosine schedule "
                "decays over train.epochs, so a new length changes the learning rate of every step to come; "
                "start a new run instead"
            )
    return asked, allowed


# The CUDA allocator's, the CUDA runtime's and the CPU allocator's words for an allocation that failed.
_OOM_TEXTS = ("CUDA out of memory", "CUDA error: out of memory", "can't allocate memory", "not enough memory")


def out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or any(text in str(exc) for text in _OOM_TEXTS)


def new_run_dir(root: Path, name: str) -> Path:
    """:func:`next_run_dir`, with an --out that cannot hold run folders refused in one line."""
    if root.exists() and not root.is_dir():
        raise ConfigError(f"--out {root} is a file, not a folder: pass a folder for the runs (each gets a subfolder)")
    try:
        return next_run_dir(root, name)
    except OSError as exc:
        raise ConfigError(
            f"--out {root} cannot hold run folders ({exc.strerror or exc}): pass a writable folder"
        ) from None


def main(argv: list[str] | None = None) -> int:
    @cli_entry
    def _main() -> int:
        prog = command_name("bss-train", "python -m bss_model.train")
        p = argparse.ArgumentParser(prog=prog, description="Train one U-Net configuration.")
        p.add_argument("--config", default=None,
                       help="a YAML file or a shipped config's name (seed); else the defaults")  # fmt: skip
        p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set train.lr=3e-4 (repeatable)")  # fmt: skip
        p.add_argument("--out", default="runs", help="root folder; each run gets an auto-numbered subfolder")
        p.add_argument("--data-dir", default=None, help="folder with mnist/ and fashion-mnist/ (sets data.dir)")
        p.add_argument("--resume", default=None,
                       help="checkpoint.pt or run folder to continue from, with the run's own config; "
                       "--set may change its epochs, hardware, logging and eval settings")  # fmt: skip
        p.add_argument("--metrics-stdout", action="store_true",
                       help="also print each epoch's metrics as a JSON line on stdout as it ends (they always go to "
                       "metrics.jsonl in the run folder), for an outside sweeper reading them live")  # fmt: skip
        add_common_flags(p, "bss-train", "model")
        args = p.parse_args(argv)
        if args.config:
            args.config = resolve_config(args.config, "model")
        # A path is a string as typed, never YAML (`data #1` is no comment): set_string quotes it.
        sets = overrides(args) + ([set_string("data.dir", str(Path(args.data_dir).resolve()))] if args.data_dir else [])
        changes: dict[str, tuple[Any, Any]] = {}
        if args.resume:
            resume = ckpt.resolve_path(args.resume)
            out = resume.parent.parent if resume.parent.name == "checkpoint" else resume.parent
            cfg, changes = resume_config(resume, out, args.config, sets)
        else:
            cfg = load_config(args.config, sets)
            resume = None
        if args.print_config:
            print_config(cfg.to_dict())
            return 0
        check_machine(cfg.train)  # this machine's devices and CPUs, before a run folder is made
        if cfg.train.tensorboard:
            require_extra("search", "bss-train's TensorBoard logging (train.tensorboard=true; false turns it off)",
                          ("tensorboard",))  # fmt: skip
        if resume is None:
            out = new_run_dir(Path(args.out), Path(args.config).stem if args.config else "default")

        def on_epoch(metrics: dict[str, Any], checkpoint_dir: Path) -> None:
            if args.metrics_stdout:
                print(json.dumps(metrics), flush=True)

        # With --metrics-stdout, stdout carries JSON lines alone (each epoch's, then the result's); the log: stderr.
        with logging_to(out / "train.log", stream=sys.stderr if args.metrics_stdout else None):
            if changes:
                log.info("resuming with changes asked for: %s", describe_diff(changes, "was", "now"))
            # The bar only on a terminal (and with tqdm, of the search extra): CI logs and redirected output keep
            # just the plain per-epoch lines.
            bar = sys.stderr.isatty() and importlib.util.find_spec("tqdm") is not None
            try:
                result = train(cfg, on_epoch=on_epoch, out_dir=out, resume=resume, progress=bar)
            except (torch.OutOfMemoryError, RuntimeError) as exc:
                if not out_of_memory(exc):
                    raise
                log.error("out of memory: %s", " ".join(str(exc).split())[:300])  # the allocator's detail
                raise ConfigError(
                    f"training {cfg.model.variant} ({cfg.model.filters} filters) with train.batch_size="
                    f"{cfg.train.batch_size} ran out of memory on {cfg.train.device}: lower train.batch_size, "
                    f"eval.batch_size or model.filters (the last epoch's checkpoint in {out} is intact)"
                ) from None
        print(json.dumps({"status": result.status, "reason": result.reason, "run_dir": str(out), **result.metrics}))
        return 0 if result.status == "completed" else 1

    return _main()


if __name__ == "__main__":
    raise SystemExit(main())
