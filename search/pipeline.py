"""The driver: search -> retrain the best over seeds -> report, as ``search/run.py`` and ``search/retrain.py`` run it.

    search_retrain_report   the main job (run.py): every step, resuming whichever it finds unfinished
    retrain_report          the retrain and report alone (retrain.py), after a search or for a named config

Everything the user can get wrong (config, data, storage, the Ray address) is checked
before Ray starts, so bad input costs seconds and leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any

import ray
import yaml

from bss_model.config import Config, describe_diff, load_config
from bss_model.errors import ConfigError
from bss_model.io import atomic_write_json, atomic_write_text, log_file
from search import best_model, figures, lock, objectives, pareto_report, report, selection, storage, study, tuners
from search.budgeted import Budgeted, eval_workers, local_cpus
from search.cluster import check_local_run, cluster_gpus, init_ray, local_gpus
from search.config import SearchConfig, TuneSection, with_overrides
from search.console import where_lines
from search.results import Evaluation, SearchSummary, SeedResult, TrialRow
from search.tunefiles import check_resumable

EVALUATION_FILE = "evaluation.json"

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


def best_config(cfg: SearchConfig, summary: SearchSummary, planned: dict[str, Any] | None = None) -> Config:
    """What the retrain trains: the base config with the winner's params (the trial ``retrain.pick`` names: the
    best by default), then the retrain's sample budget (``retrain.epochs`` x ``retrain.samples_per_epoch``,
    whatever the winner's batch size), then its overrides; under a budget, the planned budget keys last
    (search/budgeted.py: each seed's time limit and samples)."""
    params = summary.best_params
    if cfg.retrain.pick != "best":
        params = objectives.choose(summary, objectives.parse_pick(cfg.retrain.pick)).row.params
    return with_overrides(cfg.base.to_dict(), {**params, **cfg.retrain.params(), **(planned or {})})


def search_step(
    cfg: SearchConfig, root: str, resume: bool, resume_cmd: str, t0: float, job: Budgeted | None = None
) -> SearchSummary:
    """Run (or resume) the search and write search_summary.json -- or read it if the search had finished.
    ``job``: a budget's plan, which time-boxes the trials and ends the search on time."""
    summary = storage.load_summary(root)
    if summary is not None:
        log.info("search already finished (%d trials): going on to the retrain", len(summary.trials))
        return summary
    kwargs = None
    if job is not None:
        cfg = job.search_config(cfg)
        _, deadline = job.search_clock()
        kwargs = {"deadline": deadline, "splits": job.splits}
    with job.ledger.ticking() if job else contextlib.nullcontext():
        results = tuners.run_search(cfg, root, resume, resume_cmd, kwargs)
    rows = selection.summarize_trials(results, cfg.base.train.epochs)
    summary = selection.search_summary(cfg.base, rows, time.time() - t0)
    if objectives.cost_of(cfg.tune.objectives):  # a two-objective search: its costs and its front
        summary.pareto = objectives.summarize_pareto(cfg.tune.objectives, cfg.base.to_dict(), rows, list(results))
    # Before the summary: a kill in between reruns this step on --resume, and the study adds no trial twice.
    study.record_results(
        root, cfg.tune.name, cfg.dimensions(), results, cfg.base.train.epochs, cfg.tune.study_storage,
        cfg.tune.objectives,
    )  # fmt: skip
    storage.save_summary(root, summary)
    if job is not None:
        job.search_done(summary)
    s = summary.to_dict()
    log.info(
        "search done: %d trials, %d full budget, %d stopped early, %d cut by the deadline, %d errored; best val "
        "MSE %.3e (%s)",
        s["num_trials"], s["num_completed"], s["num_stopped_early"], s["num_cut"], s["num_errored"],
        s["best_val_mse"], s["best_params"],
    )  # fmt: skip
    return summary


def evaluation_resources(cfg: SearchConfig) -> tuple[int, float]:
    """The evaluation runs alone after the retrain: one task on a whole GPU where the cluster has one, else
    one single-threaded task per CPU of the cluster (at most one per draw): ``(tasks, gpus per task)``."""
    if cluster_gpus():
        return 1, 1.0
    return eval_workers(cfg, ray.cluster_resources().get("CPU", 1), 0), 0.0


def evaluation_step(
    cfg: SearchConfig, root: str, seeds: list[SeedResult], device: str, resume_cmd: str = ""
) -> Evaluation:
    """The protocol for every finished seed and their ensemble in one Ray task, once: ``evaluation.json`` keeps
    it, so a --resume after a later failure does not run it again (an evaluation setting changed on
    --resume runs it again: the file records the settings it was run with)."""
    eval_settings = dataclasses.asdict(cfg.base.eval)
    members = [s.seed for s in best_model.ensemble_members(seeds)]
    saved = storage.load_json(root, EVALUATION_FILE)
    if saved and saved.get("eval") == eval_settings and saved.get("members") == members:
        return Evaluation.from_dict(saved["evaluation"])
    workers, gpus = evaluation_resources(cfg)
    t0 = time.time()
    try:
        evaluation = best_model.evaluation_task(seeds, eval_settings, device, workers, gpus)
    except best_model.EvaluationFailed as exc:
        raise best_model.EvaluationFailed(
            f"the evaluation of the retrained seeds failed ({exc}); their checkpoints are kept: fix the cause (an "
            f"evaluation setting, base.eval.*, may change) and resume with `{resume_cmd}`"
        ) from None
    e = cfg.base.eval
    scores = ", ".join(f"seed {seed} {m['test_mse_mean']:.3e}" for seed, m in sorted(evaluation.seeds.items()))
    ensemble = f"; ensemble {evaluation.ensemble.test_mse:.3e}" if evaluation.ensemble else ""
    print(f"evaluation ({e.draws} x {e.pairs:,} test pairs, {time.time() - t0:.0f} s): {scores}{ensemble}", flush=True)
    out = storage.local_dir(root)
    atomic_write_json(out / EVALUATION_FILE, {"eval": eval_settings, "members": members,
                                              "evaluation": evaluation.to_dict()})  # fmt: skip
    storage.upload(root, out, [EVALUATION_FILE])
    return evaluation


def retrain_step(
    cfg: SearchConfig,
    best_cfg: Config,
    root: str,
    summary: SearchSummary | None,
    resume_cmd: str,
    t0: float,
    job: Budgeted | None = None,
    out: Path | None = None,
) -> dict[str, Any]:
    """Retrain ``best_cfg`` over the configured seeds, evaluate them and their ensemble, export the best seed,
    then write the report (into ``out``, default the experiment's folder; a second pick's retrain has its own,
    ``picks/<pick>``, and its own evaluation.json). ``job``: a budget's plan (the retrain's clock, the phases'
    accounting)."""
    out = out or storage.local_dir(root)
    picked = None
    if summary is not None and summary.pareto is not None:  # which point of the front, and why
        picked = objectives.choose(summary, objectives.parse_pick(cfg.retrain.pick)).to_dict()
    kwargs = None
    if job is not None:
        job.retrain_clock()
        kwargs = {"splits": job.splits}
    with job.ledger.ticking() if job else contextlib.nullcontext():
        results = tuners.run_retrain(cfg, best_cfg, root, resume_cmd, kwargs)
    seeds = selection.summarize_retrain(results)
    if job is not None:
        job.ledger.end("retrain", samples=sum(s.samples or 0 for s in seeds), seeds=len(seeds))
        job.ledger.begin("eval", job.plan.eval_s)
    # The protocol: every finished seed alone and their ensemble (averaged predictions), on the same draws.
    evaluation = evaluation_step(cfg, root, seeds, best_cfg.train.device, resume_cmd)
    retrain = selection.retrain_summary(evaluation.apply(seeds))
    retrain.ensemble = evaluation.ensemble
    if job is not None:
        pairs = cfg.base.eval.draws * cfg.base.eval.pairs
        job.ledger.end("eval", pairs=pairs * len(evaluation.seeds))
        job.ledger.begin("report", job.plan.report_s)
    lock.check(root)  # deleted or taken over meanwhile: write no report into a folder that lost its experiment
    best_model.export_best_model(retrain.best, out / best_model.FILENAME)
    separations = best_model.predict_separations(out / best_model.FILENAME, cfg.retrain.images, best_cfg.data.dir)
    result = report.write_report(
        out, summary, retrain, best_cfg.to_dict(), cfg.dimensions(), separations, time.time() - t0,
        budget=job.report() if job else None, pick=picked,
    )  # fmt: skip
    pictures = [*figures.PICTURES.values(), *pareto_report.PICTURES.values()]
    storage.upload(root, out, ["report.json", "report.md", best_model.FILENAME, *pictures])
    if job is not None:
        job.ledger.end("report")
    print(f"report: {out / 'report.md'}")
    print_result(result)
    if job is not None:
        print(job.summary_line(), flush=True)
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
    cfg: SearchConfig,
    resume: bool,
    address: str | None,
    data_dir: str | None,
    resume_cmd: str,
    started_at: float | None = None,
) -> dict[str, Any]:
    """The main job. ``resume_cmd`` is what the console tells the user to run after an interruption;
    ``started_at``: when the command started (``time.time()``), from which a budget counts."""
    t0 = time.time()
    started_at = started_at or t0
    check_local_gpus(cfg, address)
    if not on_cluster(address):  # on a cluster, the nodes: cluster.warn_unschedulable, and each trial
        retrain_cfg = with_overrides(cfg.base.to_dict(), cfg.retrain.params())
        check_local_run(cfg.tune.cpus_per_trial, cfg.tune.gpus_per_trial,
                        {"base.": cfg.base, "retrain.overrides: ": retrain_cfg})  # fmt: skip
    resolve_data_dir(cfg.base, data_dir, on_cluster(address))
    check_data(cfg.base, address)
    root = storage.prepare_experiment(cfg, resume)
    saved = storage.load_saved_config(root) if resume else None
    if saved is not None and storage.is_finished(root):
        if address or os.environ.get("RAY_ADDRESS"):
            init_ray(address)  # an address the user gave is still checked, not silently ignored
        finished_experiment(root, saved)
        return {}
    if cfg.tune.study_storage:  # a shared database: it answers, and the study of this name is this experiment's
        study.claim_study(cfg.tune.study_storage, cfg.tune.name, root, resume, cfg.tune.objectives)
    if resume:
        storage.load_summary(root)  # a damaged summary is one line now, not after Ray has started
        # A driver on another machine (an empty mirror) goes on with the study in storage.
        storage.download(root, storage.local_dir(root), [study.STUDY_FILE], missing_only=True)
    changes = storage.resume_changes(saved, cfg, root) if saved is not None else {}
    cluster = on_cluster(address)
    job = None
    if cfg.budget and not cluster:
        # Measured and planned here, before Ray starts: a budget too small for the job is one line, and
        # nothing is written (search/budgeted.py).
        job = Budgeted.start(cfg, root, resume, started_at, local_cpus(), local_gpus(), remote=False)
    with log_file(storage.local_dir(root) / "search.log"):
        if changes:
            log.info("resuming with changed settings: %s", describe_diff(changes, "was", "now"))
        print("\n".join(where_lines(root, cfg.tune.name, cfg.tune.study_storage)), flush=True)
        ray_t0 = time.time()
        init_ray(address)
        if "gpu_ms" in cfg.tune.objectives:  # (asks the running Ray only when it matters)
            objectives.check_gpus_available(cfg.tune.objectives, cluster_gpus(), "the Ray cluster")
        if cfg.budget and cluster:  # the trials' hardware is the cluster's: probe it there, before any trial
            resources = ray.cluster_resources()
            job = Budgeted.start(cfg, root, resume, started_at, resources.get("CPU", 1), cluster_gpus(), remote=True)
        if job is not None:
            job.ray_started(time.time() - ray_t0)
            job.ledger.record("startup", job.plan.startup_s, time.time() - started_at)
            print(job.describe(), flush=True)
        if saved is None or changes:
            storage.save_resolved_config(cfg, root)
        summary = search_step(cfg, root, resume, resume_cmd, t0, job)
        planned = job.retrain_params(winner_of(summary), best_config(cfg, summary)) if job else None
        return retrain_step(cfg, best_config(cfg, summary, planned), root, summary, resume_cmd, t0, job)


