"""The search config: a base ``bss_model`` config, a search space, Tune and retrain settings.

    base:      # any bss_model config (same keys as configs/seed.yaml)
      model: {variant: tiny}
      train: {epochs: 4, samples_per_epoch: 3200}
    space:     # dotted base keys -> a distribution
      model.filters: {choice: [8, 12, 16]}
      model.bottleneck_convs: {int: [1, 3]}       # inclusive
      train.lr: {loguniform: [3.0e-4, 3.0e-3]}
    tune: {num_samples: 8, max_concurrent: 2}
    retrain: {seeds: 3}

Every space dimension is checked up front: its key must exist in the base config,
its range must be ordered and non-empty (``search/space.py``), and its endpoints (or
every choice) must themselves make a valid config -- so ``model.filters: {int: [0, 8]}``
fails before any Ray worker starts, not hours into a search.

Budgets are samples (``train.samples_per_epoch``), and the search is compute-fair: every
trial sees the same samples per epoch, hence per ASHA rung, whatever batch size it drew.
``check_budget`` refuses a space that would break that (see there).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bss_model.config import (
    MAX_EPOCHS,
    MAX_SAMPLES_PER_EPOCH,
    MAX_SEED,
    Config,
    apply_overrides,
    build,
    check_fair_budget,
    check_range,
    check_seed,
    expand_sections,
    flatten,
    read_yaml,
    resolve_variant,
    section_paths,
    shown,
    with_overrides,
)
from bss_model.errors import ConfigError
from search.objectives import check_objectives, check_pick, parse_pick
from search.space import Dimension, choice_value, parse_space

MAX_TRIALS = 100_000
# Ray counts resources in units of 1/10,000: a smaller non-zero request is refused by every task it starts.
RESOURCE_UNIT = 1e-4
NAME_MAX = 255  # bytes in one folder name on ext4, XFS, APFS, NTFS and object-storage key segments alike
MAX_SEEDS = 1000
MAX_IMAGES = 64  # test mixtures in one separation picture
MAX_LATENCY_BATCH = 4096


@dataclass
class TuneSection:
    name: str = ""  # experiment folder name under storage_path; default: the config file's stem
    # Local folder, shared filesystem path (NFS) or any URI Ray accepts (s3://, gs://).
    storage_path: str = "results"
    num_samples: int = 8
    max_concurrent: int = 2
    cpus_per_trial: float = 1.0
    # A GPU fraction lets several small trials share one GPU (0.25 = four per GPU).
    # Forced to 0 when the cluster has no GPU, so the same config runs on a laptop.
    gpus_per_trial: float = 0.0
    seed: int = 0  # TPE sampler seed
    n_startup_trials: int = 4  # random trials before TPE starts modelling
    grace_period: int = 1  # ASHA: epochs before a trial can be stopped
    reduction_factor: float = 2.0
    max_failures: int = 2  # retries per trial, each from its last checkpoint
    # Known-good starting points: mappings of space keys to values (e.g. the reference).
    points_to_evaluate: list = field(default_factory=list)
    checkpoints_to_keep: int = 2
    # What the search minimises: [val_mse] (one objective), or val_mse and one cost (params, macs, cpu_ms, gpu_ms),
    # for a Pareto front of accuracy against cost (search/objectives.py).
    objectives: list = field(default_factory=lambda: ["val_mse"])
    latency_batch: int = 1  # the images in the one batch cpu_ms / gpu_ms time (search/costs.py)
    verbose: int = 0  # 0: the project's lines (search/console.py); 1: + Ray Tune's trial table; 2-3: + its results
    # Experiment trackers, by name, with their settings: {mlflow: {tracking_uri: ...}, wandb: {mode: offline}}
    # (Ray's integrations; search/trackers.py). Each needs its extra: pip install 'bss-search[mlflow]'.
    callbacks: dict = field(default_factory=dict)
    # Where the Optuna study lives (search/study.py): "" = <experiment>/optuna.db, one SQLite file per experiment;
    # or an Optuna storage URL a team shares (postgresql://user@host/studies; ${VAR}s are read from the environment
    # when connecting, so no password is saved). The study is named after the experiment either way.
    study_storage: str = ""

    def validate(self) -> None:
        def check(ok: bool, key: str, value: Any, expected: str) -> None:
            check_range(ok, f"tune.{key}", value, expected)

        check(1 <= self.num_samples <= MAX_TRIALS, "num_samples", self.num_samples, f"1..{MAX_TRIALS:,} trials")
        check(self.max_concurrent >= 1, "max_concurrent", self.max_concurrent, ">= 1")
        cpus, gpus = self.cpus_per_trial, self.gpus_per_trial
        unit = f"Ray's smallest unit, {RESOURCE_UNIT:g}"
        check(RESOURCE_UNIT <= cpus < math.inf, "cpus_per_trial", cpus, f"a finite number >= {unit}, e.g. 1")
        check(
            gpus == 0 or RESOURCE_UNIT <= gpus < math.inf,
            "gpus_per_trial",
            gpus,
            f"0, or a finite number >= {unit}, e.g. 0.25",
        )
        check_seed("tune.seed", self.seed)
        check(self.n_startup_trials >= 0, "n_startup_trials", self.n_startup_trials, ">= 0")
        check(self.grace_period >= 1, "grace_period", self.grace_period, ">= 1 epoch")
        check(
            1 < self.reduction_factor < math.inf,
            "reduction_factor",
            self.reduction_factor,
            "a finite number > 1, e.g. 2",
        )
        check(self.max_failures >= 0, "max_failures", self.max_failures, ">= 0")
        check(self.checkpoints_to_keep >= 1, "checkpoints_to_keep", self.checkpoints_to_keep, ">= 1")
        check(self.verbose in (0, 1, 2, 3), "verbose", self.verbose, "0..3")
        check_objectives(self.objectives, self.gpus_per_trial)
        check(1 <= self.latency_batch <= MAX_LATENCY_BATCH, "latency_batch", self.latency_batch,
              f"1..{MAX_LATENCY_BATCH} images")  # fmt: skip
        if self.name and (Path(self.name).name != self.name or self.name.startswith(".")):
            raise ConfigError(f"tune.name={self.name!r} must be a plain folder name: drop slashes and leading dots")
        if len(self.name.encode("utf-8", "surrogatepass")) > NAME_MAX:
            raise ConfigError(
                f"tune.name={shown(self.name, 60)} is {len(self.name.encode('utf-8', 'surrogatepass'))} bytes long, "
                f"and a folder name holds at most {NAME_MAX}: shorten it"
            )
        if self.callbacks:
            from search.trackers import check_callbacks

            check_callbacks(self.callbacks)
        if self.study_storage:
            from search.study import check_storage_url

            check_storage_url(self.study_storage)


@dataclass
class RetrainSection:
    seeds: int = 5  # independent retrains of the best config; report mean ± std over them
    first_seed: int = 1000  # seeds are first_seed, first_seed+1, ... (distinct from search seeds)
    max_concurrent: int = 0  # 0 = tune.max_concurrent
    # The retrain's budget in samples, applied to the search's best config whatever batch size it
    # has: epochs x samples_per_epoch. The default is the reference's 120 x 161,984 = 19.4M samples
    # (every published result at or below 3.5e-4 trained on >= 15M). Steps per epoch are
    # round(samples_per_epoch / batch_size), so a batch size that does not divide 161,984 (128,
    # 256) sees up to half a batch more or less per epoch (+0.04% at 256); report.json states the
    # samples each seed saw. A config retrained directly (retrain.py --config) keeps its own budget.
    epochs: int = 120
    samples_per_epoch: int = 161_984
    # Dotted overrides applied last (they win over the budget above, e.g. train.epochs).
    overrides: dict = field(default_factory=dict)
    images: int = 8  # test mixtures in the separation picture
    # Which search trial to retrain: best (the lowest val MSE), a limit such as params<=50000 or cpu_ms<=2 (the
    # lowest val MSE within it), or knee (the front's knee); limits and knee need tune.objectives with a cost.
    pick: str = "best"

    def validate(self) -> None:
        check_range(1 <= self.seeds <= MAX_SEEDS, "retrain.seeds", self.seeds, f"1..{MAX_SEEDS}")
        # Every retrain seed is a train.seed: the last one must be a valid seed too.
        last = MAX_SEED - self.seeds + 1
        check_range(
            0 <= self.first_seed <= last, "retrain.first_seed", self.first_seed, f"0..{last} (seeds up to {MAX_SEED})"
        )
        check_range(self.max_concurrent >= 0, "retrain.max_concurrent", self.max_concurrent, ">= 0 (0 = tune's)")
        check_range(1 <= self.epochs <= MAX_EPOCHS, "retrain.epochs", self.epochs, f"1..{MAX_EPOCHS:,}")
        check_range(
            1 <= self.samples_per_epoch <= MAX_SAMPLES_PER_EPOCH,
            "retrain.samples_per_epoch",
            self.samples_per_epoch,
            f"1..{MAX_SAMPLES_PER_EPOCH:,}, e.g. 161984",
        )
        check_range(1 <= self.images <= MAX_IMAGES, "retrain.images", self.images, f"1..{MAX_IMAGES}")
        for key in self.overrides:
            if not isinstance(key, str):
                raise ConfigError(f"retrain.overrides key {key!r} must be a dotted config key, e.g. train.epochs")
        parse_pick(self.pick)
        for key in expand_sections(self.overrides):
            fixed = not_for_the_retrain(key)
            if fixed:
                raise ConfigError(f"retrain.overrides sets {key}, {fixed}")

    @property
    def seed_list(self) -> list[int]:
        return [self.first_seed + i for i in range(self.seeds)]

    def params(self) -> dict[str, Any]:
        """The dotted keys the retrain sets on the best config: the sample budget, then the overrides."""
        return {"train.epochs": self.epochs, "train.samples_per_epoch": self.samples_per_epoch, **self.overrides}


@dataclass
class PlanSection:
    """How a budget (``budget:``, or ``--budget``) is divided: search/budget.py plans the rest from throughput
    measured on the machine. Without a budget these are unused."""

    # The search's share of the training time (what the budget leaves after startup, the evaluation and the
    # report); the retrain gets the rest. benchmarks/time_to_quality.py measures the job at several shares.
    search_share: float = 0.35
    # A full-budget trial's time is at least this share of a retrain seed's: at small budgets the search runs
    # fewer, longer trials rather than many that rank nothing. 0.25 because the learning-curve table's rank
    # correlation between a configuration's val MSE at a quarter of the budget and at its end is 0.75, at an
    # eighth only 0.61 (benchmarks/results/learning-curves-cpu.json, README "Does the search search well?").
    min_trial_share: float = 0.25

    def validate(self) -> None:
        check_range(0 < self.search_share < 1, "plan.search_share", self.search_share, "in (0, 1), e.g. 0.35")
        check_range(0 < self.min_trial_share <= 1, "plan.min_trial_share", self.min_trial_share, "in (0, 1], e.g. 0.25")


@dataclass
class SearchConfig:
    base: Config = field(default_factory=Config)
    space: dict = field(default_factory=dict)
    tune: TuneSection = field(default_factory=TuneSection)
    retrain: RetrainSection = field(default_factory=RetrainSection)
    # The whole job's wall-clock budget, e.g. "10m" (units s, m, h; `--budget` sets it): the job plans its
    # search, retrain and evaluation to end within it (search/budget.py). "" = no budget: the sample budgets
    # above (base.train.samples_per_epoch, retrain.*) are run as they are set.
    budget: str = ""
    plan: PlanSection = field(default_factory=PlanSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def budget_s(self) -> float:
        """The budget in seconds, 0 = none."""
        from search.budget import parse_duration

        return parse_duration(self.budget) if self.budget else 0.0

    def dimensions(self) -> dict[str, Dimension]:
        """The space, parsed and checked against the base (empty for a retrain of a named config)."""
        return validate_space(self.base.to_dict(), self.space) if self.space else {}


# --------------------------------------------------------------------------------------
# Keys that mean something in a trial, and in the retrain


# Never a search dimension: what every trial must share so their validation MSEs compare (the data and the
# validation split), what the search never uses (the test protocol: the retrain's, picked as the winner's
# params), the seed (the retrain's own seeds replace it), and how the hardware runs and logs a trial.
NOT_SEARCHABLE = {
    "data.": "the data and the validation split every trial is scored on must be the same for all: set it in base.data",
    "eval.": "the test protocol is the retrain's, never a trial's (the search does not touch the test sets): "
    "set it in base.eval",
    "train.seed": "the retrain trains its own seeds (retrain.first_seed, retrain.seeds): set base.train.seed",
    "train.device": "a hardware setting, not a hyperparameter: set base.train.device",
    "train.threads": "a hardware setting, not a hyperparameter: set base.train.threads",
    "train.compile": "a hardware setting, not a hyperparameter: set base.train.compile",
    "train.channels_last": "a hardware setting, not a hyperparameter: set base.train.channels_last",
    "train.cuda_graphs": "a hardware setting, not a hyperparameter: set base.train.cuda_graphs",
    "train.tensorboard": "a logging setting: set base.train.tensorboard",
    "train.image_every": "a logging setting: set base.train.image_every",
    "train.log_every": "a logging setting: set base.train.log_every",
}
# The experiment's own, never the retrain's: its data and validation split, its test protocol (changeable
# on --resume until the retrain finishes, which retrain.overrides is not) and the seeds.
NOT_RETRAINABLE = {
    "data.": "which is the experiment's (its data and validation split): set base.data (or pass --data-dir) instead",
    "eval.": "which is the experiment's test protocol: set base.eval instead (it may change on --resume until the "
    "retrain finishes)",
    "train.seed": "which the retrain sets itself: use retrain.first_seed and retrain.seeds",
}


def _match(key: str, table: dict[str, str]) -> str:
    return next((why for k, why in table.items() if key == k or (k.endswith(".") and key.startswith(k))), "")


def not_searchable(key: str) -> str:
    """Why ``key`` cannot be a space dimension ('' if it can)."""
    return _match(key, NOT_SEARCHABLE)


def not_for_the_retrain(key: str) -> str:
    """Why ``key`` cannot be a ``retrain.overrides`` key ('' if it can)."""
    return _match(key, NOT_RETRAINABLE)


def validate_space(base: dict[str, Any], space: dict[str, Any]) -> dict[str, Dimension]:
    """Parse every dimension and prove each endpoint/choice yields a valid config."""
    leaves = set(flatten(base))
    for key in map(str, space):  # before its values are parsed: a section's mapping is no choice either
        if key in section_paths(Config):
            raise ConfigError(
                f"space.{key} is a section, not a key: give each of its keys its own dimension, e.g. "
                f"space.{key}.{next(k for k in sorted(leaves) if k.startswith(key + '.')).split('.')[-1]}"
            )
    dims = parse_space(space)
    for key, dim in dims.items():
        why = not_searchable(key) if key in leaves else ""
        if why:
            raise ConfigError(f"space.{key} cannot be a search dimension: {why}, and remove it from the space")
        for value in dim.args:  # both endpoints of a range, every value of a choice
            with_overrides(base, {key: value}, where=f"space.{key}: ")
    return dims


# The budget is what ASHA compares trials at, so it is the same for every trial: a base key.
BUDGET_KEYS = ("train.epochs", "train.samples_per_epoch")


def check_budget(base: Config, dims: dict[str, Dimension], points: list[dict[str, Any]]) -> None:
    """Refuse a search in which trials would see different samples per epoch (hence per ASHA rung).

    ASHA's time attribute is the epoch (``training_iteration``: what Tune counts and restores
    with a trial, whatever the trial reports). That is fair only because an epoch is the same
    number of samples for every trial: steps = samples_per_epoch / batch_size exactly, for every
    batch size the space can draw (and the base's, and the starting points'). A batch size that
    does not divide the budget would round to whole steps and see slightly more or fewer samples
    at every rung; a budget key in the space would make the rungs themselves differ.
    """
    for key in BUDGET_KEYS:
        if key in dims:
            raise ConfigError(
                f"space.{key} would give trials different budgets, and ASHA compares them at equal samples per "
                f"rung: set base.{key} (the same for every trial) and remove it from the space"
            )
    dim = dims.get("train.batch_size")
    if dim is None:
        return  # one batch size for every trial: its rounding, if any, is the same for all
    if dim.kind != "choice":
        raise ConfigError(
            f"space.train.batch_size is a {dim.kind} range, so some batch sizes would not divide "
            f"base.train.samples_per_epoch={base.train.samples_per_epoch}: use {{choice: [...]}} of batch sizes "
            "that divide it, e.g. {choice: [64, 128, 256]}"
        )
    sizes = [*dim.args, base.train.batch_size]
    sizes += [p["train.batch_size"] for p in points if isinstance(p, dict) and "train.batch_size" in p]
    check_fair_budget(base.train.samples_per_epoch, sizes, key="base.train")


def check_misplaced_base_keys(raw: dict[str, Any]) -> None:
    """A bss_model section at the top of a search config (``--set train.lr=...``) belongs under ``base``.

    Without this, the generic "unknown key" check suggests the nearest search section by
    spelling ('train' -> 'retrain'), which is the wrong fix.
    """
    search_sections = {f.name for f in dataclasses.fields(SearchConfig)}
    base_sections = {f.name for f in dataclasses.fields(Config)}
    for key, value in raw.items():
        if key in search_sections or key not in base_sections:
            continue
        dotted = str(key)  # follow a single path down (what one --set makes) to name the whole key
        while isinstance(value, dict) and len(value) == 1:
            sub, value = next(iter(value.items()))
            dotted += f".{sub}"
        raise ConfigError(
            f"unknown config key '{dotted}': did you mean 'base.{dotted}'? (a search config holds the "
            "bss_model config under base:)"
        )


def load_search_config(path: str | Path | None, sets: list[str] | None = None) -> SearchConfig:
    """Defaults <- YAML <- ``--set``; base, space, points_to_evaluate and retrain overrides validated."""
    raw = apply_overrides(read_yaml(path) if path else {}, sets, flat_sections=("space",), schema=SearchConfig)
    check_misplaced_base_keys(raw)
    if isinstance(raw.get("budget"), (int, float)) and not isinstance(raw.get("budget"), bool):
        from search.budget import parse_duration

        parse_duration(raw["budget"])  # a bare number: "has no unit", not "the wrong type"
    base_raw = raw.get("base") or {}
    if not isinstance(base_raw, dict):
        raise ConfigError("base must be a mapping (a bss_model config: data/model/train/eval)")
    if isinstance(base_raw.get("model"), dict) or "model" not in base_raw:
        base_raw = {**base_raw, "model": resolve_variant(base_raw.get("model"))}
    raw = {**raw, "base": base_raw}
    cfg: SearchConfig = build(SearchConfig, raw)
    try:
        cfg.base.validate()
    except ConfigError as exc:
        raise ConfigError(f"base.{exc}") from None
    cfg.tune.validate()
    cfg.retrain.validate()
    base = cfg.base.to_dict()
    parsed = validate_space(base, cfg.space)
    check_reduction_factor(cfg)
    points = cfg.tune.points_to_evaluate
    if len(points) > cfg.tune.num_samples:
        raise ConfigError(
            f"tune.points_to_evaluate has {len(points)} starting points but tune.num_samples={cfg.tune.num_samples}, "
            f"so {len(points) - cfg.tune.num_samples} would never run: raise tune.num_samples to {len(points)} or "
            "more, or drop points"
        )
    for i, point in enumerate(points):
        if not isinstance(point, dict):
            raise ConfigError(f"tune.points_to_evaluate[{i}] must be a mapping of space keys to values")
        unknown = set(point) - set(parsed)
        if unknown:
            raise ConfigError(
                f"tune.points_to_evaluate[{i}] sets {sorted(unknown)} which are not space dimensions: "
                f"use keys from {sorted(parsed)}"
            )
        for key, value in point.items():
            parsed[key].check_value(value, f"tune.points_to_evaluate[{i}].{key}")
        # A list (model.dilation: [1, 2, 4]) goes to the searcher as the choice it matches ("1,2,4").
        point = cfg.tune.points_to_evaluate[i] = {
            key: choice_value(value) if parsed[key].kind == "choice" else value for key, value in point.items()
        }
        with_overrides(base, point, where=f"tune.points_to_evaluate[{i}]: ")
    cfg.plan.validate()
    if cfg.budget:
        cfg.budget_s  # noqa: B018 -- parses it: a bad duration is one line now
        if len(cfg.tune.objectives) > 1:
            # The budget's plan, deadline and time-boxed trials judge val MSE alone (search/budgeted.py).
            raise ConfigError(
                f"budget: {cfg.budget} with tune.objectives {cfg.tune.objectives}: a budgeted job searches val_mse "
                "alone; drop budget (and --budget) for a two-objective search, or set tune.objectives: [val_mse]"
            )
    else:
        # Under a budget the trials are time-boxed (equal wall time, search/budget.py), so no sample budget
        # needs to divide by their batch sizes.
        check_budget(cfg.base, parsed, points)
    points[:] = [complete_point(base, parsed, point, i) for i, point in enumerate(points)]
    with_overrides(base, cfg.retrain.params(), where="retrain.overrides: ")
    check_pick(parse_pick(cfg.retrain.pick), cfg.tune.objectives)
    if not cfg.tune.name:
        cfg.tune.name = Path(path).stem if path else "search"
    return cfg


def complete_point(base: dict[str, Any], dims: dict[str, Dimension], point: dict[str, Any], i: int) -> dict[str, Any]:
    """A starting point with a value for every dimension, in the space's order.

    Ray's searchers take only complete points (a partial one is a ValueError after Ray started). A key the
    point leaves out takes the value it has in the point's own config, the base with the point's keys set
    (so ``{model.variant: seed}`` gets the seed preset's filters), as long as the space could draw it;
    otherwise the point is refused, naming the key to add.
    """
    if set(point) == set(dims):
        return {key: point[key] for key in dims}
    resolved = flatten(with_overrides(base, point).to_dict())
    out = {}
    for key, dim in dims.items():
        if key in point:
            out[key] = point[key]
            continue
        try:
            dim.check_value(resolved[key], f"{key}")
        except ConfigError:
            raise ConfigError(
                f"tune.points_to_evaluate[{i}] leaves out {key}, and the value it would train with "
                f"({resolved[key]!r}, from the base) is outside space.{key}: give {key} in the point"
            ) from None
        # As the searcher takes the choice: a list from the base (model.dilation: [1]) as its comma form ("1").
        out[key] = choice_value(resolved[key]) if dim.kind == "choice" else resolved[key]
    return out


def check_reduction_factor(cfg: SearchConfig) -> None:
    """Refuse an ASHA reduction factor whose rungs come less than an epoch apart.

    ASHA's rungs are at ``grace_period x reduction_factor**k`` epochs, one for every k up to the budget.
    Closer than an epoch, they are rungs no trial stops at; close to 1 there are millions of them, and
    building them hangs the driver before the first trial starts (1.000000000001 did). Rungs an epoch or
    more apart need ``grace_period x (reduction_factor - 1) >= 1``: 2 or more always qualifies.
    """
    grace = min(cfg.tune.grace_period, cfg.base.train.epochs)
    rf = cfg.tune.reduction_factor
    if grace * (rf - 1) < 1 - 1e-9:
        least = math.ceil((1 + 1 / grace) * 100) / 100
        raise ConfigError(
            f"tune.reduction_factor={rf!r} is too close to 1: ASHA's rungs are at tune.grace_period x "
            f"reduction_factor**k epochs, and with grace_period {grace} they would come less than an epoch apart "
            f"(close to 1, millions of them, and no trial starts): use {least:g} or more, e.g. 2, 3 or 4"
        )


def search_config_from_dict(data: dict[str, Any]) -> SearchConfig:
    """Rebuild a saved (resolved) search config."""
    cfg: SearchConfig = build(SearchConfig, data)
    cfg.base.validate()
    return cfg
