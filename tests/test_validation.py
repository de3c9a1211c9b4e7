"""What validation accepts, the pipeline runs: a property walk over every config key.

Every key of the bss_model config and of the search config's own sections is tried with values
at and beyond its bounds. Each is either refused with one line naming the key, or accepted; the
accepted extremes are then run, one smoke-scale run per class (every key at its smallest accepted
value; every key at its largest), through training, the protocol and ``bss-separate``. The search
settings' accepted extremes are built into the libraries' objects here and run in a real (tiny) search
in ``tests/test_resume_search.py``.
"""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import pytest
import yaml

from bss_model.config import MAX_SEED, Config, config_from_dict, with_overrides
from bss_model.errors import ConfigError
from bss_model.variants import VARIANTS
from search.config import RetrainSection, TuneSection, load_search_config

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"

# At and beyond the bounds: negative, zero, one, the largest seed and one past it, huge, non-finite,
# and the wrong types (a string, a boolean, nothing, a list).
WALK = [-1, 0, 1, MAX_SEED, MAX_SEED + 1, 10**12, math.inf, -math.inf, math.nan, "x", True, None, [1]]

# The base every bss_model value is tried on: the tiny network on this machine.
BASE = config_from_dict({"model": {"variant": "tiny"}, "train": {"device": "cpu"}}).to_dict()


