"""The family's new keys as search dimensions, end to end without training: the space, a starting point, the
searcher's draws (Ray's OptunaSearch, as a search builds it), the trial's config, the study's record and the
retrain of the best. A list-valued key (model.dilation) reaches Optuna as its comma form and every config as
the list."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from bss_model.errors import ConfigError
from search.config import load_search_config
from search.space import choice_value, optuna_distributions, param_space, parse_dimension, parse_space

ROOT = Path(__file__).resolve().parent.parent

PARTS_SPACE = {
    "model.block": {"choice": ["plain", "residual"]},
    "model.attention": {"choice": ["none", "gate"]},
    "model.dilation": {"choice": [[1], [1, 2], 2]},
    "model.upsample": {"choice": ["transpose", "bilinear"]},
    "train.loss": {"choice": ["mse", "edge"]},
    "train.edge_weight": {"loguniform": [0.01, 1.0]},
}
POINT = {"model.block": "residual", "model.attention": "gate", "model.dilation": [1, 2], "model.upsample": "bilinear",
         "train.loss": "edge", "train.edge_weight": 0.1}  # fmt: skip


def search_config(tmp_path: Path, edit=None) -> Any:
    raw = yaml.safe_load((ROOT / "configs/smoke.yaml").read_text())
    raw["space"].update(PARTS_SPACE)
    raw["tune"]["points_to_evaluate"] = [{**raw["tune"]["points_to_evaluate"][0], **POINT}]
    if edit:
        edit(raw)
    path = tmp_path / "parts.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return load_search_config(path)


def test_list_choices_are_offered_as_their_comma_form() -> None:
    dim = parse_dimension("model.dilation", {"choice": [[1], [1, 2, 4], 2]})
    assert dim.args == ["1", "1,2,4", 2]
    drawn = set(dim.tune_domain().sample(size=300, random_state=0))
    assert drawn == {"1", "1,2,4", 2}
    dist = dim.optuna_distribution()
    assert all(dist._contains(dist.to_internal_repr(v)) for v in drawn)
    # A starting point may write the list or its comma form; anything else is outside.
    dim.check_value([1, 2, 4], "p")
    dim.check_value("1,2,4", "p")
    with pytest.raises(ConfigError, match=r"p=\[1, 2\] is not one of space\.model\.dilation's choices"):
        dim.check_value([1, 2], "p")
    assert choice_value([1, 2, 4]) == "1,2,4" and choice_value(2) == 2 and choice_value("none") == "none"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"choice": [[1.5, 2]]}, r"holds '1\.5,2'|holds \[1\.5, 2\]"),
        ({"choice": [{"a": 1}]}, r"holds \{'a': 1\}: choices are numbers, strings, booleans, null or lists"),
        ({"choice": [[1, 2], "1,2"]}, r"lists '1,2' twice"),
    ],
)
def test_choices_optuna_cannot_take_are_refused_before_ray(spec: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        parse_dimension("model.dilation", spec)
    assert "\n" not in str(info.value)


def test_a_starting_point_that_leaves_a_list_choice_out_gets_its_comma_form(tmp_path: Path) -> None:
    """A point without model.dilation trains the base's [1]: it must reach the searcher as the choice "1", which
    Optuna's distribution holds (the list itself is not one of its choices: a ValueError after Ray started)."""

    def leave_out(raw: dict) -> None:
        del raw["tune"]["points_to_evaluate"][0]["model.dilation"]

    cfg = search_config(tmp_path, leave_out)
    point = cfg.tune.points_to_evaluate[0]
    assert point["model.dilation"] == "1" and list(point) == list(cfg.space)
    dist = optuna_distributions(parse_space(cfg.space))["model.dilation"]
    assert dist._contains(dist.to_internal_repr(point["model.dilation"]))
    # The shipped configs with the parts: every starting point is one Optuna can take as it is.
    for name in ("search", "gpu-hour"):
        shipped = load_search_config(ROOT / f"configs/{name}.yaml")
        dists = optuna_distributions(parse_space(shipped.space))
        for p in shipped.tune.points_to_evaluate:
            assert all(dists[k]._contains(dists[k].to_internal_repr(v)) for k, v in p.items()), (name, p)


