"""The final step's model work: the best seed's weights as ``best_model.pt``, its test separations,
and the seed ensemble (the average of every seed's predictions) scored by the protocol.

This is the only place after the retrain that reads a Ray checkpoint or runs a model; the report
only renders what it is given. ``best_model.pt`` stays one model: the ensemble is a figure.
"""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path

import ray
import torch
from ray import tune

from bss_model import checkpoint as ckpt
from bss_model.data import load_test, mix
from bss_model.errors import one_line
from bss_model.evaluate import evaluate_ensemble_checkpoints, protocol_indices
from search.results import EnsembleResult, SeedResult, Separations

log = logging.getLogger("bss")

FILENAME = "best_model.pt"


def export_best_model(best: SeedResult, path: Path) -> None:
    """Copy the best seed's weights + resolved config into ``path`` (``torch.load(..., weights_only=True)``)."""
    with tune.Checkpoint(best.checkpoint).as_directory() as d:
        state = ckpt.load(Path(d) / ckpt.FILENAME)
    ckpt.save(
        {
            "config": state["config"],
            "model": state["model"],
            "epoch": state["epoch"],
            "n_params": state.get("n_params"),
            "seed": best.seed,
            "val_mse": best.val_mse,
            "test": {k: v for k, v in best.metrics.items() if not isinstance(v, list)},
        },
        path,
    )


def predict_separations(model_path: Path, n: int) -> Separations:
    """``n`` test mixtures (from the protocol's first draw) with their true and predicted components."""
    model, cfg = ckpt.load_model(model_path)
    model.eval()
    test_digit, test_fashion = load_test(cfg.data)
    i_digit, i_fashion = protocol_indices(len(test_digit), len(test_fashion), 1, n, cfg.eval.seed)[0]
    x, target = mix(torch.as_tensor(test_digit[i_digit]), torch.as_tensor(test_fashion[i_fashion]))
    with torch.no_grad():
        pred = model(x).float()
    mse = float(((pred - target) ** 2).mean())
    return Separations(x=x.numpy(), target=target.numpy(), pred=pred.numpy(), mse=mse)


def ensemble_members(seeds: list[SeedResult]) -> list[SeedResult]:
    """The seeds that reached their final evaluation: whole retrains, never a search trial or a seed cut short."""
    return [s for s in seeds if s.evaluated and s.checkpoint]


def evaluate_seed_ensemble(seeds: list[SeedResult], device: str = "auto") -> EnsembleResult | None:
    """The protocol for the average of the seeds' predictions, from each seed's final retrain checkpoint.

    The members are :func:`ensemble_members`; the draws are those each seed was scored on (the
    protocol settings travel in the checkpoints' config). None if no seed qualifies.
    """
    members = ensemble_members(seeds)
    if not members:
        return None
    with contextlib.ExitStack() as stack:
        dirs = [Path(stack.enter_context(tune.Checkpoint(s.checkpoint).as_directory())) for s in members]
        r = evaluate_ensemble_checkpoints([d / ckpt.FILENAME for d in dirs], device=device)
    return EnsembleResult(
        seeds=[s.seed for s in members],
        test_mse=r["test_mse_ensemble"],
        test_mse_std=r["test_mse_ensemble_std"],
        per_draw=r["test_mse_ensemble_per_draw"],
        checkpoints=[str(s.checkpoint) for s in members],
    )


def seed_ensemble(seeds: list[SeedResult], device: str, cpus: float, gpus: float) -> EnsembleResult | None:
    """:func:`evaluate_seed_ensemble` as a Ray task with one trial's resources (a GPU share where the
    cluster has GPUs: the driver's machine may have none). A failure costs the ensemble figure only,
    never the report: it is logged and reported as the ensemble's error."""
    task = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=1)(evaluate_seed_ensemble)
    try:
        return ray.get(task.remote(seeds, device))
    except Exception as exc:  # a RayTaskError around whatever the evaluation raised
        text = str(getattr(exc, "cause", None) or exc).strip()
        error = one_line(text.splitlines()[-1] if text else type(exc).__name__)
        log.warning("the seed ensemble could not be evaluated: %s", error)
        members = ensemble_members(seeds)
        checkpoints = [str(s.checkpoint) for s in members]
        return EnsembleResult([s.seed for s in members], math.nan, math.nan, [], checkpoints, error=error)
