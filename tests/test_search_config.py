"""The search config: space declaration, validation before Ray starts, and --set overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from bss_model.errors import ConfigError
from search.config import load_search_config, with_overrides
from search.space import parse_dimension

ROOT = Path(__file__).resolve().parent.parent


def test_shipped_search_configs_load() -> None:
    smoke = load_search_config(ROOT / "configs/smoke.yaml")
    assert smoke.tune.name == "smoke" and smoke.base.model.variant == "tiny"
    assert {"model.filters", "model.bottleneck_convs", "model.decoder_convs", "train.lr"} <= set(smoke.space)
    full = load_search_config(ROOT / "configs/search.yaml")
    assert full.tune.gpus_per_trial == 0.25 and full.retrain.seeds == 5
    assert full.tune.points_to_evaluate[0]["model.decoder_mult"] == 4  # the reference is a starting point


def test_set_overrides_a_dotted_space_key() -> None:
    cfg = load_search_config(ROOT / "configs/smoke.yaml", ["space.train.lr={loguniform: [1.0e-5, 1.0e-1]}"])
    assert cfg.space["train.lr"] == {"loguniform": [1.0e-5, 1.0e-1]}
    assert "train" not in cfg.space  # not split into a nested section


def test_set_overrides_sections_and_names() -> None:
    cfg = load_search_config(ROOT / "configs/smoke.yaml", ["tune.num_samples=3", "base.train.epochs=7"])
    assert cfg.tune.num_samples == 3 and cfg.base.train.epochs == 7


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"loguniform": [1e-2, 1e-4]}, "low > high"),
        ({"choice": []}, "empty"),
        ({"loguniform": [0, 1]}, "low > 0"),
        ({"int": [1.5, 3]}, "integers"),
        ({"logunifrom": [1e-4, 1e-2]}, "did you mean 'loguniform'"),
        ({"uniform": [1]}, "[low, high]"),
        ([1, 2], "one mapping"),
    ],
)
def test_malformed_dimensions(spec: object, message: str) -> None:
    with pytest.raises(ConfigError, match=None) as err:
        parse_dimension("train.lr", spec)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["space.model.filters={int: [0, 8]}"], "model.filters=0"),  # an endpoint that is not a valid config
        (["space.model.depth={choice: [2, 6]}"], "model.depth=6"),
        (["space.model.fliters={int: [4, 8]}"], "did you mean 'model.filters'"),
        (["tune.num_samples=0"], "tune.num_samples=0"),
        (["tune.points_to_evaluate=[{train.momentum: 0.9}]"], "not space dimensions"),
        (["retrain.overrides={train.lr: -1}"], "retrain.overrides"),
    ],
)
def test_invalid_search_configs_fail_before_ray(sets: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_search_config(ROOT / "configs/smoke.yaml", sets)
    assert message in str(err.value), str(err.value)


def test_with_overrides_applies_dotted_params_to_a_copy() -> None:
    base = load_search_config(ROOT / "configs/smoke.yaml").base.to_dict()
    cfg = with_overrides(base, {"model.filters": 12, "train.lr": 3e-3})
    assert cfg.model.filters == 12 and cfg.train.lr == 3e-3
    assert base["model"]["filters"] == 8  # the base dict is not mutated


def test_trial_number_is_parsed_from_tune_folder_names() -> None:
    from search.selection import trial_number

    assert trial_number("/r/search/train_trial_bf4dedd4_6_model_filters=12_2026-11-23_22-37-20") == 6
    assert trial_number("/r/retrain/train_trial_df909_00000_0_train_seed=1000_2026-11-23") == 0
    assert trial_number("/r/search/not-a-trial") == -1


@pytest.mark.parametrize(
    ("sets", "suggestion"),
    [
        (["train.lr=3e-4"], "did you mean 'base.train.lr'?"),
        (["model.filters=8"], "did you mean 'base.model.filters'?"),
        (["data.val_pairs=500"], "did you mean 'base.data.val_pairs'?"),
        (["eval.draws=2"], "did you mean 'base.eval.draws'?"),
    ],
)
def test_a_base_key_at_the_top_suggests_base(sets: list[str], suggestion: str) -> None:
    """`--set train.lr=...` on a search config: the fix is `base.train.lr`, not the nearest spelling ('retrain')."""
    with pytest.raises(ConfigError) as err:
        load_search_config(ROOT / "configs/smoke.yaml", sets)
    message = str(err.value)
    assert suggestion in message and "retrain" not in message and "\n" not in message, message
    assert message.startswith(f"unknown config key '{sets[0].split('=')[0]}'")


def test_a_base_section_at_the_top_of_the_yaml_suggests_base(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text((ROOT / "configs/smoke.yaml").read_text() + "train:\n  lr: 1.0e-3\n  epochs: 2\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'train': did you mean 'base\.train'\?"):
        load_search_config(path)


def test_a_misspelt_search_section_still_gets_the_spelling_hint() -> None:
    with pytest.raises(ConfigError, match=r"did you mean 'retrain'\?"):
        load_search_config(ROOT / "configs/smoke.yaml", ["retrian.seeds=2"])
