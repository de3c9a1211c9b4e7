"""The driver: search -> retrain the best over seeds -> report, as ``search/run.py`` and ``search/retrain.py`` run it.

    search_retrain_report   the main job (run.py): every step, resuming whichever it finds unfinished
    retrain_report          the retrain and report alone (retrain.py), after a search or for a named config

Everything the user can get wrong (config, data, storage, the Ray address) is checked
before Ray starts, so bad input costs seconds and leaves nothing behind.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import yaml

from bss_model.config import Config, describe_diff, load_config
from bss_model.errors import ConfigError
from bss_model.io import atomic_write_text, log_file
from search import best_model, figures, objectives, pareto_report, report, selection, storage, study, tuners
from search.cluster import cluster_gpus, init_ray, trial_gpus
from search.config import SearchConfig, TuneSection, with_overrides
from search.console import where_lines
from search.results import SearchSummary

log = logging.getLogger("bss")


def resolve_data_dir(cfg: Config, flag: str | None, cluster: bool = False) -> None:
    """Make the data dir absolute before trials chdir into their own folders. (The entry points make
    $BSS_DATA_DIR itself absolute, for a local Ray's workers: search.console.entry_point.)

    On a ``cluster`` the driver's $BSS_DATA_DIR is its own machine's: it stays out of the config, so
    that each node's trials read their own $BSS_DATA_DIR (nodes share no disk).
    """
    if flag:
        cfg.data.dir = str(Path(flag).expanduser().resolve())
    elif cfg.data.dir:
        cfg.data.dir = str(Path(cfg.data.dir).expanduser().resolve())
    elif os.environ.get("BSS_DATA_DIR") and not cluster:
        cfg.data.dir = str(Path(os.environ["BSS_DATA_DIR"]).expanduser().resolve())


def on_cluster(address: str | None) -> bool:
    """Whether the run joins a Ray cluster (--address, or $RAY_ADDRESS as `ray job submit` sets it)."""
    return bool(address or os.environ.get("RAY_ADDRESS"))


def check_data(cfg: Config, address: str | None) -> None:
    """With a local Ray, verify every data file up front (seconds): a missing, truncated or corrupt
    file is then one clear error before Ray starts, not the same error in every trial. On a cluster
    the files live on the nodes, so the trials check them there."""
    if on_cluster(address):
        return
    from bss_model.data import DATASETS, load_dataset

    for dataset in DATASETS:
        load_dataset(dataset, cfg.data.dir or None, cfg.data.download)


def best_config(cfg: SearchConfig, summary: SearchSummary) -> Config:
    """What the retrain trains: the base config with the winner's params (the trial ``retrain.pick`` names: the
    best by default), then the retrain's sample budget (``retrain.epochs`` x ``retrain.samples_per_epoch``,
    whatever the winner's batch size), then its overrides."""
    params = summary.best_params
    if cfg.retrain.pick != "best":
        params = objectives.choose(summary, objectives.parse_pick(cfg.retrain.pick)).row.params
    return with_overrides(cfg.base.to_dict(), {**params, **cfg.retrain.params()})


def search_step(cfg: SearchConfig, root: str, resume: bool, resume_cmd: str, t0: float) -> SearchSummary:
    """Run (or resume) the search and write search_summary.json -- or read it if the search had finished."""
    summary = storage.load_summary(root)
    if summary is not None:
        log.info("search already finished (%d trials): going on to the retrain", len(summary.trials))
        return summary
    results = tuners.run_search(cfg, root, resume, resume_cmd)
    rows = selection.summarize_trials(results, cfg.base.train.epochs)
    summary = selection.search_summary(cfg.base, rows, time.time() - t0)
    if objectives.cost_of(cfg.tune.objectives):  # a two-objective search: its costs and its front
        summary.pareto = objectives.summarize_pareto(cfg.tune.objectives, cfg.base.to_dict(), rows, list(results))
    # Before the summary: a kill in between reruns this step on --resume, and the study adds no trial twice.
    study.record_results(root, cfg.tune.name, cfg.dimensions(), results, cfg.base.train.epochs, cfg.tune.objectives)
    storage.save_summary(root, summary)
    s = summary.to_dict()
    log.info(
        "search done: %d trials, %d full budget, %d stopped early, %d errored; best val MSE %.3e (%s)",
        s["num_trials"], s["num_completed"], s["num_stopped_early"], s["num_errored"], s["best_val_mse"],
        s["best_params"],
    )  # fmt: skip
    return summary


