"""Tests for bss_model.config: defaults <- YAML <- --set, type/range checks, one-line errors, the CLI contract."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bss_model.config import (
    Config,
    DataConfig,
    EvalConfig,
    ModelConfig,
    TrainConfig,
    check_fair_budget,
    load_config,
    save_config,
    steps_per_epoch,
)
from bss_model.errors import BssError, ConfigError
from bss_model.variants import VARIANTS

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def config_error(path: Path | None = None, sets: list[str] | None = None) -> str:
    """The message of the ConfigError that loading raises; asserts it is a single line."""
    with pytest.raises(ConfigError) as info:
        load_config(path, sets)
    message = str(info.value)
    assert message, "a ConfigError must say what is wrong"
    assert "\n" not in message, f"ConfigError must be one line, got {message!r}"
    return message


# --------------------------------------------------------------------------------------
# Precedence: defaults <- YAML <- --set


def test_defaults_load_and_match_the_dataclasses() -> None:
    cfg = load_config()
    assert cfg == Config()
    # Spot-check against the dataclass field defaults, so a default cannot drift silently.
    for section, cls in (("data", DataConfig), ("model", ModelConfig), ("train", TrainConfig), ("eval", EvalConfig)):
        for f in dataclasses.fields(cls):
            expected = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            assert getattr(getattr(cfg, section), f.name) == expected, f"{section}.{f.name}"
    # The default variant is the reference network.
    for key, value in VARIANTS["seed"].items():
        assert getattr(cfg.model, key) == value
    assert isinstance(cfg.train.lr, float)


def test_yaml_overrides_defaults_and_set_overrides_yaml(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "train:\n  epochs: 7\n  batch_size: 64\n  schedule: cosine\neval:\n  draws: 3\ndata:\n  val_pairs: 500\n",
    )
    cfg = load_config(path)
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.schedule) == (7, 64, "cosine")
    assert cfg.eval.draws == 3 and cfg.data.val_pairs == 500
    # Keys the file does not set keep their defaults.
    assert cfg.train.samples_per_epoch == TrainConfig.samples_per_epoch
    assert cfg.eval.pairs == EvalConfig.pairs

    cfg = load_config(path, ["train.epochs=9", "eval.pairs=123", "train.lr=3e-4", "train.tensorboard=false"])
    assert cfg.train.epochs == 9  # --set beats the file
    assert cfg.train.batch_size == 64  # the file still beats the default
    assert cfg.eval.pairs == 123 and cfg.eval.draws == 3
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.tensorboard is False
    # The last --set of a key wins.
    assert load_config(path, ["train.epochs=2", "train.epochs=5"]).train.epochs == 5


def test_yaml_exponent_float_becomes_float(tmp_path: Path) -> None:
    text = "train:\n  lr: 1e-3\n  min_lr: 1e-6\n  weight_decay: 5e-5\n"
    # The premise: PyYAML (YAML 1.1) reads 1e-3 as a string.
    assert yaml.safe_load(text)["train"]["lr"] == "1e-3"
    cfg = load_config(write(tmp_path, text))
    assert type(cfg.train.lr) is float and cfg.train.lr == 1e-3
    assert type(cfg.train.min_lr) is float and cfg.train.min_lr == 1e-6
    assert type(cfg.train.weight_decay) is float and cfg.train.weight_decay == 5e-5
    # An integer where a float is expected becomes a float too.
    assert type(load_config(None, ["train.lr=1"]).train.lr) is float


def test_on_off_literals_accept_yaml_booleans(tmp_path: Path) -> None:
    # PyYAML reads bare on/off as booleans; for on/auto/off choices they mean the strings.
    cfg = load_config(write(tmp_path, "train:\n  channels_last: off\n  compile: on\n"))
    assert (cfg.train.channels_last, cfg.train.compile) == ("off", "on")
    cfg = load_config(None, ["train.compile=off", "train.channels_last=on"])
    assert (cfg.train.compile, cfg.train.channels_last) == ("off", "on")
    # A boolean is still no valid value for a Literal without on/off choices.
    assert "train.precision" in config_error(None, ["train.precision=true"])


def test_variant_preset_expands_and_explicit_keys_win(tmp_path: Path) -> None:
    tiny = VARIANTS["tiny"]
    cfg = load_config(write(tmp_path, "model:\n  variant: tiny\n"))
    assert cfg.model.variant == "tiny"
    for key, value in tiny.items():
        assert getattr(cfg.model, key) == value, key

    # A key set beside the variant (in the file or by --set) overrides the preset; the rest stays preset.
    cfg = load_config(write(tmp_path, "model:\n  variant: tiny\n  filters: 12\n"), ["model.depth=3"])
    assert cfg.model.filters == 12 and cfg.model.depth == 3
    for key, value in tiny.items():
        if key not in ("filters", "depth"):
            assert getattr(cfg.model, key) == value, key

    # The variant can come from --set alone and still expands.
    cfg = load_config(None, ["model.variant=seed-bn-consistent"])
    assert (cfg.model.norm, cfg.model.head) == ("batch", "consistent")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_preset_is_a_valid_config(variant: str) -> None:
    cfg = load_config(None, [f"model.variant={variant}"])
    assert {k: getattr(cfg.model, k) for k in VARIANTS[variant]} == VARIANTS[variant]


def test_saved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(None, ["model.variant=tiny", "model.filters=6", "train.lr=2e-3", "train.compile=off"])
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg


# --------------------------------------------------------------------------------------
# Errors: one line, naming the key


def test_unknown_key_suggests_the_closest(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, "train:\n  epoch: 3\n"))
    assert "train.epoch" in message and "did you mean 'train.epochs'" in message
    message = config_error(None, ["trian.epochs=3"])
    assert "trian" in message and "did you mean 'train'" in message
    message = config_error(None, ["model.filtres=8"])
    assert "model.filtres" in message and "did you mean 'model.filters'" in message
    for typo, key in (("model.atention", "model.attention"), ("model.dilations", "model.dilation"),
                      ("model.blocks", "model.block"), ("model.upsampling", "model.upsample"),
                      ("train.edge_weigth", "train.edge_weight")):  # fmt: skip
        message = config_error(None, [f"{typo}=1"])
        assert f"did you mean '{key}'" in message, message


def test_dilation_is_a_list_written_three_ways(tmp_path: Path) -> None:
    """[1, 2, 4] in YAML; one rate for every conv; or the comma form a search space hands Optuna."""
    assert load_config(write(tmp_path, "model:\n  dilation: [1, 2, 4]\n")).model.dilation == [1, 2, 4]
    assert load_config(None, ["model.dilation=2"]).model.dilation == [2]
    assert load_config(None, ["model.dilation=1,2,4"]).model.dilation == [1, 2, 4]
    assert load_config(None, ["model.dilation=[1, 2, 4]"]).model.dilation == [1, 2, 4]
    assert load_config().model.dilation == [1]
    # The resolved config holds the list, and round-trips.
    cfg = load_config(None, ["model.dilation=2,1", "model.block=residual", "train.loss=edge"])
    save_config(cfg, tmp_path / "saved.yaml")
    assert yaml.safe_load((tmp_path / "saved.yaml").read_text())["model"]["dilation"] == [2, 1]
    assert load_config(tmp_path / "saved.yaml") == cfg


def test_a_config_written_before_the_new_parts_loads_as_the_same_model() -> None:
    """A checkpoint's config from before model.block/attention/dilation/upsample and train.edge_weight."""
    from bss_model.config import config_from_dict

    old = load_config(None, ["model.variant=seed-bn-consistent"]).to_dict()
    for key in ("block", "attention", "dilation", "upsample"):
        del old["model"][key]
    del old["train"]["edge_weight"]
    cfg = config_from_dict(old)
    assert (cfg.model.block, cfg.model.attention, cfg.model.dilation, cfg.model.upsample) == (
        "plain", "none", [1], "transpose",
    )  # fmt: skip
    assert cfg == load_config(None, ["model.variant=seed-bn-consistent"])


