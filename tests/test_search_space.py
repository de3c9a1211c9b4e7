"""The one table of distribution kinds: Tune's domains and Optuna's distributions agree with the declared bounds."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from search.config import load_search_config
from search.space import KINDS, optuna_distributions, param_space, parse_dimension, parse_space

ROOT = Path(__file__).resolve().parent.parent

# One valid declaration per kind, with narrow ranges so every value is drawn in a few thousand samples.
SPECS = {
    "choice": {"choice": [8, 12, 16]},
    "int": {"int": [1, 3]},
    "logint": {"logint": [2, 6]},
    "uniform": {"uniform": [0.1, 0.2]},
    "loguniform": {"loguniform": [1.0e-4, 1.0e-2]},
}


def samples(spec: dict, n: int = 4000) -> np.ndarray:
    return np.asarray(parse_dimension("k", spec).tune_domain().sample(size=n, random_state=0))


def test_every_kind_in_the_table_is_covered_here() -> None:
    assert set(SPECS) == set(KINDS)


@pytest.mark.parametrize("kind", ["int", "logint"])
def test_integer_kinds_include_both_bounds(kind: str) -> None:
    low, high = SPECS[kind][kind]
    assert set(samples(SPECS[kind]).tolist()) == set(range(low, high + 1))  # Tune's exclusive upper bound is +1'd


def test_real_kinds_stay_within_bounds_and_log_means_log_scale() -> None:
    uni, log = samples(SPECS["uniform"]), samples(SPECS["loguniform"])
    assert 0.1 <= uni.min() and uni.max() <= 0.2
    assert np.median(uni) == pytest.approx(0.15, abs=0.01)
    assert 1e-4 <= log.min() and log.max() <= 1e-2
    assert np.median(log) == pytest.approx(1e-3, rel=0.15)  # the geometric mean, not the midpoint 5e-3


def test_choice_draws_only_and_every_listed_value() -> None:
    assert set(samples(SPECS["choice"]).tolist()) == {8, 12, 16}


@pytest.mark.parametrize("kind", list(SPECS))
def test_optuna_distribution_accepts_exactly_what_tune_samples(kind: str) -> None:
    """The report rebuilds the study with Optuna's view of the space: it must contain every Tune sample."""
    dim = parse_dimension("k", SPECS[kind])
    dist = dim.optuna_distribution()
    for value in set(samples(SPECS[kind], 500).tolist()):
        assert dist._contains(dist.to_internal_repr(value)), (kind, value)
    if not KINDS[kind].categorical:
        assert (dist.low, dist.high, dist.log) == (*dim.args, KINDS[kind].log)
        step_outside = 1 if KINDS[kind].integer else 1e-6 * dim.args[1]
        assert not dist._contains(dist.to_internal_repr(dim.args[1] + step_outside))


def test_integer_bounds_written_as_floats_become_ints() -> None:
    dim = parse_dimension("model.filters", {"int": [4.0, 8.0]})
    assert dim.args == [4, 8] and all(isinstance(a, int) for a in dim.args)


def test_param_space_of_the_smoke_config_has_one_domain_per_dimension() -> None:
    cfg = load_search_config(ROOT / "configs/smoke.yaml")
    dims = cfg.dimensions()
    space = param_space(dims)
    assert set(space) == set(cfg.space) == set(optuna_distributions(dims))
    lr = cfg.space["train.lr"]["loguniform"]
    assert math.isclose(space["train.lr"].lower, lr[0]) and math.isclose(space["train.lr"].upper, lr[1])


def test_empty_space_is_refused_in_one_line() -> None:
    from bss_model.errors import ConfigError

    with pytest.raises(ConfigError, match="space is empty"):
        parse_space({})