def retrain_step(
    cfg: SearchConfig,
    best_cfg: Config,
    root: str,
    summary: SearchSummary | None,
    resume_cmd: str,
    t0: float,
    out: Path | None = None,
) -> dict[str, Any]:
    """Retrain ``best_cfg`` over the configured seeds, export the best seed, then write the report (into ``out``,
    default the experiment's folder; a second pick's retrain has its own, ``picks/<pick>``)."""
    out = out or storage.local_dir(root)
    picked = None
    if summary is not None and summary.pareto is not None:  # which point of the front, and why
        picked = objectives.choose(summary, objectives.parse_pick(cfg.retrain.pick)).to_dict()
    results = tuners.run_retrain(cfg, best_cfg, root, resume_cmd)
    retrain = selection.retrain_summary(selection.summarize_retrain(results))
    # The seed ensemble: every finished seed's final checkpoint, their predictions averaged, on the same draws.
    gpus = trial_gpus(cfg.tune.gpus_per_trial)
    retrain.ensemble = best_model.seed_ensemble(retrain.seeds, best_cfg.train.device, cfg.tune.cpus_per_trial, gpus)
    best_model.export_best_model(retrain.best, out / best_model.FILENAME)
    separations = best_model.predict_separations(out / best_model.FILENAME, cfg.retrain.images, best_cfg.data.dir)
    result = report.write_report(
        out, summary, retrain, best_cfg.to_dict(), cfg.dimensions(), separations, time.time() - t0, pick=picked
    )
    pictures = [*figures.PICTURES.values(), *pareto_report.PICTURES.values()]
    storage.upload(root, out, ["report.json", "report.md", best_model.FILENAME, *pictures])
    print(f"report: {out / 'report.md'}")
    mean, std, n = result["test_mse_mean"], result["test_mse_std"], len(result["seeds"])
    print(f"test MSE {mean:.3e} ± {std:.1e}: single model, mean ± std over {n} seeds")
    if result["test_mse_ensemble"] is not None:
        print(
            f"test MSE {result['test_mse_ensemble']:.3e} ± {result['test_mse_ensemble_std']:.1e}: ensemble of "
            f"{len(result['ensemble_seeds'])} seeds (predictions averaged), ± std over the protocol's draws"
        )
    return result


def search_retrain_report(
    cfg: SearchConfig, resume: bool, address: str | None, data_dir: str | None, resume_cmd: str
) -> dict[str, Any]:
    """The main job. ``resume_cmd`` is what the console tells the user to run after an interruption."""
    t0 = time.time()
    check_local_gpus(cfg, address)
    resolve_data_dir(cfg.base, data_dir, on_cluster(address))
    check_data(cfg.base, address)
    root = storage.prepare_experiment(cfg, resume)
    saved = storage.load_saved_config(root) if resume else None
    if saved is not None and storage.is_finished(root):
        # Nothing to run: the report, figures and wall time stay as the finished run wrote them.
        if address or os.environ.get("RAY_ADDRESS"):
            init_ray(address)  # an address the user gave is still checked, not silently ignored
        print(f"experiment {root} is already finished: nothing was rerun or rewritten; report: "
              f"{storage.local_dir(root) / 'report.md'}")  # fmt: skip
        return {}
    if resume:
        storage.load_summary(root)  # a damaged summary is one line now, not after Ray has started
        # A driver on another machine (an empty mirror) goes on with the study in storage.
        storage.download(root, storage.local_dir(root), [study.STUDY_FILE], missing_only=True)
    with log_file(storage.local_dir(root) / "search.log"):
        changes = storage.resume_changes(saved, cfg, root) if saved is not None else {}
        if changes:
            log.info("resuming with changed settings: %s", describe_diff(changes, "was", "now"))
        print("\n".join(where_lines(root, cfg.tune.name)), flush=True)
        init_ray(address)
        objectives.check_gpus_available(cfg.tune.objectives, cluster_gpus(), "the Ray cluster")
        if saved is None or changes:
            storage.save_resolved_config(cfg, root)
        summary = search_step(cfg, root, resume, resume_cmd, t0)
        return retrain_step(cfg, best_config(cfg, summary), root, summary, resume_cmd, t0)


def check_local_gpus(cfg: SearchConfig, address: str | None) -> None:
    """gpu_ms on a local Ray needs a GPU on this machine: one line before Ray starts. (A cluster's GPUs are known
    once connected: search_retrain_report checks them then, before any trial.)"""
    if "gpu_ms" in cfg.tune.objectives and not on_cluster(address):
        import torch

        objectives.check_gpus_available(cfg.tune.objectives, torch.cuda.device_count(), "this machine")


