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

from bss_model.config import Config, describe_diff, load_config
from bss_model.errors import ConfigError
from bss_model.io import log_file
from search import best_model, figures, lock, report, selection, storage, study, tuners
from search.cluster import init_ray, trial_gpus
from search.config import SearchConfig, TuneSection, with_overrides
from search.console import where_lines
from search.results import SearchSummary, TrialRow
from search.tunefiles import check_resumable

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
    """What the retrain trains: the base config with the winner's params, then the retrain's sample budget
    (``retrain.epochs`` x ``retrain.samples_per_epoch``, whatever the winner's batch size), then its overrides."""
    return with_overrides(cfg.base.to_dict(), {**summary.best_params, **cfg.retrain.params()})


def search_step(cfg: SearchConfig, root: str, resume: bool, resume_cmd: str, t0: float) -> SearchSummary:
    """Run (or resume) the search and write search_summary.json -- or read it if the search had finished."""
    summary = storage.load_summary(root)
    if summary is not None:
        log.info("search already finished (%d trials): going on to the retrain", len(summary.trials))
        return summary
    results = tuners.run_search(cfg, root, resume, resume_cmd)
    rows = selection.summarize_trials(results, cfg.base.train.epochs)
    summary = selection.search_summary(cfg.base, rows, time.time() - t0)
    # Before the summary: a kill in between reruns this step on --resume, and the study adds no trial twice.
    study.record_results(root, cfg.tune.name, cfg.dimensions(), results, cfg.base.train.epochs)
    storage.save_summary(root, summary)
    s = summary.to_dict()
    log.info(
        "search done: %d trials, %d full budget, %d stopped early, %d errored; best val MSE %.3e (%s)",
        s["num_trials"], s["num_completed"], s["num_stopped_early"], s["num_errored"], s["best_val_mse"],
        s["best_params"],
    )  # fmt: skip
    return summary


def retrain_step(
    cfg: SearchConfig, best_cfg: Config, root: str, summary: SearchSummary | None, resume_cmd: str, t0: float
) -> dict[str, Any]:
    """Retrain ``best_cfg`` over the configured seeds, export the best seed, then write the report."""
    out = storage.local_dir(root)
    results = tuners.run_retrain(cfg, best_cfg, root, resume_cmd)
    retrain = selection.retrain_summary(selection.summarize_retrain(results))
    # The seed ensemble: every finished seed's final checkpoint, their predictions averaged, on the same draws.
    gpus = trial_gpus(cfg.tune.gpus_per_trial)
    retrain.ensemble = best_model.seed_ensemble(retrain.seeds, best_cfg.train.device, cfg.tune.cpus_per_trial, gpus)
    lock.check(root)  # deleted or taken over meanwhile: write no report into a folder that lost its experiment
    best_model.export_best_model(retrain.best, out / best_model.FILENAME)
    separations = best_model.predict_separations(out / best_model.FILENAME, cfg.retrain.images, best_cfg.data.dir)
    result = report.write_report(
        out, summary, retrain, best_cfg.to_dict(), cfg.dimensions(), separations, time.time() - t0
    )
    storage.upload(root, out, ["report.json", "report.md", best_model.FILENAME, *figures.PICTURES.values()])
    print(f"report: {out / 'report.md'}")
    print_result(result)
    return result


def print_result(result: dict[str, Any]) -> None:
    """The report's two headline figures, as the console shows them."""
    mean, std, n = result["test_mse_mean"], result["test_mse_std"], len(result["seeds"])
    print(f"test MSE {mean:.3e} ± {std:.1e}: single model, mean ± std over {n} seeds")
    if result["test_mse_ensemble"] is not None:
        print(
            f"test MSE {result['test_mse_ensemble']:.3e} ± {result['test_mse_ensemble_std']:.1e}: ensemble of "
            f"{len(result['ensemble_seeds'])} seeds (predictions averaged), ± std over the protocol's draws"
        )


def search_retrain_report(
    cfg: SearchConfig, resume: bool, address: str | None, data_dir: str | None, resume_cmd: str
) -> dict[str, Any]:
    """The main job. ``resume_cmd`` is what the console tells the user to run after an interruption."""
    t0 = time.time()
    resolve_data_dir(cfg.base, data_dir, on_cluster(address))
    check_data(cfg.base, address)
    root = storage.prepare_experiment(cfg, resume)
    saved = storage.load_saved_config(root) if resume else None
    if saved is not None and storage.is_finished(root):
        if address or os.environ.get("RAY_ADDRESS"):
            init_ray(address)  # an address the user gave is still checked, not silently ignored
        finished_experiment(root, saved)
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
        if saved is None or changes:
            storage.save_resolved_config(cfg, root)
        summary = search_step(cfg, root, resume, resume_cmd, t0)
        return retrain_step(cfg, best_config(cfg, summary), root, summary, resume_cmd, t0)


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
    if root is not None:  # a finished search's: its retrain continues with the seeds it began with
        check_retrain_seeds(root, cfg)
        if storage.is_finished(root):
            finished_experiment(root, storage.load_saved_config(root) or cfg)
            return {}
        check_resumable(root, "retrain")
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


