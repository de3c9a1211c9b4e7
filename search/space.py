"""The search space: one table of distribution kinds, used by validation, by Tune and by the report.

    space:
      model.filters: {choice: [8, 12, 16]}
      model.bottleneck_convs: {int: [1, 3]}          # both ends inclusive
      model.depth: {logint: [2, 4]}
      train.weight_decay: {uniform: [0.0, 0.1]}
      train.lr: {loguniform: [3.0e-4, 3.0e-3]}

A kind is described by three facts -- categorical or numeric, integer or real, linear or log
scale -- and everything else follows from them: which bounds are legal, which Tune domain
samples it and which Optuna distribution describes it to the importance analysis. Adding a
kind is one row in ``KINDS``, not a branch in three modules.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Any

from bss_model.errors import ConfigError


@dataclass(frozen=True)
class Kind:
    categorical: bool = False  # a list of values; otherwise [low, high]
    integer: bool = False  # integer bounds and samples, both ends inclusive
    log: bool = False  # sampled uniformly in log space: needs low > 0


KINDS: dict[str, Kind] = {
    "choice": Kind(categorical=True),
    "int": Kind(integer=True),
    "logint": Kind(integer=True, log=True),
    "uniform": Kind(),
    "loguniform": Kind(log=True),
}


@dataclass(frozen=True)
class Dimension:
    """One checked space entry: ``args`` are the choices, or ``[low, high]`` with both ends inclusive."""

    key: str
    kind: str
    args: list[Any]

    def tune_domain(self) -> Any:
        from ray import tune

        k = KINDS[self.kind]
        if k.categorical:
            return tune.choice(self.args)
        low, high = self.args
        if k.integer:  # Tune's integer upper bound is exclusive; ours is inclusive
            return (tune.lograndint if k.log else tune.randint)(low, high + 1)
        return (tune.loguniform if k.log else tune.uniform)(low, high)

    def optuna_distribution(self) -> Any:
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        k = KINDS[self.kind]
        if k.categorical:
            return CategoricalDistribution(self.args)
        return (IntDistribution if k.integer else FloatDistribution)(self.args[0], self.args[1], log=k.log)

    def check_value(self, value: Any, where: str) -> None:
        """Refuse a value the searcher could not have drawn (a starting point outside the space).

        Outside a choice, Optuna fails after Ray started; outside a range, the trial trains and the
        study drops the parameter, so optuna.db and report.json disagree.
        """
        k = KINDS[self.kind]
        if k.categorical:
            if not any(_same_choice(value, c) for c in self.args):
                raise ConfigError(f"{where}={value!r} is not one of space.{self.key}'s choices {self.args}")
            return
        low, high = self.args
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or not (low <= value <= high) or (k.integer and not float(value).is_integer()):
            what = "an integer" if k.integer else "a number"
            raise ConfigError(
                f"{where}={value!r} is outside space.{self.key} ({self.kind} [{low}, {high}]): use {what} in that range"
            )


def _same_choice(a: Any, b: Any) -> bool:
    """One choice: equal values of one type, or equal numbers (8 and 8.0); never True and 1."""
    return (a == b and type(a) is type(b)) or _same_number(a, b)


def _same_number(a: Any, b: Any) -> bool:
    """8 and 8.0 are the same choice; True and 1 are not."""
    numbers = (int, float)
    return (
        isinstance(a, numbers)
        and isinstance(b, numbers)
        and not isinstance(a, bool)
        and not isinstance(b, bool)
        and a == b
    )


def parse_dimension(key: str, spec: Any) -> Dimension:
    """Check one space entry's shape and bounds (not yet whether its values make valid configs)."""
    where = f"space.{key}"
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(
            f"{where} must be one mapping like {{loguniform: [1.0e-4, 1.0e-2]}} or {{choice: [16, 32]}}; "
            f"kinds: {', '.join(KINDS)}"
        )
    name, args = next(iter(spec.items()))
    if name not in KINDS:
        close = difflib.get_close_matches(str(name), list(KINDS), n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"use one of {', '.join(KINDS)}"
        raise ConfigError(f"{where} has unknown distribution '{name}': {hint}")
    if not isinstance(args, list):
        raise ConfigError(f"{where}.{name} must be a list, got {type(args).__name__}")
    kind = KINDS[name]
    if kind.categorical:
        if not args:
            raise ConfigError(f"{where}.{name} is an empty list: give at least one value")
        for i, value in enumerate(args):
            if any(_same_choice(value, other) for other in args[:i]):
                raise ConfigError(
                    f"{where}.{name} lists {value!r} twice ({args!r}): list each value once (a repeated choice is "
                    "drawn more often, and the study counts it as two)"
                )
        return Dimension(key, name, args)
    if len(args) != 2:
        raise ConfigError(f"{where}.{name} must be [low, high], got {args!r}")
    try:
        low, high = (float(a) for a in args)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}.{name} bounds must be numbers, got {args!r}") from None
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ConfigError(f"{where}.{name} bounds must be finite numbers, got {args!r}: give the range's real ends")
    if low > high:
        raise ConfigError(f"{where}.{name} has low > high ({args[0]} > {args[1]}): swap the bounds")
    if kind.log and low <= 0:
        raise ConfigError(f"{where}.{name} needs low > 0 for a log scale, got {args[0]}")
    if kind.integer:
        if not (low.is_integer() and high.is_integer()):
            raise ConfigError(f"{where}.{name} bounds must be integers, got {args!r}")
        return Dimension(key, name, [int(low), int(high)])
    return Dimension(key, name, [low, high])


def parse_space(space: Any) -> dict[str, Dimension]:
    """Every dimension of a ``space:`` section, parsed; its values are checked against the base by the config."""
    if not isinstance(space, dict) or not space:
        raise ConfigError("space is empty: declare at least one dimension, e.g. train.lr: {loguniform: [1e-4, 1e-2]}")
    return {str(key): parse_dimension(str(key), spec) for key, spec in space.items()}


def param_space(dims: dict[str, Dimension]) -> dict[str, Any]:
    """Tune's ``param_space``: one sampling domain per dotted key."""
    return {key: dim.tune_domain() for key, dim in dims.items()}


def optuna_distributions(dims: dict[str, Dimension]) -> dict[str, Any]:
    """The same space as Optuna distributions (to rebuild a study of finished trials for the report)."""
    return {key: dim.optuna_distribution() for key, dim in dims.items()}