@pytest.mark.parametrize(
    ("sets", "key", "words"),
    [
        (["train.epochs=abc"], "train.epochs", "wrong type"),
        (["model.filters=1.5"], "model.filters", "wrong type"),
        (["train.lr=fast"], "train.lr", "wrong type"),
        (["train.tensorboard=3"], "train.tensorboard", "wrong type"),
        (["data.dir=[1, 2]"], "data.dir", "wrong type"),
        (["train.lr=0"], "train.lr", "out of range"),
        (["train.lr=-1e-3"], "train.lr", "out of range"),
        (["train.lr=.nan"], "train.lr", "out of range"),
        (["model.filters=0"], "model.filters", "out of range"),
        (["model.depth=6"], "model.depth", "out of range"),
        (["model.depth=0"], "model.depth", "out of range"),
        (["data.val_fraction=1.5"], "data.val_fraction", "out of range"),
        (["train.min_lr=1"], "train.min_lr", "out of range"),
        (["train.device=gpu"], "train.device", "out of range"),
        (["model.norm=layer"], "model.norm", "not allowed"),
        (["train.schedule=step"], "train.schedule", "not allowed"),
        (["train.precision=fp16"], "train.precision", "not allowed"),
        (["model.variant=huge"], "model.variant", "unknown"),
        (["model.block=dense"], "model.block", "not allowed"),
        (["model.attention=yes"], "model.attention", "not allowed"),
        (["model.upsample=nearest"], "model.upsample", "not allowed"),
        (["model.dilation=[0, 2]"], "model.dilation", "out of range"),
        (["model.dilation=[1, 16]"], "model.dilation", "out of range"),
        (["model.dilation=[]"], "model.dilation", "out of range"),
        (["model.dilation=-1"], "model.dilation", "out of range"),
        (["model.dilation=[1.5]"], "model.dilation", "wrong type"),
        (["model.dilation=true"], "model.dilation", "wrong type"),
        (["model.dilation=1,x"], "model.dilation", "wrong type"),
        (["train.loss=focal"], "train.loss", "not allowed"),
        (["train.edge_weight=-0.1"], "train.edge_weight", "out of range"),
        (["train.edge_weight=.inf"], "train.edge_weight", "out of range"),
        (["train.edge_weight=1000"], "train.edge_weight", "out of range"),
    ],
)
def test_bad_values_name_the_key(sets: list[str], key: str, words: str) -> None:
    message = config_error(None, sets)
    assert key in message and words in message