def test_every_new_key_is_validated_as_a_dimension(tmp_path: Path) -> None:
    """Each choice must make a valid config: a rate out of range fails when the config loads, not in a trial."""

    def bad_rate(raw: dict) -> None:
        raw["space"]["model.dilation"] = {"choice": [[1], [1, 32]]}

    with pytest.raises(ConfigError, match=r"space\.model\.dilation: model\.dilation=\[1, 32\] is out of range"):
        search_config(tmp_path, bad_rate)

    def bad_block(raw: dict) -> None:
        raw["space"]["model.block"] = {"choice": ["plain", "dense"]}

    with pytest.raises(ConfigError, match=r"space\.model\.block: model\.block='dense' is not allowed"):
        search_config(tmp_path, bad_block)

    def bad_point(raw: dict) -> None:
        raw["tune"]["points_to_evaluate"][0]["model.attention"] = "gates"

    with pytest.raises(ConfigError, match=r"points_to_evaluate\[0\]\.model\.attention='gates' is not one of"):
        search_config(tmp_path, bad_point)


def test_the_new_keys_go_from_the_space_through_the_searcher_to_the_trial_and_the_retrain(tmp_path: Path) -> None:
    import optuna

    from search.pipeline import best_config
    from search.results import SearchSummary
    from search.selection import METRIC, MODE
    from search.trainable import with_overrides as trial_overrides
    from search.tuners import make_sampler, make_searcher

    cfg = search_config(tmp_path)
    dims = cfg.dimensions()
    point = cfg.tune.points_to_evaluate[0]
    assert point["model.dilation"] == "1,2"  # the starting point as the searcher takes it
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        searcher = make_searcher(make_sampler(0, 2), cfg.tune.points_to_evaluate, stopped_as_pruned=False)
        searcher.set_search_properties(METRIC, MODE, param_space(dims))
        drawn = []
        for i in range(12):
            params = searcher.suggest(f"t{i}")
            drawn.append(params)
            searcher.on_trial_complete(f"t{i}", result={METRIC: 0.1 + 0.01 * i, "training_iteration": 1})
    finally:
        optuna.logging.set_verbosity(verbosity)
    assert drawn[0] == point  # the starting point is the first trial, as written
    assert {p["model.dilation"] for p in drawn} <= {"1", "1,2", 2}
    assert len({p["model.dilation"] for p in drawn}) > 1 and len({p["model.block"] for p in drawn}) > 1
    # Optuna recorded every trial with its parameters (a list would have failed its categorical distribution).
    trials = searcher._ot_study.trials
    assert len(trials) == 12 and all(t.params["model.dilation"] in ("1", "1,2", 2) for t in trials)
    dists = optuna_distributions(dims)
    assert all(dists[k]._contains(dists[k].to_internal_repr(v)) for p in drawn for k, v in p.items())
    # Each trial trains the network its parameters name.
    for params in drawn:
        trial = trial_overrides(cfg.base.to_dict(), params)
        rates = params["model.dilation"]
        assert trial.model.dilation == ([rates] if isinstance(rates, int) else [int(d) for d in rates.split(",")])
        assert (trial.model.block, trial.model.attention, trial.train.loss) == (
            params["model.block"], params["model.attention"], params["train.loss"],
        )  # fmt: skip
    # The retrain of the best: the winner's parameters (as Tune reports them) on the base, then the budget.
    summary = SearchSummary("t0", drawn[0], 0.1, {}, None, [])
    best = best_config(cfg, summary)
    assert (best.model.block, best.model.attention, best.model.dilation, best.model.upsample) == (
        "residual", "gate", [1, 2], "bilinear",
    )  # fmt: skip
    assert (best.train.loss, best.train.edge_weight) == ("edge", 0.1)
    assert best.train.epochs == cfg.retrain.epochs