def finished_experiment(root: str, cfg: SearchConfig) -> None:
    """A finished experiment is left as it is: nothing is rerun, and its report, figures and wall times stay as
    the run wrote them. What it lost that can be rebuilt exactly from what it holds is rebuilt, and said:

    - ``search_summary.json``, from report.json's trial table (the same rows, the same rule picks the same best,
      the search's own wall time): ``retrain.py --experiment`` needs it;
    - ``best_model.pt`` (missing or unreadable; a damaged one is kept as best_model.pt.damaged), re-exported
      from the retrain's checkpoint of the report's best seed, as the run exported it.
    """
    import json

    out = storage.local_dir(root)
    report_file = out / "report.json"  # is_finished brought it from storage
    result = json.loads(report_file.read_text())
    rebuilt = []
    if result.get("trials") and storage.load_summary(root) is None:
        rows = [TrialRow.from_dict(t) for t in result["trials"]]
        summary = selection.search_summary(cfg.base, rows, result["search_wall_s"])
        if summary.best_params != result["best_params"]:
            raise ConfigError(
                f"{root}: report.json does not match its own trials: restore search_summary.json from a copy"
            )
        storage.save_summary(root, summary)
        rebuilt.append(f"{storage.SUMMARY_FILE} (from report.json's trials)")
    model = out / best_model.FILENAME
    in_storage = best_model.FILENAME in storage.download(root, out, [best_model.FILENAME])  # the truth, not the mirror
    problem = best_model.unreadable(model) if in_storage else "missing"
    if problem:
        best = best_model.best_retrained(root)
        if best.seed != result["best_seed"]:
            raise ConfigError(
                f"{root}: {best_model.FILENAME} is {problem}, and the retrain's best seed ({best.seed}) is not the "
                f"report's ({result['best_seed']}): restore it from a copy"
            )
        if model.exists():
            os.replace(model, model.with_name(model.name + ".damaged"))
        best_model.export_best_model(best, model)
        storage.upload(root, out, [best_model.FILENAME])
        rebuilt.append(
            f"{best_model.FILENAME} ({problem}: re-exported from the retrain's checkpoint of seed {best.seed})"
        )
    done = "nothing was rerun or rewritten" + (f"; rebuilt {' and '.join(rebuilt)}" if rebuilt else "")
    print(f"experiment {root} is already finished: {done}; report: {out / 'report.md'}")
    print_result(result)


def check_retrain_seeds(root: str, cfg: SearchConfig) -> None:
    """``retrain.py --experiment --seeds N``: a retrain not yet started takes them (and the experiment's config
    records them); one that started is refused. Tune continues a retrain with the seeds it began with, so it
    could never count N finished, and printed the same resume command forever."""
    saved = storage.load_saved_config(root)
    if saved is None or saved.retrain.seed_list == cfg.retrain.seed_list:
        return
    began = storage.is_finished(root) or bool(storage._tune_entries(storage.tune_path(root, "retrain")))
    if not began:
        log.info("retrain.seeds: was %d, now %d (recorded in %s)", saved.retrain.seeds, cfg.retrain.seeds,
                 storage.CONFIG_FILE)  # fmt: skip
        saved.retrain.seeds = cfg.retrain.seeds
        storage.save_resolved_config(saved, root)
        return
    seeds, first = saved.retrain.seed_list, saved.retrain.first_seed
    local = storage.local_dir(root) / "retrain" / f"seed-{first}" / "config.yaml"
    config = local if local.is_file() and not storage.is_uri(root) else "<a config>"
    raise ConfigError(
        f"the retrain of {root} began with {len(seeds)} seed(s) ({', '.join(map(str, seeds))}): --seeds "
        f"{cfg.retrain.seeds} cannot change it (Tune continues a retrain with the seeds it began with); drop --seeds "
        f"to continue it, or retrain over {cfg.retrain.seeds} seeds as a new experiment: `python search/retrain.py "
        f"--config {config} --seeds {cfg.retrain.seeds} --name {cfg.tune.name}-{cfg.retrain.seeds}-seeds`"
    )