def finished_search(folder: str) -> tuple[str, SearchConfig, SearchSummary]:
    """A finished search's root, saved config and summary, or one line saying what is missing."""
    root = storage.root_of(folder)
    if storage.is_uri(root):  # endpoint, bucket and credentials: one line now, not a traceback later
        storage.check_writable(root)
    cfg = storage.load_saved_config(root)
    if cfg is None:
        raise ConfigError(f"{root} has no search_config.yaml: pass the folder of an experiment made by search/run.py")
    summary = storage.load_summary(root)
    if summary is None:
        raise ConfigError(
            f"the search in {root} has not finished (no search_summary.json): finish it with "
            "`python search/run.py --config <its config> --resume`"
        )
    return root, cfg, summary


def named_config(path: str, sets: list[str], name: str | None, storage_path: str) -> SearchConfig:
    """A bss_model config to retrain directly, as a search config with no space."""
    base = load_config(path, sets)
    tune = TuneSection(name=name or Path(path).stem + "-retrain", storage_path=storage_path)
    return SearchConfig(base=base, space={}, tune=tune)


def retrain_report(
    cfg: SearchConfig,
    summary: SearchSummary | None,
    root: str | None,
    resume: bool,
    address: str | None,
    data_dir: str | None,
    resume_cmd: str,
) -> dict[str, Any]:
    """The retrain step alone: of a finished search (``summary`` and its ``root``), or of ``cfg.base``
    (no summary; ``root`` None: a new experiment folder is made, or continued with ``resume``)."""
    t0 = time.time()
    cfg.retrain.validate()
    cfg.tune.validate()
    best_cfg = best_config(cfg, summary) if summary is not None else cfg.base
    resolve_data_dir(best_cfg, data_dir, on_cluster(address))
    check_data(best_cfg, address)
    if root is None:
        root = storage.prepare_experiment(cfg, resume)
        storage.save_resolved_config(cfg, root)
    with log_file(storage.local_dir(root) / "retrain.log"):
        print("\n".join(where_lines(root, cfg.tune.name)), flush=True)
        init_ray(address)
        return retrain_step(cfg, best_cfg, root, summary, resume_cmd, t0)


PICKS = "picks"  # <experiment>/picks/<pick>/: the retrain of another point of the front


def pick_retrain_report(
    cfg: SearchConfig,
    summary: SearchSummary,
    root: str,
    pick_text: str,
    address: str | None,
    data_dir: str | None,
    resume_cmd: str,
) -> dict[str, Any]:
    """Retrain the point ``pick_text`` selects from a finished search, without rerunning the search.

    The experiment's own pick (``retrain.pick``) is its first retrain, continued as ``retrain_report`` does. Any
    other pick retrains into ``<experiment>/picks/<pick>/`` (its Tune experiment ``retrain/``, its report.json,
    report.md, best_model.pt and pictures, its resolved config): the first retrain's files, and the
    ``best_model.pt`` its report names, are never touched. A limit no full-budget trial meets is one line,
    before Ray starts.
    """
    pick = objectives.parse_pick(pick_text, "--pick")
    objectives.check_pick(pick, cfg.tune.objectives, "--pick")
    first = objectives.parse_pick(cfg.retrain.pick)
    if pick == first:
        return retrain_report(cfg, summary, root, False, address, data_dir, resume_cmd)
    chosen = objectives.choose(summary, pick)
    already = objectives.choose(summary, first)
    if chosen.row.trial_id == already.row.trial_id:
        print(f"--pick {pick.text} selects trial {chosen.row.trial_id}, the one the experiment's retrain "
              f"({first.text}) already trained: see {storage.local_dir(root) / 'report.md'}")  # fmt: skip
        return {}
    cfg.retrain.pick = pick.text
    cfg.retrain.validate()
    cfg.tune.validate()
    sub = f"{root.rstrip('/')}/{PICKS}/{pick.slug}"
    out = storage.local_dir(root) / PICKS / pick.slug
    best_cfg = best_config(cfg, summary)
    resolve_data_dir(best_cfg, data_dir, on_cluster(address))
    check_data(best_cfg, address)
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    # The resolved config of this retrain beside its results (the experiment's own stays as it was).
    atomic_write_text(out / storage.CONFIG_FILE, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    storage.upload(sub, out, [storage.CONFIG_FILE])
    with log_file(out / "retrain.log"):
        print(f"retraining trial {chosen.row.trial_id} ({pick.text}: {chosen.reason}) into {out}", flush=True)
        print("\n".join(where_lines(sub, cfg.tune.name)[:2]), flush=True)  # (the study is the experiment's)
        init_ray(address)
        return retrain_step(cfg, best_cfg, sub, summary, resume_cmd, t0, out=out)