def test_bad_values_from_yaml_name_the_key(tmp_path: Path) -> None:
    assert "train.epochs" in config_error(write(tmp_path, 'train:\n  epochs: "abc"\n'))
    assert "model.filters" in config_error(write(tmp_path, "model:\n  filters: 1.5\n"))
    assert "model.depth" in config_error(write(tmp_path, "model:\n  depth: 6\n"))
    message = config_error(write(tmp_path, "train: 3\n"))
    assert "train" in message and "mapping" in message


@pytest.mark.parametrize("item", ["train.epochs", "=3", "train..epochs=3", ".epochs=3", "train.=3"])
def test_malformed_set_is_rejected(item: str) -> None:
    message = config_error(None, [item])
    assert "--set" in message and "malformed" in message


def test_set_into_a_value_is_rejected() -> None:
    message = config_error(None, ["train.epochs.x=3"])
    assert "epochs" in message


def test_yaml_syntax_error(tmp_path: Path) -> None:
    path = write(tmp_path, "train:\n  epochs: [1, 2\n  lr: 3\n")
    message = config_error(path)
    assert str(path) in message and "not valid YAML" in message and "line" in message


def test_python_tags_are_rejected_and_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = write(tmp_path, f'train: !!python/object/apply:os.system ["touch {marker}"]\n')
    message = config_error(path)
    assert "tag" in message and "not allowed" in message
    assert not marker.exists(), "safe_load must never call os.system"


@pytest.mark.parametrize("text", ["- train\n- model\n", "just a string\n", "42\n"])
def test_non_mapping_file_is_rejected(tmp_path: Path, text: str) -> None:
    message = config_error(write(tmp_path, text))
    assert "mapping" in message


def test_missing_file_and_empty_file(tmp_path: Path) -> None:
    message = config_error(tmp_path / "nope.yaml")
    assert "nope.yaml" in message and "does not exist" in message
    # An empty file is an empty mapping: all defaults.
    assert load_config(write(tmp_path, "")) == Config()


def test_config_error_is_a_user_error() -> None:
    assert issubclass(ConfigError, BssError) and ConfigError.exit_code == 2


# --------------------------------------------------------------------------------------
# The CLI contract: exit 2, one "error:" line on stderr, no traceback


