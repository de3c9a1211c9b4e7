"""Checkpoints: one file holding everything needed to resume or to evaluate.

Loaded only with ``torch.load(..., weights_only=True)``: a pickle that would run
code is refused. The resolved config travels inside, so a checkpoint alone
rebuilds its model.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from bss_model.config import Config, config_from_dict
from bss_model.errors import BssError, CheckpointError
from bss_model.io import atomic_torch_save
from bss_model.model import UNet, build_model

FORMAT = "bss-checkpoint-v1"
FILENAME = "checkpoint.pt"


def resolve_path(path: str | Path) -> Path:
    """Accept a checkpoint file, or a folder holding one (a run folder or its checkpoint/)."""
    if "://" in str(path):  # Path() would quietly turn s3://b/k into the local path s3:/b/k
        raise CheckpointError(
            f"{path} is a URI, and checkpoints are read from local files only: download it first (e.g. "
            f"`aws s3 cp {path} .`, or `python -c \"import pyarrow.fs as f; f.copy_files('{path}', 'best_model.pt')\"`)"
            " and pass the local file"
        )
    path = Path(path)
    for candidate in (path, path / FILENAME, path / "checkpoint" / FILENAME, path / "best_model.pt"):
        if candidate.is_file():
            return candidate
    raise CheckpointError(f"no checkpoint at {path}: pass a checkpoint.pt / best_model.pt file or a run folder")


def save(state: dict[str, Any], path: str | Path) -> None:
    atomic_torch_save({"format": FORMAT, **state}, Path(path))


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = resolve_path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch wraps every failure in the same preamble; the line that says why is the useful one.
        why = [line.strip() for line in str(exc).splitlines() if "GLOBAL" in line or "Unsupported" in line]
        first = why[0].rstrip(".") if why else "unsafe pickle"
        if "GLOBAL" not in first:
            # Plain garbage bytes (e.g. "Unsupported operand"), not a pickle that asks to run code.
            raise CheckpointError(
                f"{path} is not a readable checkpoint ({first}): retrain or pass another file"
            ) from None
        raise CheckpointError(
            f"{path} was refused by the safe loader (weights_only=True): {first}. Only load checkpoints you trust"
            " that were written by bss-search"
        ) from None
    except Exception as exc:  # garbage bytes can make the unpickler raise almost anything
        # (RuntimeError, EOFError, BadZipFile, ValueError, but also IndexError/KeyError from a
        # random byte stream): every one of them means "this file is not a checkpoint".
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({type(exc).__name__}): retrain or pass another file"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a bss-search checkpoint (no '{FORMAT}' marker): pass a file written by bss-search"
        )
    return state


def config_of(state: dict[str, Any], path: str | Path = "checkpoint") -> Config:
    config = state.get("config")
    if not isinstance(config, dict):
        what = "missing" if config is None else f"a {type(config).__name__}, not a mapping"
        raise CheckpointError(
            f"{path} is damaged: its config is {what}: pass a checkpoint written by bss-search, or retrain"
        )
    try:
        return config_from_dict(config)
    except BssError as exc:
        raise CheckpointError(
            f"{path} holds no valid config ({exc}): pass a checkpoint written by this version"
        ) from None


def model_weights(state: dict[str, Any], path: str | Path, key: str = "model") -> dict[str, torch.Tensor]:
    """``state[key]`` checked to be a model's weights, every one finite, or one CheckpointError saying why not.

    A NaN weight makes every prediction NaN: evaluating it printed a bare ``NaN`` (not JSON) with exit 0, and
    resuming from it trains nothing. (Training never checkpoints a non-finite model: bss_model.train.)
    """
    weights = state.get(key)
    if weights is None:
        what = "missing"
    elif not isinstance(weights, dict):
        what = f"a {type(weights).__name__}, not a mapping of names to tensors"
    elif not weights:
        what = "empty"
    elif not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()):
        what = "a mapping that holds more than named tensors"
    else:
        what = ""
    if what:
        raise CheckpointError(
            f"{path} is damaged: its '{key}' weights are {what}: pass a checkpoint written by bss-search, or retrain"
        )
    bad = [name for name, w in weights.items() if w.is_floating_point() and not bool(torch.isfinite(w).all())]
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise CheckpointError(
            f"{path} holds non-finite weights (NaN or inf in {bad[0]}{more}): the model cannot predict anything; "
            "pass an earlier checkpoint, or retrain"
        )
    return weights


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], path: str | Path) -> None:
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        detail = str(exc).splitlines()[0]
        raise CheckpointError(
            f"{path} does not fit this model ({detail}): its model config differs from yours"
        ) from None


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[UNet, Config]:
    """Rebuild the model a checkpoint (or best_model.pt) was trained as, with its weights."""
    path = resolve_path(path)
    state = load(path, map_location=device)
    cfg = config_of(state, path)
    model = build_model(cfg.model)
    load_weights(model, model_weights(state, path), path)
    return model.to(device), cfg
