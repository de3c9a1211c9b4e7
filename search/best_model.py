"""The final step's model work: the best seed's weights as ``best_model.pt``, and its test separations.

This is the only place after the retrain that reads a Ray checkpoint or runs a model; the report
only renders what it is given.
"""

from __future__ import annotations

from pathlib import Path

import torch
from ray import tune

from bss_model import checkpoint as ckpt
from bss_model.data import load_test, mix
from bss_model.evaluate import protocol_indices
from search.results import SeedResult, Separations

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