@pytest.mark.parametrize(
    ("content", "args"),
    [
        (None, []),  # the file does not exist
        ("train:\n  epochs: abc\n", []),
        ("model:\n  depth: 6\n", []),
        ("train: !!python/object/apply:os.system [echo hi]\n", []),
        ("train:\n  epochs: 1\n", ["--set", "train.epochs"]),
    ],
    ids=["missing", "wrong-type", "out-of-range", "python-tag", "malformed-set"],
)
def test_train_cli_reports_bad_config_in_one_line(tmp_path: Path, content: str | None, args: list[str]) -> None:
    path = tmp_path / "bad.yaml"
    if content is not None:
        path.write_text(content)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "bss_model.train", "--config", str(path), "--out", str(tmp_path / "runs"), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:") and "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists(), "a bad config must fail before a run folder is made"


# --------------------------------------------------------------------------------------
# Sample budgets


@pytest.mark.parametrize(
    ("samples", "batch", "steps"),
    [(161_984, 32, 5062), (161_984, 64, 2531), (161_984, 128, 1266), (100, 64, 2), (95, 64, 1), (96, 64, 2),
     (1, 256, 1), (640, 32, 20)],
)  # fmt: skip
def test_steps_per_epoch_rounds_the_sample_budget(samples: int, batch: int, steps: int) -> None:
    # By hand: 161984/128 = 1265.5 rounds half up to 1266; 100/64 = 1.56 -> 2; 95/64 = 1.48 -> 1;
    # 96/64 = 1.5 -> 2; a budget below one batch still trains one step.
    t = load_config(None, [f"train.samples_per_epoch={samples}", f"train.batch_size={batch}"]).train
    assert steps_per_epoch(t) == t.steps_per_epoch == steps
    assert t.epoch_samples == steps * batch


def test_a_budget_all_batch_sizes_divide_gives_equal_samples_per_rung() -> None:
    samples, rung_epochs = 163_840, (1, 3, 9)  # 163,840 = 640 x 256
    seen = {}
    for batch in (32, 64, 128, 256):
        t = load_config(None, [f"train.samples_per_epoch={samples}", f"train.batch_size={batch}"]).train
        seen[batch] = [k * t.epoch_samples for k in rung_epochs]
        assert t.steps_per_epoch == samples // batch
    assert seen[32] == seen[64] == seen[128] == seen[256] == [163_840, 491_520, 1_474_560]
    check_fair_budget(samples, [32, 64, 128, 256])  # accepted
    # The reference budget is fair for 32 and 64 but not for 128 (161,984 / 128 = 1265.5).
    t128 = load_config(None, ["train.samples_per_epoch=161984", "train.batch_size=128"]).train
    assert t128.epoch_samples == 162_048 != 161_984


def test_check_fair_budget_names_the_batch_size_and_the_fix() -> None:
    check_fair_budget(161_984, [32, 64])
    with pytest.raises(ConfigError) as info:
        check_fair_budget(161_984, [32, 64, 128, 256])
    message = str(info.value)
    assert "\n" not in message
    assert "train.samples_per_epoch=161984" in message and "train.batch_size=128" in message
    # The fix: the nearest multiples of lcm(32, 64, 128, 256) = 256 below and above.
    assert "multiple of 256" in message and "161792" in message and "162048" in message
    assert 161_792 % 256 == 0 and 162_048 % 256 == 0 and 161_792 < 161_984 < 162_048
    check_fair_budget(162_048, [32, 64, 128, 256])
    with pytest.raises(ConfigError, match=r"base\.train\.batch_size=48"):
        check_fair_budget(1024, [32, 48], key="base.train")


@pytest.mark.parametrize("source", ["yaml", "set"])
def test_the_old_steps_key_points_to_samples_per_epoch(tmp_path: Path, source: str) -> None:
    if source == "yaml":
        message = config_error(write(tmp_path, "train:\n  steps_per_epoch: 2000\n  batch_size: 64\n"))
    else:
        message = config_error(None, ["train.batch_size=64", "train.steps_per_epoch=2000"])
    assert "train.steps_per_epoch was replaced by train.samples_per_epoch" in message
    assert "train.samples_per_epoch=128000" in message  # 2000 x 64, the same budget in samples
    assert "did you mean" not in message


