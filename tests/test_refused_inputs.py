"""Inputs that validation used to accept and the pipeline could not run (issue 21, items 3, 4 and 8).

Each case is refused in one line, before anything starts or is written, or accepted and then runnable:
thread counts and trial resources this machine cannot give, ASHA factors that never promote, devices it
lacks, floats that overflow the budget arithmetic, a mapping that replaced a whole section, space
dimensions and retrain overrides with no meaning there, duplicate choices and starting points, YAML that
repeats a key or expands without bound, a FIFO as a config, names and paths read as YAML, and
checkpoints with a damaged body. The CLI cases call the real entry points in-process with ``ray.init``
booby-trapped (``no_ray``), so "refused before Ray" is checked, not assumed.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from _searchutil import SMOKE, TINY, cli_error, sets, write_config

from bss_model.config import Config, ConfigError, load_config, with_overrides
from search.config import load_search_config

CPUS = len(os.sched_getaffinity(0))  # the CPUs this process may use
NO_CUDA = not torch.cuda.is_available()


def search_argv(tmp_path: Path, *extra: str) -> list[str]:
    return ["--config", SMOKE, "--storage-path", str(tmp_path / "store"), "--name", "exp", *sets(*TINY), *extra]


def refused_before_anything(main: Any, argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture) -> str:
    """The one error line of a search refused before Ray, leaving no experiment folder (the name stays free)."""
    line = cli_error(main, argv, capsys)
    assert not (tmp_path / "store" / "exp").exists(), "a refused search took the experiment's name"
    return line


# --------------------------------------------------------------------------------------
# Threads: at most the CPUs the process may use, checked where it runs


def test_usable_cpus_is_the_process_affinity() -> None:
    from bss_model.runtime import usable_cpus

    assert usable_cpus() == CPUS


def test_train_threads_beyond_the_cpus_are_refused_before_a_run_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """4,096 threads turned a 7 s run into minutes and loaded 2 cores to 2,500."""
    from bss_model import train as train_module

    monkeypatch.setattr(train_module, "train", lambda *a, **k: pytest.fail("training started"))
    line = cli_error(train_module.main, ["--out", str(tmp_path / "runs"), "--set", "train.threads=4096"], capsys)
    assert f"train.threads=4096 is more than the {CPUS} CPU(s) this process may use" in line, line
    assert "os.sched_getaffinity" in line and f"use {CPUS} or fewer" in line
    assert not (tmp_path / "runs").exists()


def test_search_threads_beyond_the_cpus_are_refused_before_ray(
    tmp_path: Path, no_ray: None, capsys: pytest.CaptureFixture
) -> None:
    from search.run import main

    line = refused_before_anything(main, search_argv(tmp_path, *sets("base.train.threads=4096")), tmp_path, capsys)
    assert "base.train.threads=4096 is more than the" in line, line
    over = "retrain.overrides={train.threads: 4096}"
    line = refused_before_anything(main, search_argv(tmp_path, *sets(over)), tmp_path, capsys)
    assert line.startswith("error: retrain.overrides: train.threads=4096 is more than"), line


def test_separate_threads_beyond_the_cpus_are_refused(capsys: pytest.CaptureFixture) -> None:
    """bss-separate --threads 100000 crashed torch: a segmentation fault, exit 139, no message."""
    from bss_model.separate import main

    line = cli_error(main, ["--checkpoint", "nowhere", "--demo", "1", "--threads", "100000"], capsys)
    assert f"--threads 100000 is more than the {CPUS} CPU(s) this process may use" in line, line


def test_a_trial_checks_the_threads_against_its_own_node() -> None:
    """On a cluster the driver cannot know the node: the trial refuses where it applies its settings."""
    from bss_model.runtime import Runtime, apply_torch_settings

    rt = Runtime(device=torch.device("cpu"), bf16=False, channels_last=False, compile=False)
    before = torch.get_num_threads()
    try:
        with pytest.raises(ConfigError, match=rf"train\.threads={CPUS + 1} is more than the {CPUS} CPU"):
            apply_torch_settings(rt, CPUS + 1)
        apply_torch_settings(rt, CPUS)
        assert torch.get_num_threads() == CPUS
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------------------
# Trial resources: refused on a local Ray, a warning naming the cluster's nodes on a cluster


def test_more_cpus_per_trial_than_the_machine_is_refused_and_leaves_the_name_free(
    tmp_path: Path, no_ray: None, capsys: pytest.CaptureFixture
) -> None:
    """It waited forever, and --resume then refused the fix because the name was taken."""
    from search.run import main

    line = refused_before_anything(main, search_argv(tmp_path, *sets("tune.cpus_per_trial=64")), tmp_path, capsys)
    assert f"tune.cpus_per_trial=64 is more than the {CPUS} CPU(s) this machine gives Ray" in line, line
    # Fixed, the same name starts (as far as Ray here).
    with pytest.raises(AssertionError, match="got as far as ray.init"):
        main(search_argv(tmp_path, *sets(f"tune.cpus_per_trial={CPUS}")))


def test_retrain_cpus_per_trial_flag_beyond_the_machine_is_refused(
    tmp_path: Path, no_ray: None, capsys: pytest.CaptureFixture
) -> None:
    from search.retrain import main

    config = tmp_path / "tiny.yaml"
    config.write_text("model: {variant: tiny}\n")
    argv = ["--config", str(config), "--storage-path", str(tmp_path / "store"), "--cpus-per-trial", "64"]
    line = cli_error(main, argv, capsys)
    assert "tune.cpus_per_trial=64 is more than the" in line, line
    assert not (tmp_path / "store" / "tiny-retrain").exists()


def test_more_gpus_per_trial_than_the_machine_has_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from search import cluster

    monkeypatch.setattr(cluster, "local_resources", lambda: (8, 1))
    with pytest.raises(ConfigError, match=r"tune\.gpus_per_trial=2 is more than this machine's 1 GPU"):
        cluster.check_local_run(1, 2, {})
    cluster.check_local_run(1, 0.25, {})  # a share of one GPU
    monkeypatch.setattr(cluster, "local_resources", lambda: (8, 0))
    cluster.check_local_run(1, 2, {})  # no GPU: trials run on CPU, so a laptop runs a GPU config


@pytest.mark.parametrize("key", ["cpus_per_trial", "gpus_per_trial"])
def test_resources_below_rays_unit_are_refused(key: str) -> None:
    """tune.cpus_per_trial=1e-300 passed, and every trial failed in Ray ("cannot go beyond 0.0001")."""
    for value in ("1e-300", "5e-5"):
        with pytest.raises(ConfigError, match=rf"tune\.{key}=.* out of range: .*Ray's smallest unit, 0\.0001"):
            load_search_config(SMOKE, [f"tune.{key}={value}"])
    assert getattr(load_search_config(SMOKE, [f"tune.{key}=0.0001"]).tune, key) == 0.0001


def test_a_trial_no_cluster_node_can_hold_is_a_warning_naming_the_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    from search import cluster

    nodes = [{"Alive": True, "Resources": {"CPU": 16.0, "GPU": 1.0}}, {"Alive": True, "Resources": {"CPU": 16.0}},
             {"Alive": False, "Resources": {"CPU": 128.0}}]  # fmt: skip
    line = cluster.unschedulable(nodes, 64, 0)
    assert "no node of the Ray cluster can hold one trial (tune.cpus_per_trial=64" in line, line
    assert "1 x 16 CPU/0 GPU, 1 x 16 CPU/1 GPU" in line and "128" not in line and "autoscaler" in line
    assert cluster.unschedulable(nodes, 16, 1) == "" and cluster.unschedulable(nodes, 8, 0) == ""
    assert "GPUs 2" in cluster.unschedulable(nodes, 1, 2)

    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("bss").addHandler(handler)
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    try:
        cluster.warn_unschedulable(64, 0)  # a warning, never an error: an autoscaler can add the node
    finally:
        logging.getLogger("bss").removeHandler(handler)
    assert seen == [line]


# --------------------------------------------------------------------------------------
# ASHA's reduction factor


@pytest.mark.parametrize("factor", ["1.000000000001", "1.5", "1.9"])
def test_a_reduction_factor_whose_rungs_come_within_an_epoch_is_refused(factor: str) -> None:
    """1.000000000001 built billions of rungs and never started a trial."""
    with pytest.raises(ConfigError, match=rf"tune\.reduction_factor={factor} is too close to 1: .*use 2 or more"):
        load_search_config(SMOKE, [f"tune.reduction_factor={factor}", "tune.grace_period=1"])


def test_reduction_factors_that_promote_are_accepted() -> None:
    from search.tuners import make_scheduler

    for factor, grace in ((2, 1), (3, 1), (1.5, 2), (1.25, 4)):  # rungs at least an epoch apart
        cfg = load_search_config(SMOKE, [f"tune.reduction_factor={factor}", f"tune.grace_period={grace}"])
        scheduler = make_scheduler(cfg.base.train.epochs, cfg.tune.grace_period, cfg.tune.reduction_factor)
        rungs = [milestone for milestone, _ in scheduler._brackets[0]._rungs]
        assert all(b - a >= 1 - 1e-9 for a, b in zip(sorted(rungs), sorted(rungs)[1:], strict=False)), rungs
    with pytest.raises(ConfigError, match=r"use 1\.34 or more"):
        load_search_config(SMOKE, ["tune.reduction_factor=1.3", "tune.grace_period=3"])


# --------------------------------------------------------------------------------------
# Devices and CUDA options the machine lacks


@pytest.mark.skipif(not NO_CUDA, reason="this machine has a CUDA GPU")
@pytest.mark.parametrize(
    ("item", "says"),
    [
        ("base.train.device=cuda", "base.train.device=cuda but no CUDA GPU is available"),
        ("base.train.cuda_graphs=on", "base.train.cuda_graphs=on needs a CUDA device"),
        ("retrain.overrides={train.device: cuda}", "retrain.overrides: train.device=cuda but no CUDA GPU"),
    ],
)
def test_a_device_this_machine_lacks_is_refused_before_ray(
    item: str, says: str, tmp_path: Path, no_ray: None, capsys: pytest.CaptureFixture
) -> None:
    from search.run import main

    line = refused_before_anything(main, search_argv(tmp_path, *sets(item)), tmp_path, capsys)
    assert says in line, line


@pytest.mark.skipif(not NO_CUDA, reason="this machine has a CUDA GPU")
def test_train_cuda_graphs_on_a_cpu_is_refused_before_a_run_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from bss_model.train import main

    line = cli_error(main, ["--out", str(tmp_path / "runs"), "--set", "train.cuda_graphs=on"], capsys)
    assert "train.cuda_graphs=on needs a CUDA device" in line
    assert not (tmp_path / "runs").exists(), "a refused run left a run folder"


# --------------------------------------------------------------------------------------
# Floats that overflow the budget arithmetic


def test_warmup_epochs_that_overflow_the_step_count_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """warmup_epochs=1e308: an OverflowError at the first step, in a trial and in bss-train."""
    from bss_model.train import main

    argv = ["--out", str(tmp_path / "runs"), *sets("model.variant=tiny", "train.schedule=cosine", "train.epochs=1",
            "train.samples_per_epoch=64", "data.val_pairs=10", "train.tensorboard=false", "train.threads=1",
            "train.warmup_epochs=1e308")]  # fmt: skip
    line = cli_error(main, argv, capsys)
    assert "train.warmup_epochs=1e+308 is out of range: expected a finite value in [0, 100,000]" in line, line
    with pytest.raises(ConfigError, match=r"^base\.train\.warmup_epochs=1e\+308 is out of range"):
        load_search_config(SMOKE, ["base.train.warmup_epochs=1e308"])


def test_every_float_key_at_an_extreme_is_refused_or_trains(data_dir: Path, tmp_path: Path) -> None:
    """The largest double, one past float32's largest and the smallest positive double, for every float key,
    with either optimizer: refused, or a step trains (a divergence is a result; an exception is not). Beside
    warmup_epochs=1e308 (an OverflowError), lr=3e38 and weight_decay=1e308 passed and crashed torch's Adam."""
    import typing

    from bss_model.config import TrainConfig
    from bss_model.data import load_splits
    from bss_model.train import train

    base = with_overrides(Config().to_dict(), {"model.variant": "tiny", "train.epochs": 1,
        "train.samples_per_epoch": 8, "train.batch_size": 8, "data.val_pairs": 8, "train.tensorboard": False,
        "train.threads": 1, "train.schedule": "cosine", "data.dir": str(data_dir), "train.device": "cpu"})  # fmt: skip
    splits = load_splits(base.data)
    floats = [f"train.{k}" for k, tp in typing.get_type_hints(TrainConfig).items() if tp is float]
    assert "train.warmup_epochs" in floats and len(floats) >= 10
    ran = 0
    for key in floats:
        for value in (1e308, 3.5e38, 5e-324):
            for optimizer in ("adam", "adamw") if key in ("train.lr", "train.weight_decay") else ("adam",):
                try:
                    cfg = with_overrides(base.to_dict(), {key: value, "train.optimizer": optimizer})
                except ConfigError:
                    continue
                result = train(cfg, out_dir=tmp_path / f"{key}-{value}-{optimizer}", splits=splits)
                assert result.status in ("completed", "diverged"), (key, value)
                ran += 1
    assert ran >= 15


