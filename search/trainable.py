"""The Ray Tune trainable: a thin wrapper around ``bss_model.train.train``.

It turns the sampled hyperparameters into a ``bss_model`` config, trains with an
``on_epoch`` that calls ``ray.tune.report(metrics, checkpoint=...)``, and resumes
from ``ray.tune.get_checkpoint()`` when Tune restarts the trial after a failure.
Everything the trial writes in its working directory (TensorBoard events,
metrics.json, config.yaml) is synced to ``storage_path`` as trial artifacts.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

import ray
from ray import tune

from bss_model.evaluate import evaluate_checkpoint
from bss_model.train import train
from search.config import with_overrides

# Written into a checkpoint when its run diverged: a retry restored from it fails at
# once with the same reason instead of re-training into the same NaN.
DIVERGED_MARKER = "diverged.json"
TEST_METRICS = "test_metrics.json"


class TrialDiverged(RuntimeError):
    """The trial's loss went non-finite; the trial ends errored with this reason."""


def _node_info() -> dict[str, Any]:
    ctx = ray.get_runtime_context()
    return {"pid": os.getpid(), "hostname": socket.gethostname(), "node_id": ctx.get_node_id()}


def train_trial(params: dict[str, Any], base: dict[str, Any], evaluate_test: bool = False) -> None:
    """Ray Tune function trainable. ``params``: sampled dotted keys; ``base``: a resolved config dict."""
    cfg = with_overrides(base, params)
    info = _node_info()
    # Checkpoints are staged outside the working dir: the working dir is synced as
    # artifacts, and Tune already persists each reported checkpoint separately.
    stage = Path(tempfile.mkdtemp(prefix="bss-ckpt-"))
    resume = None
    restored = tune.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as d:
            marker = Path(d) / DIVERGED_MARKER
            if marker.exists():
                raise TrialDiverged(json.loads(marker.read_text())["reason"])
            shutil.copytree(d, stage / "restored")
        resume = stage / "restored"

    def on_epoch(metrics: dict[str, Any], checkpoint_dir: Path) -> None:
        out = {**metrics, **info, "diverged": False, "budget_epochs": cfg.train.epochs}
        if evaluate_test and metrics["epoch"] == cfg.train.epochs:
            # The final evaluation: the reference protocol on the test sets (retrain trials only).
            test = evaluate_checkpoint(checkpoint_dir, device=cfg.train.device)
            (checkpoint_dir / TEST_METRICS).write_text(json.dumps(test, indent=2))
            out.update(
                {k: v for k, v in test.items() if not isinstance(v, list) and k not in ("draws", "pairs", "seed")}
            )
            out.update(
                {"protocol_draws": test["draws"], "protocol_pairs": test["pairs"], "protocol_seed": test["seed"]}
            )
        tune.report(out, checkpoint=tune.Checkpoint.from_directory(str(checkpoint_dir)))

    try:
        try:
            result = train(cfg, on_epoch=on_epoch, out_dir=Path.cwd(), resume=resume, checkpoint_dir=stage / "current")
        except SystemExit as exc:
            # Tune stops a trial (ASHA, or the end of the experiment) by raising SystemExit(0) inside
            # tune.report, in the trial's training thread (ray/train/_internal/session.py). That is an
            # order, not a failure: end the trial function here, normally, once train() has closed its
            # writers, so no exit unwinds further through Ray's thread and worker machinery. The
            # driver prints the one line for it (tuners.SearchProgress).
            if exc.code not in (0, None):
                raise
            return
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