def winner_of(summary: SearchSummary) -> TrialRow:
    return next(t for t in summary.trials if t.trial_id == summary.best_trial)


def check_local_gpus(cfg: SearchConfig, address: str | None) -> None:
    """gpu_ms on a local Ray needs a GPU on this machine: one line before Ray starts. (A cluster's GPUs are known
    once connected: search_retrain_report checks them then, before any trial.)"""
    if "gpu_ms" in cfg.tune.objectives and not on_cluster(address):
        import torch

        objectives.check_gpus_available(cfg.tune.objectives, torch.cuda.device_count(), "this machine")


def finished_search(folder: str) -> tuple[str, SearchConfig, SearchSummary]:
    """A finished search's root, saved config and summary, or one line saying what is missing."""
    root = storage.root_of(folder)
    storage.check_folder(root, "--experiment", "pass the folder of an experiment made by search/run.py")
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
    if not on_cluster(address):
        check_local_run(cfg.tune.cpus_per_trial, cfg.tune.gpus_per_trial, {"": best_cfg})
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
        saved = storage.load_json(root, EVALUATION_FILE)  # the seeds' test figures, which best_model.pt carries
        best = best_model.best_retrained(root, Evaluation.from_dict(saved["evaluation"]) if saved else None)
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
    if not on_cluster(address):
        check_local_run(cfg.tune.cpus_per_trial, cfg.tune.gpus_per_trial, {"": best_cfg})
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
