"""Experiment trackers: the Tune callbacks Ray ships for them (``ray.air.integrations``), named in ``tune.callbacks``.

    tune:
      callbacks:
        mlflow: {tracking_uri: http://127.0.0.1:5000}       # pip install 'bss-search[mlflow]'
        wandb: {project: bss, mode: offline}                # pip install 'bss-search[wandb]'

Each name takes the settings of Ray's callback (MLflowLoggerCallback, WandbLoggerCallback; for W&B
also ``wandb.init``'s, which Ray passes on), checked when the config is loaded, so a misspelt setting
fails before Ray starts. Both phases report: every search trial is a run named as its folder
(``007-f785168e``), every retrain seed one named ``seed-1000``, with the trial's parameters and each
epoch's metrics (``val_mse`` and the rest, step = epoch). The defaults that differ from Ray's:

- MLflow: ``experiment_name`` is the experiment's name, and each run is tagged ``bss.experiment`` and
  ``bss.phase`` (search or retrain);
- W&B: ``project`` is ``bss-search``, ``group`` the experiment's name and ``job_type`` the phase; ``dir`` is
  the experiment's folder (``wandb/`` there: with ``mode: offline``, ``wandb sync`` uploads it later).
  Offline (and disabled) needs no API key.

Credentials never go in the config (it is saved beside the results): MLflow reads
``MLFLOW_TRACKING_TOKEN`` (or ``MLFLOW_TRACKING_USERNAME``/``_PASSWORD``), W&B ``WANDB_API_KEY`` or
``api_key_file``.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any

from bss_model.errors import ConfigError


@dataclass(frozen=True)
class Tracker:
    module: str  # Ray's integration
    cls: str
    extra: str  # the pip extra that installs the library
    library: str  # its import name
    secrets: dict[str, str]  # settings refused in the config -> where the credential goes instead


TRACKERS = {
    "mlflow": Tracker("ray.air.integrations.mlflow", "MLflowLoggerCallback", "mlflow", "mlflow",
                      {"tracking_token": "set MLFLOW_TRACKING_TOKEN in the environment"}),
    "wandb": Tracker("ray.air.integrations.wandb", "WandbLoggerCallback", "wandb", "wandb",
                     {"api_key": "set WANDB_API_KEY in the environment, or api_key_file to a file holding it"}),
}  # fmt: skip


def _settings_of(name: str) -> set[str]:
    """The settings ``tune.callbacks.<name>`` takes: the callback's own, and for W&B ``wandb.init``'s."""
    from bss_model.cli import require_extra

    tracker = TRACKERS[name]
    require_extra(tracker.extra, f"tune.callbacks.{name}", (tracker.library,))
    cls = getattr(importlib.import_module(tracker.module), tracker.cls)
    params = inspect.signature(cls.__init__).parameters
    names = {p for p, v in params.items() if p != "self" and v.kind not in (v.VAR_KEYWORD, v.VAR_POSITIONAL)}
    if name == "wandb":
        import wandb

        names |= set(inspect.signature(wandb.init).parameters)
    return names


def check_callbacks(callbacks: dict[str, Any]) -> None:
    """Every ``tune.callbacks`` entry names a tracker Ray ships, with settings its callback takes."""
    for name, settings in callbacks.items():
        key = f"tune.callbacks.{name}"
        if name not in TRACKERS:
            raise ConfigError(
                f"{key}: unknown tracker: use one of {', '.join(sorted(TRACKERS))} (Ray's integrations), "
                "e.g. --set tune.callbacks.mlflow.tracking_uri=http://127.0.0.1:5000"
            )
        if settings is None:
            continue  # `mlflow:` with nothing under it: Ray's defaults (and ours)
        if not isinstance(settings, dict):
            raise ConfigError(f"{key} must be a mapping of its settings (or empty), e.g. {{tracking_uri: ...}}")
        for setting in settings:
            if setting in TRACKERS[name].secrets:
                raise ConfigError(
                    f"{key}.{setting} would be saved in plain text beside the results: drop it and "
                    f"{TRACKERS[name].secrets[setting]}"
                )
        unknown = sorted(set(settings) - _settings_of(name))
        if unknown:
            valid = ", ".join(sorted(_settings_of(name) - set(TRACKERS[name].secrets)))
            raise ConfigError(f"{key}.{unknown[0]} is not a setting of Ray's {TRACKERS[name].cls}: use one of {valid}")


def make_callbacks(callbacks: dict[str, Any], name: str, folder: str, phase: str) -> list[Any]:
    """The trackers' Tune callbacks for one phase (``search`` or ``retrain``) of experiment ``name``, whose local
    folder is ``folder``."""
    out = []
    for tracker, settings in callbacks.items():
        settings = dict(settings or {})
        if tracker == "mlflow":
            from ray.air.integrations.mlflow import MLflowLoggerCallback

            settings.setdefault("experiment_name", name)
            settings["tags"] = {"bss.experiment": name, "bss.phase": phase, **(settings.get("tags") or {})}
            out.append(MLflowLoggerCallback(**settings))
        elif tracker == "wandb":
            settings.setdefault("project", "bss-search")
            settings.setdefault("group", name)
            settings.setdefault("job_type", phase)
            settings.setdefault("dir", folder)
            from search.wandb_tracker import WandbTracker  # (imports wandb: only when asked for)

            out.append(WandbTracker(**settings))
    return out