# --------------------------------------------------------------------------------------
# A mapping set to a section merges into it, key by key


def test_a_mapping_set_to_a_section_merges_into_it() -> None:
    """--set 'base.train={lr: 2.0e-3}' replaced the smoke's train section: 120 epochs x 161,984 samples, plateau."""
    cfg = load_search_config(SMOKE, ["base.train={lr: 2.0e-3}"])
    t = cfg.base.train
    assert (t.lr, t.epochs, t.samples_per_epoch, t.schedule, t.warmup_epochs) == (2e-3, 4, 2560, "cosine", 0.5)
    cfg = load_search_config(SMOKE, ["base={train: {lr: 2.0e-3}, model: {filters: 12}}"])
    assert (cfg.base.train.lr, cfg.base.train.epochs, cfg.base.model.filters) == (2e-3, 4, 12)
    assert cfg.base.model.decoder_mult == 2, "the rest of the tiny variant stays"
    assert load_search_config(SMOKE, ["tune={num_samples: 3}"]).tune.max_concurrent == 2
    # A variant given through a mapping selects its preset, as model.variant=seed does.
    assert load_search_config(SMOKE, ["base.model={variant: seed}"]).base.model.decoder_convs == 4


def test_a_mapping_in_a_config_file_merges_too(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  epochs: 3\n  schedule: cosine\n")
    cfg = load_config(path, ["train={lr: 2.0e-3}"])
    assert (cfg.train.lr, cfg.train.epochs, cfg.train.schedule) == (2e-3, 3, "cosine")


def test_a_section_mapping_in_retrain_overrides_merges_into_the_best_config() -> None:
    from search.pipeline import best_config
    from search.results import SearchSummary

    cfg = load_search_config(SMOKE, ["retrain.overrides={train: {lr: 2.0e-3}}"])
    summary = SearchSummary("t", {"model.filters": 12}, 0.01, {}, 1.0, [])
    best = best_config(cfg, summary)
    assert (best.train.lr, best.train.epochs, best.train.samples_per_epoch) == (2e-3, 4, 2560)
    assert (best.train.schedule, best.model.filters) == ("cosine", 12)


# --------------------------------------------------------------------------------------
# Space dimensions and retrain overrides: only keys that mean something there


@pytest.mark.parametrize(
    ("item", "says"),
    [
        ("space.eval.pairs={int: [100, 3000]}", "space.eval.pairs cannot be a search dimension: the test protocol"),
        ("space.data.val_seed={int: [0, 5]}", "space.data.val_seed cannot be a search dimension: the data and"),
        ("space.data.dir={choice: [a, b]}", "space.data.dir cannot be a search dimension"),
        ("space.train.seed={int: [0, 5]}", "space.train.seed cannot be a search dimension: the retrain trains"),
        ("space.train.threads={choice: [1, 2]}", "space.train.threads cannot be a search dimension: a hardware"),
        ("space.train={choice: [{lr: 1.0e-3}]}", "space.train is a section, not a key"),
        ("retrain.overrides={data.dir: no-such-dir}", "retrain.overrides sets data.dir, which is the experiment's"),
        ("retrain.overrides={eval.pairs: 10}", "retrain.overrides sets eval.pairs, which is the experiment's test"),
        ("retrain.overrides={train: {seed: 3}}", "retrain.overrides sets train.seed, which the retrain sets itself"),
    ],
)
def test_keys_with_no_meaning_in_a_trial_or_the_retrain_are_refused(item: str, says: str) -> None:
    """space.eval.pairs made the winner's random pairs the retrain's test protocol; retrain.overrides
    data.dir passed validation and failed every retrain seed."""
    with pytest.raises(ConfigError) as info:
        load_search_config(SMOKE, [item])
    assert says in str(info.value) and "\n" not in str(info.value), info.value


def test_hyperparameters_stay_searchable_and_hardware_overrides_stay_retrainable() -> None:
    cfg = load_search_config(SMOKE, ["space.train.precision={choice: [fp32, bf16]}", "tune.points_to_evaluate=[]",
                                     "retrain.overrides={train.threads: 1, train.epochs: 2}"])  # fmt: skip
    assert "train.precision" in cfg.dimensions() and cfg.retrain.params()["train.epochs"] == 2


# --------------------------------------------------------------------------------------
# Choices and starting points


@pytest.mark.parametrize("choices", ["[8, 8, 4]", "[8, 4, 8.0]", "[tiny, seed, tiny]"])
def test_duplicate_choices_are_refused(choices: str) -> None:
    key = "model.variant" if "tiny" in choices else "model.filters"
    with pytest.raises(ConfigError, match=rf"space\.{key}\.choice lists .* twice"):
        load_search_config(SMOKE, [f"space.{key}={{choice: {choices}}}", "tune.points_to_evaluate=[]"])


def test_true_and_one_are_different_choices() -> None:
    from search.space import parse_dimension

    assert parse_dimension("x", {"choice": [1, True]}).args == [1, True]


def test_more_starting_points_than_trials_are_refused() -> None:
    point = "{model.filters: 8, model.bottleneck_convs: 1, model.decoder_convs: 1, train.lr: 1.0e-3}"
    with pytest.raises(ConfigError, match=r"has 2 starting points but tune\.num_samples=1, so 1 would never run"):
        load_search_config(SMOKE, ["tune.num_samples=1", f"tune.points_to_evaluate=[{point}, {point}]"])


def test_a_partial_starting_point_is_completed_from_its_own_config_and_ray_accepts_it() -> None:
    """A partial point passed validation and was a Ray ValueError traceback ("Dim of point ... do not match")."""
    from search.tuners import make_sampler, make_searcher

    cfg = load_search_config(SMOKE, ["tune.points_to_evaluate=[{train.lr: 2.0e-3}]"])
    point = cfg.tune.points_to_evaluate[0]
    # The tiny base's own values, in the space's order.
    assert point == {"model.filters": 8, "model.bottleneck_convs": 1, "model.decoder_convs": 1, "train.lr": 2e-3}
    assert list(point) == list(cfg.dimensions())
    searcher = make_searcher(make_sampler(0, 1), cfg.tune.points_to_evaluate, stopped_as_pruned=False)
    from search.space import param_space

    assert searcher.set_search_properties("val_mse", "min", param_space(cfg.dimensions()))
    assert searcher.suggest("t0") == point


def test_a_partial_starting_point_whose_base_value_is_outside_the_space_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"points_to_evaluate\[0\] leaves out model\.filters, and the value it "
                       r"would train with \(8, from the base\) is outside space\.model\.filters"):  # fmt: skip
        load_search_config(SMOKE, ["space.model.filters={choice: [4, 12]}", "tune.points_to_evaluate=[{}]"])