def leaves(cls: type, prefix: str = "") -> dict[str, Any]:
    """``{dotted key: annotation}`` of every leaf field of a config dataclass."""
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.update(leaves(tp, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = tp
    return out


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def refused_in_one_line(exc: ConfigError, key: str) -> None:
    message = str(exc)
    assert "\n" not in message, message
    assert key in message, f"the message for {key} does not name it: {message}"


def walk_bss_model() -> dict[str, list[Any]]:
    accepted: dict[str, list[Any]] = {}
    for key in leaves(Config):
        for value in WALK:
            try:
                with_overrides(BASE, {key: value})
            except ConfigError as exc:
                refused_in_one_line(exc, key)
            else:
                accepted.setdefault(key, []).append(value)
    return accepted


def test_every_bss_model_key_refuses_what_cannot_run() -> None:
    accepted = walk_bss_model()
    for key, tp in leaves(Config).items():
        values = accepted.get(key, [])
        if tp is float or tp is int:
            # No key has a use for a negative, non-finite or absurd value, or for a boolean as a number.
            bad = [v for v in values if not is_number(v) or v < 0 or not math.isfinite(v)]
            assert not bad, f"{key} accepts {bad}"
            if tp is int:
                huge = [v for v in values if v > MAX_SEED]
                assert huge in ([], [MAX_SEED + 1, 10**12]), f"{key} accepts {huge}"
        elif get_origin(tp) is Literal:
            assert all(v in get_args(tp) or isinstance(v, bool) for v in values), (key, values)
        elif tp is bool:
            assert values == [True], (key, values)
        elif get_origin(tp) is list:  # model.dilation: one rate in range, or a list of them; never a bool or None
            assert values == [1, [1]], (key, values)
    # The cases: a seed numpy cannot take, sizes no device holds.
    for key in ("data.split_seed", "data.val_seed", "train.seed", "eval.seed"):
        assert -1 not in accepted[key] and MAX_SEED in accepted[key] and MAX_SEED + 1 not in accepted[key], key
    for key in ("eval.pairs", "eval.batch_size", "train.batch_size", "data.val_pairs", "model.filters"):
        assert max(v for v in accepted[key] if is_number(v)) < 10**12, key


def test_a_model_no_device_could_hold_is_refused_naming_its_keys() -> None:
    with pytest.raises(ConfigError, match=r"model\.filters=1024 with model\.depth=5 .* lower model\.filters"):
        with_overrides(BASE, {"model.filters": 1024, "model.depth": 5})
    with pytest.raises(ConfigError, match=r"eval\.draws=10000 x eval\.pairs=10000000"):
        with_overrides(BASE, {"eval.draws": 10_000, "eval.pairs": 10_000_000})


# Accepted at their largest, these make any network diverge: they have their own run (below).
DIVERGING = ("train.lr",)


def extreme_config(accepted: dict[str, list[Any]], pick: Any, data_dir: Path) -> Config:
    """One run's config: every numeric key at ``pick`` (min or max) of its accepted walk values."""
    params = {}
    for key, values in accepted.items():
        numbers = [v for v in values if is_number(v)]
        if numbers and get_origin(leaves(Config)[key]) is not Literal and not (pick is max and key in DIVERGING):
            params[key] = pick(numbers)
    # Where the machine, not the config, decides: this machine's data and CPU, no TensorBoard files.
    params.update({"data.dir": str(data_dir), "data.download": False, "train.device": "cpu"})
    params.update({"train.tensorboard": False, "train.threads": 1})
    return with_overrides(BASE, params)


@pytest.mark.parametrize("pick", [min, max], ids=["smallest", "largest"])
def test_accepted_extremes_run_through_training_evaluation_and_separate(
    pick: Any, data_dir: Path, tmp_path: Path
) -> None:
    from bss_model.evaluate import evaluate_checkpoint
    from bss_model.separate import main as separate
    from bss_model.train import train

    cfg = extreme_config(walk_bss_model(), pick, data_dir)
    if pick is max:
        # The extremes a run can reach: the largest seeds, "never" for the patience and the logging intervals.
        assert cfg.train.seed == cfg.eval.seed == cfg.data.split_seed == MAX_SEED
        assert cfg.train.plateau_patience == cfg.train.image_every == 10**12
    else:
        assert cfg.model.bottleneck_convs == 0 and cfg.train.batch_size == cfg.eval.pairs == 1
    result = train(cfg, out_dir=tmp_path / "run")
    assert result.status == "completed" and result.epochs_done == cfg.train.epochs, result.reason
    test = evaluate_checkpoint(tmp_path / "run", device="cpu")
    assert test["draws"] == cfg.eval.draws and math.isfinite(test["baseline_mix_mse_mean"])
    argv = ["--checkpoint", str(tmp_path / "run"), "--demo", "1", "--out", str(tmp_path / "sep"), "--device", "cpu"]
    assert separate([*argv, "--data-dir", str(data_dir), "--threads", "1"]) == 0
    assert any((tmp_path / "sep").iterdir())


def test_the_largest_accepted_learning_rate_ends_as_a_divergence_not_a_nan_score(
    data_dir: Path, tmp_path: Path
) -> None:
    from bss_model.train import train

    accepted = walk_bss_model()
    params = {key: max(v for v in accepted[key] if is_number(v)) for key in DIVERGING}
    cfg = with_overrides(extreme_config(accepted, min, data_dir).to_dict(), params)
    result = train(cfg, out_dir=tmp_path / "run")
    assert result.status == "diverged" and "non-finite" in result.reason, result
    assert not (tmp_path / "run" / "checkpoint").exists(), "a NaN model is never checkpointed as a finished epoch"


# --------------------------------------------------------------------------------------
# The search config's own sections


def walk_search(tmp_path: Path) -> dict[str, list[Any]]:
    smoke = yaml.safe_load(SMOKE.read_text())
    accepted: dict[str, list[Any]] = {}
    sections = {"tune": leaves(TuneSection), "retrain": leaves(RetrainSection)}
    for section, keys in sections.items():
        for key in keys:
            for value in WALK:
                raw = {**smoke, section: {**smoke[section], key: value}}
                path = tmp_path / "walk.yaml"
                path.write_text(yaml.safe_dump(raw))
                try:
                    load_search_config(path)
                except ConfigError as exc:
                    refused_in_one_line(exc, f"{section}.{key}")
                else:
                    accepted.setdefault(f"{section}.{key}", []).append(value)
    return accepted


def test_every_search_key_refuses_what_cannot_run(tmp_path: Path) -> None:
    accepted = walk_search(tmp_path)
    for key, values in accepted.items():
        numbers = [v for v in values if is_number(v)]
        assert all(v >= 0 and math.isfinite(v) for v in numbers), (key, values)
    for key in ("tune.seed", "retrain.first_seed"):
        assert MAX_SEED + 1 not in accepted[key] and -1 not in accepted[key], key
    assert MAX_SEED in accepted["tune.seed"] and 10**12 not in accepted["tune.num_samples"]
    # The accepted extremes are accepted by the libraries that take them (no Ray needed to build these).
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    largest = {
        k: max(v for v in values if is_number(v)) for k, values in accepted.items() if any(map(is_number, values))
    }
    optuna.samplers.TPESampler(seed=largest["tune.seed"], n_startup_trials=largest["tune.n_startup_trials"])
    ASHAScheduler(
        max_t=4, grace_period=min(largest["tune.grace_period"], 4), reduction_factor=largest["tune.reduction_factor"]
    )
    tune.FailureConfig(max_failures=largest["tune.max_failures"])
    tune.CheckpointConfig(num_to_keep=largest["tune.checkpoints_to_keep"])
    tune.TuneConfig(max_concurrent_trials=largest["tune.max_concurrent"], num_samples=largest["tune.num_samples"])


def test_a_base_seed_numpy_cannot_take_is_refused_before_ray(tmp_path: Path, data_dir: Path) -> None:
    """The issue's worst case: base.eval.seed=-1 passed, the search ran, and every retrain seed crashed."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "search" / "run.py"), "--config", str(SMOKE), "--storage-path", str(tmp_path),
         "--set", "base.eval.seed=-1"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "base.eval.seed=-1" in lines[0] and "2**32 - 1" in lines[0], proc.stderr
    assert not any(tmp_path.iterdir()), "nothing is created for a refused config"


# --------------------------------------------------------------------------------------
# The space and its starting points, as the searcher and the trials use them


def search_config(tmp_path: Path, edit: Any) -> Any:
    raw = yaml.safe_load(SMOKE.read_text())
    edit(raw)
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return load_search_config(path)


def test_a_variant_in_the_space_trains_that_variants_shape(tmp_path: Path) -> None:
    """A trial labelled seed trained the base's shape (filters 8, decoder_convs 1): the label lied."""
    from search.trainable import with_overrides as trial_overrides

    def edit(raw: dict[str, Any]) -> None:
        raw["space"] = {"model.variant": {"choice": ["tiny", "seed"]}, "train.lr": {"loguniform": [1e-4, 1e-2]}}
        raw["tune"]["points_to_evaluate"] = [{"model.variant": "seed", "train.lr": 1e-3}]

    cfg = search_config(tmp_path, edit)
    trial = trial_overrides(cfg.base.to_dict(), {"model.variant": "seed", "train.lr": 1e-3})
    assert trial.model.variant == "seed"
    assert {k: getattr(trial.model, k) for k in VARIANTS["seed"]} == VARIANTS["seed"]
    assert trial.train.lr == 1e-3 and trial.train.epochs == cfg.base.train.epochs  # the rest stays the base's
    # The trial's other model keys override the preset, as on the command line.
    trial = trial_overrides(cfg.base.to_dict(), {"model.variant": "seed", "model.filters": 12})
    assert (trial.model.filters, trial.model.decoder_convs) == (12, VARIANTS["seed"]["decoder_convs"])
    # And a retrain's override of the variant does the same.
    retrain = with_overrides(cfg.base.to_dict(), {"model.variant": "seed", "train.epochs": 1})
    assert retrain.model.decoder_convs == VARIANTS["seed"]["decoder_convs"]


@pytest.mark.parametrize(
    ("point", "expected"),
    [
        ({"model.filters": 16}, r"points_to_evaluate\[0\]\.model\.filters=16 is not one of space\.model\.filters"),
        ({"train.lr": 0.5}, r"points_to_evaluate\[0\]\.train\.lr=0\.5 is outside space\.train\.lr"),
        ({"model.decoder_convs": 3}, r"points_to_evaluate\[0\]\.model\.decoder_convs=3 is outside"),
        ({"model.decoder_convs": 1.5}, r"use an integer in that range"),
        ({"train.lr": "fast"}, r"train\.lr='fast' is outside"),
    ],
)
def test_a_starting_point_outside_its_dimension_is_refused(tmp_path: Path, point: dict, expected: str) -> None:
    """Outside a choice it failed after Ray started; outside a range it trained and optuna.db dropped it."""

    def edit(raw: dict[str, Any]) -> None:
        raw["tune"]["points_to_evaluate"] = [{**raw["tune"]["points_to_evaluate"][0], **point}]

    with pytest.raises(ConfigError, match=expected) as info:
        search_config(tmp_path, edit)
    assert "\n" not in str(info.value)


def test_starting_points_at_the_bounds_and_equal_numbers_are_accepted(tmp_path: Path) -> None:
    def edit(raw: dict[str, Any]) -> None:
        point = {"model.filters": 8.0, "model.bottleneck_convs": 2, "model.decoder_convs": 1, "train.lr": 3.0e-3}
        raw["tune"]["points_to_evaluate"] = [point]

    assert search_config(tmp_path, edit).tune.points_to_evaluate[0]["train.lr"] == 3.0e-3


@pytest.mark.parametrize("bounds", [[1e-4, math.inf], [math.nan, 1e-2], [-math.inf, 0.1]])
def test_non_finite_space_bounds_are_refused(tmp_path: Path, bounds: list[float]) -> None:
    def edit(raw: dict[str, Any]) -> None:
        raw["space"]["train.weight_decay"] = {"uniform": bounds}

    with pytest.raises(ConfigError, match=r"space\.train\.weight_decay\.uniform bounds must be finite"):
        search_config(tmp_path, edit)


def test_retrain_overrides_below_a_value_is_one_line(tmp_path: Path) -> None:
    """It leaked a raw TypeError from the second copy of the override function."""

    def edit(raw: dict[str, Any]) -> None:
        raw["retrain"]["overrides"] = {"train.lr.max": 1}

    with pytest.raises(
        ConfigError, match=r"retrain\.overrides: 'train\.lr\.max': 'train\.lr' is a value, not a section"
    ):
        search_config(tmp_path, edit)


def test_there_is_one_override_function() -> None:
    import search.config
    import search.pipeline
    import search.selection
    import search.trainable
    from bss_model import config

    for module in (search.config, search.pipeline, search.selection, search.trainable):
        assert module.with_overrides is config.with_overrides, module


# --------------------------------------------------------------------------------------
# A user's mistake is one line and exit status 2, naming the file or the flag typed


def cli_error(main: Any, argv: list[str], capsys: pytest.CaptureFixture) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2, err
    assert "Traceback" not in err
    return err.splitlines()[-1] if err.startswith("usage:") else err


def bad_configs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """``{case: (path, what the line must say)}``."""
    (tmp_path / "latin1.yaml").write_bytes("train:\n  lr: 1.0e-3  # caf\xe9\n".encode("latin-1"))
    (tmp_path / "folder.yaml").mkdir()
    (tmp_path / "loop-a.yaml").symlink_to(tmp_path / "loop-b.yaml")
    (tmp_path / "loop-b.yaml").symlink_to(tmp_path / "loop-a.yaml")
    (tmp_path / "dangling.yaml").symlink_to(tmp_path / "gone.yaml")
    return {
        "non-utf8": (tmp_path / "latin1.yaml", "is not UTF-8 text (byte 0xe9 at line 2): save it as UTF-8"),
        "directory": (tmp_path / "folder.yaml", "is a directory, not a file"),
        "symlink-loop": (tmp_path / "loop-a.yaml", "is a symlink loop"),
        "dangling": (tmp_path / "dangling.yaml", "does not exist (a symlink to"),
    }


@pytest.mark.parametrize("case", ["non-utf8", "directory", "symlink-loop", "dangling"])
def test_an_unreadable_config_is_one_line_naming_it(case: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from bss_model.train import main as train_main
    from search.run import main as run_main

    path, says = bad_configs(tmp_path)[case]
    for main in (train_main, run_main):
        err = cli_error(main, ["--config", str(path)], capsys)
        assert str(path) in err and says in err, err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "results").exists()


def fake_experiment(tmp_path: Path) -> Path:
    """A finished search's folder as far as retrain.py reads it before Ray: its config and its summary."""
    from search import storage

    cfg = load_search_config(SMOKE)
    cfg.tune.storage_path, cfg.tune.name = str(tmp_path), "exp"
    root = storage.experiment_root(cfg)
    storage.save_resolved_config(cfg, root)
    return Path(root)


@pytest.mark.parametrize(
    ("name", "content", "says"),
    [
        ("search_summary.json", b'{"trials": [{"trial_id": "a", "par', "search_summary.json is damaged"),
        ("search_config.yaml", b"base: {train: {lr: \xff}}\n", "search_config.yaml is not UTF-8"),
        ("search_config.yaml", b"base: [unclosed\n", "search_config.yaml is damaged"),
    ],
    ids=["truncated-summary", "non-utf8-config", "broken-yaml-config"],
)
def test_a_damaged_experiment_file_is_one_line_naming_it(
    name: str, content: bytes, says: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from search.retrain import main as retrain_main
    from search.run import main as run_main

    exp = fake_experiment(tmp_path)
    (exp / name).write_bytes(content)
    err = cli_error(retrain_main, ["--experiment", str(exp)], capsys)
    assert says in err, err
    # The same file met by run.py --resume: one line before Ray starts (no Ray is running in this process).
    err = cli_error(
        run_main, ["--config", str(SMOKE), "--storage-path", str(tmp_path), "--name", "exp", "--resume"], capsys
    )
    assert says in err and "\n" not in err, err
    import ray

    assert not ray.is_initialized()
    assert (exp / name).read_bytes() == content, "the damaged file is left for the user to inspect"


def test_retrain_experiment_refuses_the_flags_it_cannot_honour(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--set, --name, --storage-path and --resume were ignored without a word."""
    from search.retrain import main as retrain_main

    exp = fake_experiment(tmp_path)
    for extra in (["--set", "train.lr=0.1"], ["--name", "other"], ["--storage-path", "elsewhere"], ["--resume"]):
        err = cli_error(retrain_main, ["--experiment", str(exp), *extra], capsys)
        assert f"{extra[0]} applies only with --config" in err, err
    assert sorted(p.name for p in exp.iterdir()) == ["search_config.yaml"]


def test_train_out_naming_a_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from bss_model.train import main as train_main

    out = tmp_path / "runs"
    out.write_text("my notes")
    err = cli_error(train_main, ["--out", str(out)], capsys)
    assert f"--out {out} is a file" in err, err
    err = cli_error(train_main, ["--out", str(out / "below")], capsys)
    assert f"--out {out / 'below'} cannot hold run folders" in err, err
    assert out.read_text() == "my notes"


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--seed", "-1"], "--seed -1 is out of range"),
        (["--pairs", "0"], "--pairs 0 is out of range"),
        (["--device", "gpu"], "--device gpu is not a device"),
    ],
)
def test_evaluate_flags_are_named_as_typed(argv: list[str], says: str, capsys: pytest.CaptureFixture) -> None:
    from bss_model.evaluate import main as evaluate_main

    err = cli_error(evaluate_main, ["--checkpoint", "nowhere", *argv], capsys)
    assert says in err and "eval." not in err and "train.device" not in err, err


def test_evaluate_device_without_cuda_names_the_flag(capsys: pytest.CaptureFixture) -> None:
    import torch

    from bss_model.evaluate import main as evaluate_main

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    err = cli_error(evaluate_main, ["--checkpoint", "nowhere", "--device", "cuda"], capsys)
    assert "--device cuda but no CUDA GPU is available: use --device auto or cpu" in err, err


def test_separate_refuses_a_negative_seed(capsys: pytest.CaptureFixture) -> None:
    from bss_model.separate import main as separate_main

    err = cli_error(separate_main, ["--checkpoint", "nowhere", "--demo", "1", "--seed", "-1"], capsys)
    assert "--seed" in err and "expected a seed in 0.." in err, err


def test_training_out_of_memory_is_one_line_naming_the_sizes(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A size inside the limits can still exceed this machine's memory: one line naming the keys to lower."""
    import torch

    from bss_model import train as train_module

    def no_memory(*args: Any, **kwargs: Any) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 40.00 GiB")

    monkeypatch.setattr(train_module, "train", no_memory)
    err = cli_error(train_module.main, ["--out", str(tmp_path / "runs"), "--set", "train.batch_size=65536"], capsys)
    assert "train.batch_size=65536 ran out of memory" in err and "lower train.batch_size" in err, err


def test_search_resume_changes_allowed_before_and_refused_after_they_could_apply(tmp_path: Path) -> None:
    """Which changes a search --resume takes, decided on the experiment's state (run for real in test_resume_search)."""
    import dataclasses as dc

    from search import storage

    saved = load_search_config(SMOKE)
    root = str(fake_experiment(tmp_path))
    changed = dc.replace(
        saved,
        tune=dc.replace(saved.tune, verbose=2),
        retrain=dc.replace(saved.retrain, seeds=2),
        base=dc.replace(saved.base, eval=dc.replace(saved.base.eval, pairs=123)),
    )
    assert storage.resume_changes(saved, changed, root) == {
        "base.eval.pairs": (4000, 123), "tune.verbose": (0, 2), "retrain.seeds": (3, 2)
    }  # fmt: skip
    (Path(root) / "retrain" / "train_trial_0").mkdir(parents=True)  # the retrain has started: its seeds are set
    with pytest.raises(ConfigError, match=r"\(retrain\.seeds: experiment 3, now 2\)"):
        storage.resume_changes(saved, changed, root)
    (Path(root) / "report.json").write_text("{}")  # finished: nothing may change
    with pytest.raises(ConfigError, match=r"base\.eval\.pairs: experiment 4000, now 123.* it is finished"):
        storage.resume_changes(saved, dc.replace(changed, retrain=saved.retrain), root)


def test_run_name_errors_name_the_flag_typed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from search.run import main as run_main

    err = cli_error(run_main, ["--config", str(SMOKE), "--storage-path", str(tmp_path), "--name", "a/b"], capsys)
    assert err == "error: --name 'a/b' must be a plain folder name: drop slashes and leading dots", err
    err = cli_error(run_main, ["--config", str(SMOKE), "--set", "tune.name=a/b"], capsys)
    assert err.startswith("error: tune.name='a/b' must be a plain folder name"), err
