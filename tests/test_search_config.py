"""The search config: space declaration, validation before Ray starts, and --set overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from bss_model.config import Config
from bss_model.errors import ConfigError
from search.config import SearchConfig, load_search_config, with_overrides
from search.space import parse_dimension

ROOT = Path(__file__).resolve().parent.parent


def test_shipped_search_configs_load() -> None:
    smoke = load_search_config(ROOT / "configs/smoke.yaml")
    assert smoke.tune.name == "smoke" and smoke.base.model.variant == "tiny"
    assert {"model.filters", "model.bottleneck_convs", "model.decoder_convs", "train.lr"} <= set(smoke.space)
    full = load_search_config(ROOT / "configs/search.yaml")
    assert full.tune.gpus_per_trial == 0.25 and full.retrain.seeds == 5
    assert full.tune.points_to_evaluate[0]["model.decoder_mult"] == 4  # the reference is a starting point
    # The cluster space covers the published shapes and every recipe key, at batch 64/128/256.
    assert full.space["train.batch_size"] == {"choice": [64, 128, 256]}
    assert 0.0 in full.space["train.ema_decay"]["choice"] and max(full.space["model.filters"]["choice"]) >= 64
    assert {"train.optimizer", "train.weight_decay", "train.loss", "model.output", "train.schedule"} <= set(full.space)
    recipe = full.tune.points_to_evaluate[1]  # seed-bn-consistent, batch 256, Adam 2e-3 cosine
    assert (recipe["model.norm"], recipe["model.head"], recipe["train.batch_size"], recipe["train.lr"]) == (
        "batch", "consistent", 256, 2e-3,
    )  # fmt: skip
    hour = load_search_config(ROOT / "configs/gpu-hour.yaml")
    assert hour.retrain.seeds == 3 and hour.tune.gpus_per_trial == 0.25 and hour.base.model.output == "relu"
    # Its retrain: the reference's 19.4M samples per seed (40 x 3 x 161,984).
    assert hour.retrain.epochs * hour.retrain.samples_per_epoch == 120 * 161_984


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
    # The folders search.console names: <number>-<id>; a retrain seed's has no number.
    assert trial_number("/r/search/007-f785168e") == 7
    assert trial_number("/r/retrain/seed-1000") == -1


# --------------------------------------------------------------------------------------
# Compute-fair budgets: every trial sees the same samples per ASHA rung; the retrain's budget is samples


def test_batch_sizes_that_do_not_divide_the_budget_are_refused_with_the_fix() -> None:
    sets = ["base.train.samples_per_epoch=161984", "space.train.batch_size={choice: [64, 128, 256]}"]
    with pytest.raises(ConfigError) as err:
        load_search_config(ROOT / "configs/smoke.yaml", sets)
    message = str(err.value)
    # 161,984 / 128 = 1265.5 steps: batch 128 would see 162,048 samples per epoch, batch 64 161,984.
    assert "\n" not in message and "base.train.samples_per_epoch=161984" in message
    assert "batch_size=128" in message and "multiple of 256" in message and "162048" in message
    # (No starting point: the smoke's lacks train.batch_size, and the base's 32 is not among the choices.)
    fair = [*sets[1:], "base.train.samples_per_epoch=162048", "tune.points_to_evaluate=[]"]
    cfg = load_search_config(ROOT / "configs/smoke.yaml", fair)
    assert cfg.space["train.batch_size"] == {"choice": [64, 128, 256]}


def test_the_base_and_starting_point_batch_sizes_count_too() -> None:
    # 2,560 samples: 80 steps at 32, 40 at 64, 20 at 128, 10 at 256; 96 does not divide it.
    space = "space.train.batch_size={choice: [32, 64]}"
    # (No starting point here: the smoke's lacks train.batch_size, and the base's 128 is not among the choices.)
    load_search_config(ROOT / "configs/smoke.yaml", [space, "base.train.batch_size=128", "tune.points_to_evaluate=[]"])
    with pytest.raises(ConfigError, match=r"batch_size=96, so batch sizes \[32, 64, 96\] would see different samples"):
        load_search_config(ROOT / "configs/smoke.yaml", [space, "base.train.batch_size=96"])
    point = ("tune.points_to_evaluate=[{model.filters: 8, model.bottleneck_convs: 1, model.decoder_convs: 1, "
             "train.lr: 1.0e-3, train.batch_size: 96}]")  # fmt: skip
    with pytest.raises(ConfigError, match=r"batch_size=96"):
        load_search_config(ROOT / "configs/smoke.yaml", [space, point])


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["space.train.batch_size={int: [32, 128]}"], "use {choice: [...]} of batch sizes that divide it"),
        (["space.train.samples_per_epoch={choice: [1280, 2560]}"], "set base.train.samples_per_epoch"),
        (["space.train.epochs={int: [2, 4]}"], "set base.train.epochs (the same for every trial)"),
    ],
)
def test_spaces_that_would_give_trials_unequal_budgets_are_refused(sets: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_search_config(ROOT / "configs/smoke.yaml", sets)
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def best_config_for(cfg: SearchConfig, params: dict) -> Config:
    """The retrain's config for a winner with ``params``, by the pipeline's own function."""
    from search.pipeline import best_config
    from search.results import SearchSummary

    return best_config(cfg, SearchSummary("t0", params, 0.01, {}, search_wall_s=None, trials=[]))


@pytest.mark.parametrize("batch", [32, 64, 128, 256, 1024])
def test_the_retrain_budget_is_the_references_samples_whatever_the_batch_size(batch: int) -> None:
    cfg = load_search_config(ROOT / "configs/smoke.yaml", ["retrain.epochs=120", "retrain.samples_per_epoch=161984"])
    t = best_config_for(cfg, {"train.batch_size": batch, "train.lr": 2e-3}).train
    assert (t.epochs, t.samples_per_epoch, t.batch_size, t.lr) == (120, 161_984, batch, 2e-3)
    reference = 120 * 5062 * 32  # 19,438,080 samples: 120 epochs x 5,062 steps x batch 32
    total = t.epochs * t.steps_per_epoch * batch
    # Whole steps: within half a batch per epoch of the reference; exact where the batch divides 161,984.
    assert abs(total - reference) <= t.epochs * batch // 2
    if 161_984 % batch == 0:
        assert total == reference
    # By hand: 161,984 / 256 = 632.75 -> 633 steps = 162,048 samples per epoch, 19,445,760 in all.
    expected = {32: 19_438_080, 64: 19_438_080, 128: 120 * 1266 * 128, 256: 19_445_760, 1024: 120 * 158 * 1024}
    assert total == expected[batch]


def test_retrain_defaults_and_overrides() -> None:
    from search.config import RetrainSection

    assert (RetrainSection().epochs, RetrainSection().samples_per_epoch) == (120, 161_984)
    smoke = load_search_config(ROOT / "configs/smoke.yaml")
    t = best_config_for(smoke, {"train.lr": 1e-3}).train
    assert (t.epochs, t.samples_per_epoch) == (4, 2560)  # smoke.yaml keeps its small retrain
    cfg = load_search_config(
        ROOT / "configs/smoke.yaml", ["retrain.overrides={train.epochs: 3, train.samples_per_epoch: 640}"]
    )
    t = best_config_for(cfg, {"train.lr": 1e-3}).train
    assert (t.epochs, t.samples_per_epoch) == (3, 640)  # the overrides win over the budget
    with pytest.raises(ConfigError, match=r"retrain\.samples_per_epoch=0 is out of range"):
        load_search_config(ROOT / "configs/smoke.yaml", ["retrain.samples_per_epoch=0"])


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_its_search_is_compute_fair(path: Path) -> None:
    import yaml

    from bss_model.config import load_config

    if "base" not in yaml.safe_load(path.read_text()):
        load_config(path)  # a bss_model config (seed.yaml)
        return
    cfg = load_search_config(path)
    for point in cfg.tune.points_to_evaluate:
        assert set(point) == set(cfg.space), "a starting point must set every dimension"
    if cfg.budget:  # a budgeted search is time-fair instead: every trial time-boxed at the plan's trial time
        assert cfg.budget_s > 0
        return
    dim = cfg.dimensions().get("train.batch_size")
    sizes = {cfg.base.train.batch_size, *(dim.args if dim else [])}
    per_epoch = set()
    for batch in sizes:
        t = with_overrides(cfg.base.to_dict(), {"train.batch_size": batch}).train
        per_epoch.add(t.epoch_samples)
    assert per_epoch == {cfg.base.train.samples_per_epoch}, f"unequal samples per epoch: {per_epoch}"


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
