"""tune.callbacks and tune.study_storage as the config takes them: checked when it loads, one line each, before Ray.
(The real MLflow server, W&B offline files and PostgreSQL: tests/test_ecosystem.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from bss_model.errors import ConfigError
from search.config import load_search_config
from search.trackers import make_callbacks

SMOKE = str(Path(__file__).resolve().parent.parent / "configs" / "smoke.yaml")


@pytest.mark.parametrize(
    ("sets", "words"),
    [
        (["tune.callbacks.comet={}"], "tune.callbacks.comet: unknown tracker: use one of mlflow, wandb"),
        (["tune.callbacks.mlflow.trackin_uri=http://x"],
         "tune.callbacks.mlflow.trackin_uri is not a setting of Ray's MLflowLoggerCallback: use one of "),
        (["tune.callbacks.mlflow.tracking_token=s3cret"],
         "tune.callbacks.mlflow.tracking_token would be saved in plain text beside the results: drop it and set "
         "MLFLOW_TRACKING_TOKEN in the environment"),
        (["tune.callbacks.wandb.api_key=s3cret"], "set WANDB_API_KEY in the environment"),
        (["tune.callbacks.wandb.projekt=x"], "wandb.projekt is not a setting of Ray's WandbLoggerCallback"),
        (["tune.callbacks.mlflow=3"], "tune.callbacks.mlflow must be a mapping of its settings"),
        (["tune.study_storage=not a url"], "tune.study_storage='not a url' is not a database URL"),
        (["tune.study_storage=postgresql://bss:pw@db/studies"], "holds a password"),
    ],
)  # fmt: skip
def test_a_bad_tracker_or_study_storage_is_one_line(sets: list[str], words: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_search_config(SMOKE, sets)
    assert words in str(info.value) and "\n" not in str(info.value)
    assert "s3cret" not in str(info.value) and ":pw@" not in str(info.value)


def test_the_trackers_are_rays_callbacks_with_the_experiments_defaults(tmp_path: Path) -> None:
    from ray.air.integrations.mlflow import MLflowLoggerCallback
    from ray.air.integrations.wandb import WandbLoggerCallback

    sets = ["tune.callbacks.mlflow.tracking_uri=http://127.0.0.1:5000", "tune.callbacks.wandb.mode=offline",
            "tune.callbacks.wandb.entity=lab", "tune.study_storage=postgresql://bss@db/s?sslmode=require"]  # fmt: skip
    cfg = load_search_config(SMOKE, sets)
    mlflow, wandb = make_callbacks(cfg.tune.callbacks, "smoke", str(tmp_path), "retrain")
    assert isinstance(mlflow, MLflowLoggerCallback) and isinstance(wandb, WandbLoggerCallback)
    assert mlflow.tracking_uri == "http://127.0.0.1:5000" and mlflow.experiment_name == "smoke"
    assert mlflow.tags == {"bss.experiment": "smoke", "bss.phase": "retrain"}
    assert wandb.project == "bss-search" and wandb.group == "smoke"
    assert wandb.kwargs == {"mode": "offline", "entity": "lab", "job_type": "retrain", "dir": str(tmp_path)}
    wandb.setup()  # offline: no API key is looked for (Ray's own setup raises without one)
    # ${VAR}s are read from the environment when connecting, so a password never lands in the config.
    load_search_config(SMOKE, ["tune.study_storage=postgresql://bss:${BSS_DB_PASSWORD}@db/s"])
