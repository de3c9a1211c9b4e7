"""The Ray Tune trainable: a thin wrapper around ``bss_model.train.train``.

It turns the sampled hyperparameters into a ``bss_model`` config, trains with an
``on_epoch`` that calls ``ray.tune.report(metrics, checkpoint=...)``, and resumes
from ``ray.tune.get_checkpoint()`` when Tune restarts the trial after a failure.
Everything the trial writes in its folder (``tune.get_context().get_trial_dir()``: TensorBoard
events, metrics.json, metrics.jsonl, config.yaml) is synced to ``storage_path`` as trial artifacts.

A trial given a fraction of a GPU (``tune.gpus_per_trial`` < 1) caps its CUDA memory at that
share first: Ray's fractional GPUs are a scheduling promise, not isolation, and without the cap
one trial's caching allocator can grow until its neighbours fail. A trial that needs more than
its share fails with one line naming ``tune.gpus_per_trial``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from ray import tune

from bss_model.data import Splits
from bss_model.runtime import cap_gpu_memory, resolve_device
from bss_model.train import train
from search.config import with_overrides

METRIC = "val_mse"  # search.selection.METRIC (not imported: selection imports the storage layer)

log = logging.getLogger("bss")

# Written into a checkpoint when its run diverged: a retry restored from it fails at
# once with the same reason instead of re-training into the same NaN.
DIVERGED_MARKER = "diverged.json"

# A trial hands Tune a checkpoint at its first and its last epoch, and in between at most once per
# CHECKPOINT_EVERY_S (it reports its metrics every epoch, for ASHA). Tune forces an experiment-state
# snapshot whenever one trial has reported CheckpointConfig(num_to_keep) checkpoints since the last
# snapshot; a checkpoint every epoch of a few seconds made that a snapshot every few seconds. A short
# trial still forces one as it ends (its two checkpoints), so Ray's "snapshotting has been triggered
# multiple times" can still come from trials ending together: search.console.entry_point turns that
# warning off at tune.verbose 0. A retry after a failure repeats at most this much training.
CHECKPOINT_EVERY_S = 30.0
# A time-boxed trial may end this much after the search's deadline and still count: its last epoch's
# validation and report, which the epoch slices cannot time to the second.
DEADLINE_SLACK_S = 5.0


class TrialDiverged(RuntimeError):
    """The trial's loss went non-finite; the trial ends errored with this reason."""


class TrialOutOfMemory(RuntimeError):
    """The trial ran out of CUDA memory (its share of the card); the message is the one line the report shows."""


def out_of_memory_message(share: float, card_bytes: int | None) -> str:
    """The one line for a trial that ran out of GPU memory, with what it had and the fix."""
    if 0 < share < 1:
        size = f", {share * card_bytes / 2**30:.1f} GiB" if card_bytes else ""
        return (
            f"trial ran out of its GPU share ({share:g} of the card{size}): raise tune.gpus_per_trial "
            "(fewer trials per GPU) or lower base.train.batch_size"
        )
    size = f" ({card_bytes / 2**30:.1f} GiB)" if card_bytes else ""
    return (
        f"trial ran out of GPU memory with a whole card{size}: lower base.train.batch_size or the model's width "
        "(tune.gpus_per_trial above 1 does not split one trial across cards)"
    )