# --------------------------------------------------------------------------------------
# configs/seed.yaml is the reference run, exactly


def test_seed_yaml_is_the_reference_network_and_training() -> None:
    import torch

    from bss_model.losses import objective
    from bss_model.model import build_model, count_parameters
    from bss_model.step import build_optimizer

    cfg = load_config(REPO / "configs" / "seed.yaml")
    model = build_model(cfg.model)
    assert count_parameters(model) == 3_684_214
    assert {k: getattr(cfg.model, k) for k in VARIANTS["seed"]} == VARIANTS["seed"] and cfg.model.output == "none"
    assert cfg.model.init == "keras"  # Keras's glorot-uniform kernels and zero biases
    t = cfg.train
    assert (t.optimizer, t.lr, t.weight_decay, t.batch_size, t.epochs) == ("adam", 1e-3, 0.0, 32, 120)
    assert (t.samples_per_epoch, t.steps_per_epoch, t.epoch_samples) == (161_984, 5062, 161_984)
    assert t.epochs * t.epoch_samples == 19_438_080  # the reference's 19.4M training samples
    assert (t.schedule, t.plateau_factor, t.min_lr) == ("plateau", 0.5, 1e-5)
    # Keras's ReduceLROnPlateau(patience=10) with its default absolute min_delta, in torch's terms
    assert (t.plateau_patience, t.plateau_threshold, t.plateau_threshold_mode) == (9, 1e-4, "abs")
    assert (t.loss, t.ema_decay, t.grad_clip) == ("mse", 0.0, 0.0)
    assert cfg.data.val_fraction == 0.1 and (cfg.eval.draws, cfg.eval.pairs) == (10, 20000)
    # What the trainer builds from it: plain Adam over every parameter, and the MSE objective.
    opt = build_optimizer(model, t)
    assert type(opt) is torch.optim.Adam and len(opt.param_groups) == 1
    assert (opt.defaults["lr"], opt.defaults["weight_decay"], opt.defaults["betas"]) == (1e-3, 0.0, (0.9, 0.999))
    assert opt.defaults["eps"] == 1e-7  # Keras's Adam epsilon
    pred, target = torch.tensor([0.5, -1.0]), torch.zeros(2)
    assert objective(t.loss)(pred, target)[0].item() == (0.25 + 1.0) / 2


def keras_reduce_lr_on_plateau(vals: list[float], lr: float, factor: float, patience: int, min_delta: float,
                               min_lr: float) -> list[float]:  # fmt: skip
    """Keras's ReduceLROnPlateau (mode min, cooldown 0), as its documentation and source state it."""
    best, wait, out = float("inf"), 0, []
    for v in vals:
        if v < best - min_delta:
            best, wait = v, 0
        else:
            wait += 1
            if wait >= patience:
                lr = max(lr * factor, min_lr) if lr > min_lr else lr
                wait = 0
        out.append(lr)
    return out


def test_the_seed_schedule_drops_the_lr_where_keras_would() -> None:
    import math

    import numpy as np
    import torch

    from bss_model.step import build_plateau

    # A validation curve shaped like the reference run's: fast early progress, then gains far below 1e-4.
    rng = np.random.default_rng(0)
    vals = [4e-4 + 3e-3 * math.exp(-e / 6) + float(rng.normal(0, 2e-6)) for e in range(120)]

    def torch_lrs(sets: list[str]) -> list[float]:
        t = load_config(REPO / "configs" / "seed.yaml", sets).train
        opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=t.lr)
        sched = build_plateau(opt, t)
        out = []
        for v in vals:
            sched.step(v)
            out.append(opt.param_groups[0]["lr"])
        return out

    keras = keras_reduce_lr_on_plateau(vals, 1e-3, 0.5, 10, 1e-4, 1e-5)
    assert len(set(keras)) >= 6 and keras[-1] == 1e-5  # the curve really exercises the rule, down to the floor
    assert torch_lrs([]) == pytest.approx(keras, rel=1e-12, abs=0)
    # torch's own defaults (relative threshold, reduce after `patience`) schedule these epochs differently
    torch_default = torch_lrs(["train.plateau_patience=10", "train.plateau_threshold_mode=rel"])
    assert torch_default != pytest.approx(keras, rel=1e-12, abs=0)