# --------------------------------------------------------------------------------------
# YAML: repeated keys, aliases, nesting


def test_a_repeated_key_is_refused_naming_it_and_both_lines(tmp_path: Path) -> None:
    text = Path(SMOKE).read_text() + "space:\n  train.lr: {loguniform: [1.0e-4, 1.0e-2]}\n"
    (tmp_path / "twice.yaml").write_text(text)
    first = text.splitlines().index("space:") + 1
    with pytest.raises(ConfigError) as info:
        load_search_config(tmp_path / "twice.yaml")
    assert f"repeats the key 'space' (lines {first} and {len(text.splitlines()) - 1}" in str(info.value), info.value
    (tmp_path / "nested.yaml").write_text("train:\n  lr: 1.0e-3\n  epochs: 3\n  lr: 2.0e-3\n")
    with pytest.raises(ConfigError, match=r"nested\.yaml repeats the key 'lr' \(lines 2 and 4"):
        load_config(tmp_path / "nested.yaml")
    with pytest.raises(ConfigError, match=r"--set train: the value repeats the key 'lr'"):
        load_config(None, ["train={lr: 1.0e-3, lr: 2.0e-3}"])


def test_keys_beside_a_yaml_merge_still_override_it(tmp_path: Path) -> None:
    (tmp_path / "merge.yaml").write_text("x: &d {epochs: 3, lr: 1.0e-3}\ntrain:\n  <<: *d\n  lr: 2.0e-3\n")
    from bss_model.config import read_yaml

    assert read_yaml(tmp_path / "merge.yaml")["train"] == {"epochs": 3, "lr": 2e-3}