# The allocator's OOM, and the CUDA runtime's (e.g. while capturing a CUDA graph), as torch words them.
_OOM_TEXTS = ("CUDA out of memory", "CUDA error: out of memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """An allocator OOM, also when torch.compile or a CUDA-graph capture wrapped it in another exception."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, torch.OutOfMemoryError) or any(m in str(exc) for m in _OOM_TEXTS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _card_bytes(device: torch.device) -> int | None:
    try:
        return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    except (RuntimeError, AssertionError):
        return None


def _node_info() -> dict[str, Any]:
    ctx = ray.get_runtime_context()
    return {"pid": os.getpid(), "hostname": socket.gethostname(), "node_id": ctx.get_node_id()}


def quiet_termination(unraisable: Any) -> None:
    """``sys.unraisablehook`` for trial workers: drop the SystemExit of Ray's SIGTERM handler, and only that.

    Ray ends a trial's worker (after ASHA stops it, or once it finished) with SIGTERM, whose handler
    raises SystemExit. When the signal lands while Python runs a finalizer (a weakref callback in
    garbage collection), the exit cannot propagate and Python prints it as "Exception ignored ...
    Traceback ... SystemExit: 1" into the driver's console: noise from a worker being shut down on
    purpose (seen in a smoke search's console). Every other unraisable exception is reported as usual.
    """
    if isinstance(unraisable.exc_type, type) and issubclass(unraisable.exc_type, SystemExit):
        return
    sys.__unraisablehook__(unraisable)


def setup_worker() -> None:
    """Ray's ``worker_process_setup_hook`` (search/cluster.py): process-wide settings of every trial worker.

    Drops the SystemExit of Ray's SIGTERM handler (``quiet_termination``), and Ray Train's INFO line
    for every checkpoint a trial reports ("Checkpoint successfully created at: ..."), which every
    worker would otherwise forward to the driver's console once per epoch.
    """
    sys.unraisablehook = quiet_termination
    logging.getLogger("ray.train").setLevel(logging.WARNING)


def cannot_finish(now: float, deadline: float | None, time_limit_s: float, time_used_s: float) -> bool:
    """Whether a time-boxed trial would end after the search's ``deadline`` (plus DEADLINE_SLACK_S): its
    clock says exactly how much it has left."""
    return deadline is not None and time_limit_s > 0 and now + time_limit_s - time_used_s > deadline + DEADLINE_SLACK_S


class _Cut(Exception):
    """Raised through train() by a trial that stops because the search's deadline is too near (see on_epoch)."""


def train_trial(
    params: dict[str, Any],
    base: dict[str, Any],
    gpu_share: float = 0.0,
    deadline: float | None = None,
    splits: Splits | None = None,
    cpus: float = 0.0,
    costs: dict[str, Any] | None = None,
) -> None:
    """Ray Tune function trainable. ``params``: sampled dotted keys; ``base``: a resolved config dict;
    ``gpu_share``: the GPUs Ray gave the trial (``tune.gpus_per_trial``, 0 on a cluster without GPUs);
    ``deadline``: a budgeted search's end (``time.time()``, search/budget.py): a trial restored from its
    checkpoint (a --resume, a retry) that can no longer finish its time box by then ends at its next epoch
    as "cut" (a new trial is only started when it can finish: search/deadline.py DeadlineSearcher);
    ``splits``: the training and validation images, shared by every trial through Ray's object store (a
    local Ray), else each trial reads its node's files. ``cpus``: the CPUs Ray gave the trial
    (``tune.cpus_per_trial``); ``costs``: for a two-objective search, ``{"measure": [latencies to time],
    "batch": n}`` (search/costs.py)."""
    cfg = with_overrides(base, params)
    if not cfg.train.threads and cpus >= 1 and resolve_device(cfg.train.device).type == "cpu":
        # Torch's default is one thread per core of the machine, whatever Ray reserved: two 1-CPU trials side by
        # side each ran 2 OpenMP threads on 2 cores, and such processes slow down many times when they contend
        # (README "The job on a time budget"). A CPU trial's threads are its CPUs, and its config says so.
        cfg = with_overrides(cfg.to_dict(), {"train.threads": int(cpus)})
    if splits is not None:
        # Ray's object store hands out read-only arrays; torch wants to own writable memory (a copy takes
        # ~50 ms, reading and checking the files ~1-2 s).
        splits = Splits(**{k: np.array(v) for k, v in dataclasses.asdict(splits).items()})
    device = resolve_device(cfg.train.device)
    if 0 < gpu_share < 1:
        cap_gpu_memory(gpu_share, device)  # before the first allocation: the cap is the trial's share
    info = _node_info()
    if costs is not None:
        # Once, before training starts: params and macs, and the latency the search minimises, timed on one
        # thread (median of repeats). Every result carries them, for the searcher and the front.
        from search.costs import model_costs

        info.update(model_costs(cfg.model, tuple(costs["measure"]), costs["batch"]))
    restored = tune.get_checkpoint()
    # Checkpoints are staged outside the working dir: the working dir is synced as
    # artifacts, and Tune already persists each reported checkpoint separately.
    stage = Path(tempfile.mkdtemp(prefix="bss-ckpt-"))
    resume = None
    if restored is not None:
        with restored.as_directory() as d:
            marker = Path(d) / DIVERGED_MARKER
            if marker.exists():
                raise TrialDiverged(json.loads(marker.read_text())["reason"])
            shutil.copytree(d, stage / "restored")
        resume = stage / "restored"

    last_checkpoint = [time.monotonic()]

    def on_epoch(metrics: dict[str, Any], checkpoint_dir: Path) -> None:
        out = {**metrics, **info, "diverged": False, "budget_epochs": cfg.train.epochs,
               "torch_threads": torch.get_num_threads()}  # fmt: skip
        now = time.monotonic()
        final = metrics["epoch"] >= cfg.train.epochs
        cut = (
            resume is not None
            and not final
            and cannot_finish(time.time(), deadline, cfg.train.time_limit_s, metrics["time_used_s"])
        )
        if cut:  # this epoch's report says so, then the trial ends (never a winner: search/selection.py)
            out["cut"] = True
            tune.report(out, checkpoint=tune.Checkpoint.from_directory(str(checkpoint_dir)))
            raise _Cut
        if not (final or metrics["epoch"] == 1 or now - last_checkpoint[0] >= CHECKPOINT_EVERY_S):
            tune.report(out)
            return
        last_checkpoint[0] = now
        tune.report(out, checkpoint=tune.Checkpoint.from_directory(str(checkpoint_dir)))

    # The trial's folder from Tune itself, not the working directory: that is the folder only while Ray's
    # RAY_CHDIR_TO_TRIAL_DIR is on (its default), and users turn it off to read files relative to their own.
    trial_dir = Path(tune.get_context().get_trial_dir())
    try:
        try:
            # TensorBoard events into the trial folder itself, beside Tune's: one run per trial.
            result = train(cfg, on_epoch=on_epoch, out_dir=trial_dir, resume=resume, splits=splits,
                           checkpoint_dir=stage / "current", tensorboard_dir=trial_dir)  # fmt: skip
        except _Cut:
            return
        except SystemExit as exc:
            # Tune stops a trial (ASHA, or the end of the experiment) by raising SystemExit(0) inside
            # tune.report, in the trial's training thread (ray/train/_internal/session.py). That is an
            # order, not a failure: end the trial function here, normally, once train() has closed its
            # writers, so no exit unwinds further through Ray's thread and worker machinery. The
            # driver prints the one line for it (tuners.SearchProgress).
            if exc.code not in (0, None):
                raise
            return
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            message = out_of_memory_message(gpu_share, _card_bytes(device))
            log.error("%s (%s)", message, " ".join(str(exc).split())[:300])  # the allocator's detail, for the log
            raise TrialOutOfMemory(message) from None
        if result.status == "diverged":
            ckpt_dir = stage / "current"
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            (ckpt_dir / DIVERGED_MARKER).write_text(json.dumps({"reason": result.reason}))
            final = {**result.metrics, **info, "epoch": result.epochs_done, "diverged": True, "reason": result.reason,
                     "val_mse": math.nan, "budget_epochs": cfg.train.epochs}  # fmt: skip
            tune.report(final, checkpoint=tune.Checkpoint.from_directory(str(ckpt_dir)))
            raise TrialDiverged(result.reason)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
