"""What every command line shares (bss_model/cli.py): --version, --config NAME, --list-configs, --print-config,
bare KEY=VALUE overrides, and the one line for a missing extra. In-process and fast: nothing trains."""

from __future__ import annotations

import importlib.util
from importlib import import_module
from pathlib import Path

import pytest
import yaml

import bss_model
from bss_model.cli import resolve_config
from bss_model.config import load_config
from search.config import load_search_config
from tests._searchutil import cli_error

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = {
    "bss-train": "bss_model.train:main",
    "bss-evaluate": "bss_model.evaluate:main",
    "bss-separate": "bss_model.separate:main",
    "bss-search": "search.run:main",
    "bss-retrain": "search.retrain:main",
}


def _main(target: str):  # noqa: ANN202
    module, name = target.split(":")
    return getattr(import_module(module), name)


def test_the_scripts_are_the_commands_tested_here() -> None:
    text = (REPO / "pyproject.toml").read_text()
    block = text[text.index("[project.scripts]") :].split("\n\n", 1)[0]
    assert sorted(line.split(" = ")[0] for line in block.splitlines()[1:]) == sorted(SCRIPTS)
    for script, target in SCRIPTS.items():
        assert f'{script} = "{target}"' in block


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_every_command_prints_the_one_version(script: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        _main(SCRIPTS[script])(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"{script} (bss-search) {bss_model.__version__}"


def test_config_by_name_or_by_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bss_model import configs

    assert resolve_config("smoke", "search") == str(configs.FOLDER / "smoke.yaml")
    assert resolve_config("seed", "model") == str(configs.FOLDER / "seed.yaml")
    assert Path(configs.FOLDER / "smoke.yaml").read_text() == (REPO / "configs" / "smoke.yaml").read_text()
    # A file of that name wins over the shipped config: the user's own smoke.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "smoke").write_text("base: {}\n")
    assert resolve_config("smoke", "search") == "smoke"
    assert resolve_config(str(REPO / "configs" / "seed.yaml"), "model") == str(REPO / "configs" / "seed.yaml")


@pytest.mark.parametrize(
    ("value", "kind", "words"),
    [
        ("seed", "search", "--config seed is a model config (for bss-train and bss-retrain --config), but this "
         "command takes search configs: use one of gpu-hour, laptop, pareto-cpu, search, smoke"),
        ("smoke", "model", "--config smoke is a search config (for bss-search), but this command takes model configs"),
        ("smok", "search", "--config smok: no such file, and no shipped config of that name: pass a YAML file, or "
         "one of gpu-hour, laptop, pareto-cpu, search, smoke (--list-configs)"),
        ("configs/smoke.yaml", "search", "config file configs/smoke.yaml does not exist (this is not a checkout?): "
         "the shipped one is --config smoke"),
    ],
)  # fmt: skip
def test_a_config_nothing_answers_to_is_one_line(
    value: str, kind: str, words: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_ray: None,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    main = _main(SCRIPTS["bss-search" if kind == "search" else "bss-train"])
    line = cli_error(main, ["--config", value], capsys)
    assert words in line, line


def test_list_configs_names_every_shipped_config_with_its_kind(capsys: pytest.CaptureFixture[str]) -> None:
    for script in ("bss-search", "bss-train", "bss-retrain"):
        with pytest.raises(SystemExit) as info:
            _main(SCRIPTS[script])(["--list-configs"])  # --config is required by bss-search: not for this
        assert info.value.code == 0
        shipped = sorted(REPO.glob("configs/*.yaml"))
        rows = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()[: len(shipped)]}
        kinds = {"gpu-hour": "search", "laptop": "search", "pareto-cpu": "search", "search": "search",
                 "seed": "model", "smoke": "search"}  # fmt: skip
        assert rows == kinds
    assert sorted(rows) == sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))


def test_print_config_is_the_resolved_config_and_runs_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_ray: None, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    smoke = str(REPO / "configs" / "smoke.yaml")
    capsys.readouterr()
    argv = ["--config", "smoke", "--name", "x", "--set", "tune.num_samples=4", "tune.seed=7", "--print-config"]
    assert _main(SCRIPTS["bss-search"])(argv) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    expected = load_search_config(smoke, ["tune.num_samples=4", "tune.name=x", "tune.seed=7"]).to_dict()
    assert printed == expected and printed["tune"]["num_samples"] == 4 and printed["tune"]["seed"] == 7
    # bss-train: the model config; bare overrides after --set (the last value of a key wins).
    argv = ["--config", "seed", "--set", "train.lr=0.5", "train.lr=0.25", "model.variant=tiny", "--print-config"]
    assert _main(SCRIPTS["bss-train"])(argv) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    expected = load_config(REPO / "configs" / "seed.yaml", ["train.lr=0.25", "model.variant=tiny"]).to_dict()
    assert printed == expected and printed["train"]["lr"] == 0.25 and printed["model"]["filters"] == 8
    argv = ["--config", "seed", "train.epochs=3", "--seeds", "2", "--print-config"]
    assert _main(SCRIPTS["bss-retrain"])(argv) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["base"]["train"]["epochs"] == 3 and printed["retrain"]["seeds"] == 2
    assert printed["tune"]["name"] == "seed-retrain"
    assert list(tmp_path.iterdir()) == []  # no run folder, no experiment, no results/


def test_a_bare_argument_that_is_no_override_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_ray: None, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    for script in ("bss-search", "bss-train"):
        config = "smoke" if script == "bss-search" else "seed"
        line = cli_error(_main(SCRIPTS[script]), ["--config", config, "train.lr"], capsys)
        assert line == (
            "error: argument 'train.lr' is not an override: write KEY=VALUE, e.g. train.lr=3e-4 (or --set KEY=VALUE)"
        )
    # A bare override is checked like --set: a wrong key names itself.
    line = cli_error(_main(SCRIPTS["bss-train"]), ["--config", "seed", "train.lrr=1"], capsys)
    assert "unknown config key 'train.lrr'" in line
    assert list(tmp_path.iterdir()) == []


def test_a_missing_extra_is_one_line_naming_the_pip_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_ray: None, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    find_spec = importlib.util.find_spec
    gone: set[str] = set()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in gone else find_spec(name, *a))
    gone |= {"ray", "tensorboard"}
    line = cli_error(_main(SCRIPTS["bss-search"]), ["--config", "smoke"], capsys)
    assert line == (
        "error: python search/run.py needs the 'search' extra (ray, tensorboard not installed): "
        "pip install 'bss-search[search]'"
    )
    line = cli_error(_main(SCRIPTS["bss-retrain"]), ["--config", "seed"], capsys)
    assert "pip install 'bss-search[search]'" in line
    line = cli_error(_main(SCRIPTS["bss-train"]), ["--config", "seed"], capsys)
    assert line == (
        "error: bss-train's TensorBoard logging (train.tensorboard=true; false turns it off) needs the 'search' "
        "extra (tensorboard not installed): pip install 'bss-search[search]'"
    )
    assert list(tmp_path.iterdir()) == []  # refused before the run folder