def alias_bomb(levels: int) -> list[Any]:
    """Nested lists of 10, each level one shared object: yaml.safe_dump writes them as anchors and aliases."""
    bomb: list[Any] = ["x"] * 10
    for _ in range(levels - 1):
        bomb = [bomb] * 10
    return bomb


def test_an_alias_bomb_is_refused_in_one_short_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A 1.5 KB alias bomb in retrain.overrides gave an 8 MB "one-line" error; at 9 levels, a MemoryError."""
    from search.run import main

    # 6 levels: a million values in a file of a few hundred bytes (the old code printed an 8 MB line).
    path = write_config(tmp_path / "bomb.yaml", lambda c: c["retrain"].update(overrides={"train.lr": alias_bomb(6)}))
    assert path.stat().st_size < 2000 and "*id" in path.read_text()
    line = cli_error(main, ["--config", str(path)], capsys)
    assert "has aliases (*name) that expand to more than 10,000 values" in line and len(line) < 300, line[:300]
    value = yaml.safe_dump(alias_bomb(6), default_flow_style=True).strip()
    with pytest.raises(ConfigError, match=r"--set retrain\.overrides: the value has aliases .* more than 10,000"):
        load_search_config(SMOKE, [f"retrain.overrides={{train.lr: {value}}}"])
    # 9 levels, a billion values: the old code ran out of memory (so this comes last, after the 6 levels).
    path = write_config(tmp_path / "bomb9.yaml", lambda c: c["retrain"].update(overrides={"train.lr": alias_bomb(9)}))
    assert "expand to more than 10,000 values" in cli_error(main, ["--config", str(path)], capsys)


def test_an_error_line_is_cut_to_a_readable_length(capsys: pytest.CaptureFixture) -> None:
    from bss_model.errors import MAX_LINE, cli_entry

    @cli_entry
    def fails() -> None:
        raise ConfigError("x=" + "y" * 1_000_000 + " is wrong")

    with pytest.raises(SystemExit):
        fails()
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and len(line) <= MAX_LINE + 60 and line.endswith("more characters]"), line[-80:]


def test_deep_nesting_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """5,000 levels: a RecursionError traceback."""
    from bss_model.train import main

    path = tmp_path / "deep.yaml"
    path.write_text("train: {lr: " + "[" * 5000 + "]" * 5000 + "}\n")
    line = cli_error(main, ["--config", str(path), "--out", str(tmp_path / "runs")], capsys)
    assert "deep.yaml nests more than 100 levels deep (line 1)" in line, line
    with pytest.raises(ConfigError, match=r"--set train\.lr: the value nests more than 100 levels deep"):
        load_config(None, ["train.lr=" + "[" * 5000 + "]" * 5000])
    assert not (tmp_path / "runs").exists()


def test_an_alias_inside_its_own_anchor_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"uses the alias \*a inside its own anchor &a"):
        load_config(None, ["train=&a {lr: *a}"])


# --------------------------------------------------------------------------------------
# A FIFO or a device file as the config


def test_a_fifo_as_the_config_is_refused_without_opening_it(
    tmp_path: Path, no_ray: None, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It hung search/run.py and bss-train: opening a FIFO waits for a writer."""
    from bss_model.train import main as train_main
    from search.run import main as run_main

    monkeypatch.chdir(tmp_path)
    fifo = tmp_path / "config.yaml"
    os.mkfifo(fifo)

    def write() -> None:  # a writer for each command, so that code opening the FIFO fails this test, not hangs
        for _ in range(2):
            fifo.write_text("tune: {num_samples: 1}\n")

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        for main in (run_main, train_main):
            line = cli_error(main, ["--config", str(fifo), "--out" if main is train_main else "--name",
                                    str(tmp_path / "runs") if main is train_main else "x"], capsys)  # fmt: skip
            assert f"config file {fifo} is a FIFO (named pipe), not a regular file" in line, line
    finally:
        fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # let the writer finish, whoever read the FIFO
        writer.join(5)
        os.close(fd)
    assert not (tmp_path / "runs").exists()


def test_a_device_file_as_the_config_is_refused(
    capsys: pytest.CaptureFixture, no_ray: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from search.run import main

    monkeypatch.chdir(tmp_path)
    line = cli_error(main, ["--config", "/dev/null"], capsys)
    assert "config file /dev/null is a character device, not a regular file" in line, line


# --------------------------------------------------------------------------------------
# Names and paths are strings, never YAML


@pytest.fixture
def run_cfg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[Any]:
    """search/run.py's config, captured where the pipeline would start (nothing runs). In a folder of its own:
    the command makes its storage folder (`results/`, `runs #1/`) before the pipeline, relative to where it runs."""
    import search.pipeline

    monkeypatch.chdir(tmp_path)

    seen: list[Any] = []
    # search/run.py imports the pipeline when it runs (after its extra check): patch it where it is taken from.
    monkeypatch.setattr(search.pipeline, "search_retrain_report", lambda cfg, *args: seen.append(cfg))
    return seen


@pytest.mark.parametrize("name", ["2026-12-01", "exp #2", "null", "1e3", "[x]", "a: b", "yes"])
def test_name_is_taken_as_typed(name: str, run_cfg: list[Any], tmp_path: Path) -> None:
    """--name 2026-12-01 was a garbled type error (a date); --name 'exp #2' silently became results/exp."""
    from search.run import main

    assert main(["--config", SMOKE, "--name", name]) == 0
    assert run_cfg[-1].tune.name == name


def test_storage_path_is_taken_as_typed(run_cfg: list[Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """--storage-path '~' gave "tune.storage_path=None has the wrong type"."""
    from search import storage
    from search.run import main

    monkeypatch.setenv("HOME", str(tmp_path))
    assert main(["--config", SMOKE, "--storage-path", "~"]) == 0
    assert run_cfg[-1].tune.storage_path == "~"
    assert storage.experiment_root(run_cfg[-1]) == str(tmp_path / "smoke")
    assert main(["--config", SMOKE, "--storage-path", "runs #1"]) == 0
    assert run_cfg[-1].tune.storage_path == "runs #1"


def test_train_data_dir_is_taken_as_typed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bss_model import train as train_module

    seen: list[Config] = []

    def capture(cfg: Config, **kwargs: Any) -> Any:
        seen.append(cfg)
        raise KeyboardInterrupt  # stop here: cli_entry exits 130

    monkeypatch.setattr(train_module, "train", capture)
    with pytest.raises(SystemExit):
        train_module.main(["--out", str(tmp_path / "runs"), "--data-dir", str(tmp_path / "data #1")])
    assert seen[0].data.dir == str(tmp_path / "data #1")


def test_empty_names_and_paths_are_refused(
    tmp_path: Path, no_ray: None, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from search.retrain import main as retrain_main
    from search.run import main as run_main

    monkeypatch.chdir(tmp_path)
    assert "--name '' is empty" in cli_error(run_main, ["--config", SMOKE, "--name", ""], capsys)
    assert "--storage-path '' is empty" in cli_error(run_main, ["--config", SMOKE, "--storage-path", ""], capsys)
    # retrain.py --experiment '' was a TypeError traceback.
    assert "--experiment '' is empty: pass a finished search's folder" in cli_error(
        retrain_main, ["--experiment", ""], capsys
    )


def test_a_name_too_long_for_a_folder_is_one_line(tmp_path: Path, no_ray: None, capsys: pytest.CaptureFixture) -> None:
    """A 300-character --name: an OSError traceback (File name too long)."""
    from search.run import main

    argv = ["--config", SMOKE, "--storage-path", str(tmp_path), "--name", "a" * 300]
    line = cli_error(main, argv, capsys)
    assert line.startswith("error: --name 'aaaa") and "is 300 bytes long, and a folder name holds at most 255" in line
    assert not any(tmp_path.iterdir())


def test_an_experiment_path_that_is_a_file_is_one_line(
    tmp_path: Path, no_ray: None, capsys: pytest.CaptureFixture
) -> None:
    """results/<name> being a regular file: a traceback; retrain.py --experiment <a file> too."""
    from search.retrain import main as retrain_main
    from search.run import main as run_main

    (tmp_path / "exp").write_text("my notes")
    line = cli_error(run_main, ["--config", SMOKE, "--storage-path", str(tmp_path), "--name", "exp"], capsys)
    assert f"the experiment {tmp_path / 'exp'} is not a folder: move the file" in line, line
    line = cli_error(retrain_main, ["--experiment", str(tmp_path / "exp")], capsys)
    assert f"--experiment {tmp_path / 'exp'} is not a folder" in line, line
    assert (tmp_path / "exp").read_text() == "my notes"


def test_a_read_only_storage_path_is_reported_as_itself(no_ray: None, capsys: pytest.CaptureFixture) -> None:
    """It was reported as its parent folder (/proc as "/")."""
    from search.run import main

    line = cli_error(main, ["--config", SMOKE, "--storage-path", "/proc", "--name", "exp"], capsys)
    assert line.startswith("error: storage_path /proc cannot be written"), line


# --------------------------------------------------------------------------------------
# A search in which no trial finished names the cause


def rows(*errors: str) -> list[Any]:
    from search.results import COMPLETED, ERRORED, STOPPED, TrialRow

    status = {"": STOPPED, "ok": COMPLETED}
    return [TrialRow(f"t{i}", i, {}, 1, math.nan, status.get(e, ERRORED), "" if e == "ok" else e, "", "", None)
            for i, e in enumerate(errors)]  # fmt: skip


def test_trials_that_all_failed_the_same_way_name_the_cause() -> None:
    """Every case ended "raise tune.num_samples or loosen the space", which named no cause."""
    from bss_model.errors import BssError
    from search.selection import _last_line, pick_best

    error = "train.device=cuda but no CUDA GPU is available: use train.device=auto or cpu"
    ray_error = f"ray::ImplicitFunc.train() (pid=1)\n  File x.py, line 3\nbss_model.errors.ConfigError: {error}"
    assert _last_line(ray_error) == error
    with pytest.raises(BssError) as info:
        pick_best(rows(error, error, error))
    message = str(info.value)
    assert f"all 3 trials failed with the same error ({error}): fix that and run again" in message, message
    assert "num_samples" not in message
    with pytest.raises(BssError) as info:
        pick_best(rows("", error, "diverged"))
    message = str(info.value)
    assert "of 3 trials, 2 errored, 1 stopped" in message and "raise tune.num_samples" in message, message


# --------------------------------------------------------------------------------------
# Item 4: checkpoints that carry the format marker but have a damaged body


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """A real one-epoch run of the tiny U-Net (its checkpoint is what bss-train --resume reads)."""
    from bss_model.train import train

    out = tmp_path_factory.mktemp("run") / "000-tiny"
    cfg = load_config(None, ["model.variant=tiny", "train.epochs=2", "train.samples_per_epoch=64",
                             "train.threads=1", "data.val_pairs=10", "train.tensorboard=false", f"data.dir={data_dir}",
                             "eval.draws=1", "eval.pairs=100", "train.device=cpu"])  # fmt: skip
    train(cfg, out_dir=out)
    state = torch.load(out / "checkpoint" / "checkpoint.pt", weights_only=True)
    state["epoch"] = 1  # resumable: one epoch to go
    torch.save(state, out / "checkpoint" / "checkpoint.pt")
    return out


def damaged(run_dir: Path, tmp_path: Path, damage: str) -> Path:
    from bss_model.checkpoint import FORMAT

    state = torch.load(run_dir / "checkpoint" / "checkpoint.pt", weights_only=True)
    assert state["format"] == FORMAT
    if damage == "config-list":
        state["config"] = [1, 2]
    elif damage == "model-missing":
        del state["model"]
    elif damage == "model-tensor":
        state["model"] = torch.zeros(3)
    elif damage == "nan-weights":
        for key in ("model", "train_model"):
            if key in state:
                state[key] = {k: torch.full_like(v, math.nan) if v.is_floating_point() else v
                              for k, v in state[key].items()}  # fmt: skip
    elif damage == "optimizer-list":
        state["optimizer"] = [1]
    path = tmp_path / "ckpt" / "checkpoint" / "checkpoint.pt"
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    return path


DAMAGE_SAYS = {
    "config-list": "is damaged: its config is a list, not a mapping",
    "model-missing": "is damaged: its 'model' weights are missing",
    "model-tensor": "is damaged: its 'model' weights are a Tensor, not a mapping of names to tensors",
    "nan-weights": "holds non-finite weights (NaN or inf in ",
}


@pytest.mark.parametrize("damage", list(DAMAGE_SAYS))
@pytest.mark.parametrize("command", ["evaluate", "separate", "train-resume"])
def test_a_damaged_checkpoint_body_is_one_line_in_every_command(
    command: str, damage: str, run_dir: Path, tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    """Tracebacks in evaluate, separate and train --resume; NaN weights exited 0 printing a bare NaN (not JSON)."""
    from bss_model.evaluate import main as evaluate_main
    from bss_model.separate import main as separate_main
    from bss_model.train import main as train_main

    path = damaged(run_dir, tmp_path, damage)
    before = path.read_bytes()
    argv = {
        "evaluate": (evaluate_main, ["--checkpoint", str(path), "--data-dir", str(data_dir), "--device", "cpu"]),
        "separate": (
            separate_main,
            ["--checkpoint", str(path), "--demo", "1", "--data-dir", str(data_dir)]
            + ["--out", str(tmp_path / "out"), "--device", "cpu"],
        ),  # fmt: skip
        "train-resume": (train_main, ["--resume", str(path), "--set", "train.threads=1"]),
    }
    main, args = argv[command]
    line = cli_error(main, args, capsys)
    assert str(path) in line and DAMAGE_SAYS[damage] in line, line
    assert path.read_bytes() == before and not (tmp_path / "out").exists()


def test_a_damaged_training_state_is_one_line_on_resume(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from bss_model.train import main

    path = damaged(run_dir, tmp_path, "optimizer-list")
    line = cli_error(main, ["--resume", str(path), "--set", "train.threads=1"], capsys)
    assert f"{path} is damaged: its training state cannot be restored" in line, line


def test_overflowing_predictions_are_an_error_not_nan_in_the_json(
    run_dir: Path, tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    """Finite weights can still overflow: the protocol's result is checked before it is printed."""
    from bss_model.evaluate import main

    state = torch.load(run_dir / "checkpoint" / "checkpoint.pt", weights_only=True)
    state["model"] = {k: v * 1e30 if v.is_floating_point() else v for k, v in state["model"].items()}
    path = tmp_path / "huge.pt"
    torch.save(state, path)
    line = cli_error(main, ["--checkpoint", str(path), "--data-dir", str(data_dir), "--device", "cpu"], capsys)
    assert f"{path} predicts non-finite values (test_mse_mean=" in line, line
    assert capsys.readouterr().out == ""


def test_the_undamaged_checkpoint_still_evaluates_to_json(
    run_dir: Path, data_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    import json

    from bss_model.evaluate import main

    assert main(["--checkpoint", str(run_dir), "--data-dir", str(data_dir), "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert math.isfinite(result["test_mse_mean"]) and result["draws"] == 1


def test_every_yaml_config_of_the_repo_loads_with_the_strict_loader() -> None:
    """Repeated keys and aliases are refused: the shipped configs have neither."""
    from bss_model.config import load_yaml

    for path in sorted(Path(SMOKE).parent.glob("*.yaml")):
        assert load_yaml(path.read_text()) == yaml.safe_load(path.read_text()), path
