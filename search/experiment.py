"""Orchestration: storage, Ray, the search Tuner, best-trial selection and the seed retrain.

An experiment lives in one folder, ``<storage_path>/<name>/``:

    search_config.yaml   the resolved config (what --resume checks against)
    search/              the Tune experiment of the search (trials, checkpoints, TB events)
    search_summary.json  trial table and the chosen configuration, once the search ended
    retrain/             the Tune experiment of the retrain over seeds
    report.json, report.md, best_model.pt, *.png   the user's results

``tensorboard --logdir <storage_path>/<name>`` shows every trial and retrain seed.
"""

from __future__ import annotations

import logging
import math
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bss_model.config import Config
from bss_model.errors import BssError, ConfigError
from bss_model.io import atomic_write_text
from search.config import SearchConfig, search_config_from_dict, validate_space, with_overrides

log = logging.getLogger("bss")

METRIC, MODE = "val_mse", "min"
REFERENCE_TEST_MSE = 3.677e-4  # the Keras reference notebook, 10 draws x 20,000 test pairs


class Interrupted(BssError):
    """The run was stopped (Ctrl-C) with trials unfinished; it can be resumed."""

    exit_code = 130


# --------------------------------------------------------------------------------------
# Storage


def is_uri(path: str) -> bool:
    return "://" in path


def experiment_root(cfg: SearchConfig) -> str:
    """``storage_path/name`` with local paths made absolute (trials chdir into their own dirs)."""
    storage = cfg.tune.storage_path
    if is_uri(storage):
        return storage.rstrip("/") + "/" + cfg.tune.name
    return str(Path(storage).expanduser().resolve() / cfg.tune.name)


def check_writable(root: str) -> None:
    """Fail early, with the fix, if the storage cannot be written."""
    if is_uri(root):
        import pyarrow.fs

        try:
            fs, path = pyarrow.fs.FileSystem.from_uri(root)
            fs.create_dir(path, recursive=True)
        except Exception as exc:  # pyarrow raises many types for auth/network/scheme problems
            raise ConfigError(
                f"storage {root} cannot be written ({type(exc).__name__}: {exc}): check the URI and credentials,"
                " or set tune.storage_path to a writable folder"
            ) from None
        return
    path = Path(root)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-probe-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"storage_path {path.parent} cannot be written ({exc.strerror or exc}): "
            "set tune.storage_path (or --storage-path) to a writable folder"
        ) from None


def local_dir(root: str) -> Path:
    """Where reports are written: the experiment itself, or a local mirror for URI storage."""
    if is_uri(root):
        return Path("results").resolve() / root.rstrip("/").rsplit("/", 1)[-1]
    return Path(root)


def upload(root: str, local: Path, names: list[str]) -> None:
    """Copy report files up to URI storage (no-op for local storage)."""
    if not is_uri(root):
        return
    import pyarrow.fs

    fs, base = pyarrow.fs.FileSystem.from_uri(root)
    for name in names:
        if (local / name).exists():
            pyarrow.fs.copy_files(str(local / name), f"{base}/{name}", destination_filesystem=fs)


def save_resolved_config(cfg: SearchConfig, root: str) -> None:
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    out = local_dir(root)
    atomic_write_text(out / "search_config.yaml", text)
    upload(root, out, ["search_config.yaml"])


def load_saved_config(root: str) -> SearchConfig | None:
    path = local_dir(root) / "search_config.yaml"
    if not path.exists():
        return None
    return search_config_from_dict(yaml.safe_load(path.read_text()))


def prepare_experiment(cfg: SearchConfig, resume: bool) -> str:
    """Check the experiment folder against --resume; returns the experiment root."""
    root = experiment_root(cfg)
    check_writable(str(Path(root).parent) if not is_uri(root) else root)
    saved = load_saved_config(root)
    exists = saved is not None or (not is_uri(root) and Path(root, "search").exists())
    if resume:
        if not exists:
            raise ConfigError(
                f"cannot --resume: no experiment at {root}: drop --resume to start it, or fix tune.name/storage_path"
            )
        if saved is not None and (saved.space != cfg.space or saved.base != cfg.base):
            what = "search space" if saved.space != cfg.space else "base config"
            raise ConfigError(
                f"cannot --resume {root}: it was created with a different {what}; resume with the experiment's own "
                f"config ({local_dir(root) / 'search_config.yaml'}) or start a new experiment with another tune.name"
            )
    elif exists:
        raise ConfigError(
            f"experiment {root} already exists: pass --resume to continue it, or choose another name with "
            f"--set tune.name=NEW (nothing was overwritten)"
        )
    return root


# --------------------------------------------------------------------------------------
# Ray


def _check_reachable(address: str) -> None:
    """Fail in seconds, not minutes, when a ``host:port`` address has nobody listening."""
    target = address.split("://", 1)[-1]
    if target == "auto" or ":" not in target:
        return
    host, port = target.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=5):
            return
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"cannot reach the Ray cluster at {address} ({exc}): start it with `ray start --head` or fix "
            "--address / RAY_ADDRESS"
        ) from None


def init_ray(address: str | None) -> None:
    """Connect to ``address`` (or $RAY_ADDRESS), else start a local Ray with this machine's CPUs/GPUs."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        _check_reachable(address)
        import bss_model
        import search

        try:
            # Ship our two packages to the cluster so nodes need only the dependencies.
            ray.init(
                address=address,
                runtime_env={"py_modules": [bss_model, search]},
                logging_level=logging.WARNING,
            )
        except (ConnectionError, RuntimeError) as exc:
            raise ConfigError(f"cannot connect to the Ray cluster at {address} ({exc}): check --address") from None
        return
    import torch

    ray.init(
        # "local" always starts a new Ray: a bare ray.init() would silently attach to any Ray
        # already running on this machine (e.g. from `ray start`) and then refuse num_cpus.
        address="local",
        num_cpus=os.cpu_count(),
        num_gpus=torch.cuda.device_count(),
        include_dashboard=False,
        dashboard_host="127.0.0.1",  # never expose the dashboard beyond this machine by default
        logging_level=logging.WARNING,
    )


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0))


# --------------------------------------------------------------------------------------
# Tune pieces


def param_space(cfg: SearchConfig) -> dict[str, Any]:
    from ray import tune

    space = {}
    for key, (kind, args) in validate_space(cfg.base.to_dict(), cfg.space).items():
        if kind == "choice":
            space[key] = tune.choice(args)
        elif kind == "int":
            space[key] = tune.randint(args[0], args[1] + 1)  # Tune's upper bound is exclusive
        elif kind == "logint":
            space[key] = tune.lograndint(args[0], args[1] + 1)
        elif kind == "uniform":
            space[key] = tune.uniform(*args)
        else:
            space[key] = tune.loguniform(*args)
    return space


def _trainable(cfg: SearchConfig, base: Config, evaluate_test: bool) -> Any:
    from ray import tune

    from search.trainable import train_trial

    gpus = cfg.tune.gpus_per_trial if cluster_gpus() > 0 else 0.0
    if cfg.tune.gpus_per_trial and not gpus:
        log.warning("tune.gpus_per_trial=%s but the cluster has no GPU: trials run on CPU", cfg.tune.gpus_per_trial)
    fn = tune.with_parameters(train_trial, base=base.to_dict(), evaluate_test=evaluate_test)
    return tune.with_resources(fn, {"cpu": cfg.tune.cpus_per_trial, "gpu": gpus})


def _run_config(cfg: SearchConfig, root: str, name: str, callbacks: list[Any]) -> Any:
    from ray import tune

    storage = root if is_uri(root) else str(Path(root))
    return tune.RunConfig(
        name=name,
        storage_path=storage,
        failure_config=tune.FailureConfig(max_failures=cfg.tune.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=cfg.tune.checkpoints_to_keep),
        # Trials' own TensorBoard events and metrics live in their working dirs: sync them
        # to storage_path as artifacts so `tensorboard --logdir <experiment>` sees them.
        sync_config=tune.SyncConfig(sync_artifacts=True),
        verbose=cfg.tune.verbose,
        callbacks=callbacks,
    )


def _experiment_path(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}"


def _finish(results: Any, expected: int, what: str, resume_cmd: str) -> Any:
    """Raise Interrupted if Ctrl-C (or a lost driver) left trials unfinished."""
    from ray.tune import ExperimentAnalysis

    # Judge by the experiment state Tune saved, not by the in-memory Trial objects: on Ctrl-C
    # Tune saves the state (running trials RUNNING, which is what --resume restores) and *then*
    # stops the running trials, which marks them TERMINATED in memory as if they had finished.
    trials = ExperimentAnalysis(results.experiment_path, storage_filesystem=results.filesystem).trials
    unfinished = [t for t in trials if t.status not in ("TERMINATED", "ERROR")]
    if unfinished or len(trials) < expected:
        raise Interrupted(
            f"{what} interrupted with {len(trials) - len(unfinished)}/{expected} trials finished; "
            f"the state is saved: resume with `{resume_cmd}`"
        )
    return results


def run_search(cfg: SearchConfig, root: str, resume: bool, resume_cmd: str) -> Any:
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    trainable = _trainable(cfg, cfg.base, evaluate_test=False)
    path = _experiment_path(root, "search")
    if resume and tune.Tuner.can_restore(path):
        log.info("resuming the search at %s", path)
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
    else:
        sampler = optuna.samplers.TPESampler(seed=cfg.tune.seed, n_startup_trials=cfg.tune.n_startup_trials)
        searcher = OptunaSearch(sampler=sampler, points_to_evaluate=list(cfg.tune.points_to_evaluate) or None)
        scheduler = ASHAScheduler(
            time_attr="training_iteration",
            max_t=cfg.base.train.epochs,
            grace_period=min(cfg.tune.grace_period, cfg.base.train.epochs),
            reduction_factor=cfg.tune.reduction_factor,
        )
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(cfg),
            tune_config=tune.TuneConfig(
                metric=METRIC,
                mode=MODE,
                search_alg=searcher,
                scheduler=scheduler,
                num_samples=cfg.tune.num_samples,
                max_concurrent_trials=cfg.tune.max_concurrent,
            ),
            run_config=_run_config(cfg, root, "search", []),
        )
    results = tuner.fit()
    return _finish(results, cfg.tune.num_samples, "search", resume_cmd)


# --------------------------------------------------------------------------------------
# Selection


@dataclass
class TrialRow:
    trial_id: str
    number: int  # the order Tune created the trial in (its folder's train_trial_<id>_<number>_...)
    params: dict[str, Any]
    epochs: int
    val_mse: float
    status: str  # completed | stopped (ASHA) | diverged | errored
    error: str
    node: str
    path: str

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def trial_number(path: str) -> int:
    """Tune names trial folders ``<trainable>_<id>_<number>_<params>_<date>``; -1 if not."""
    match = re.match(r"^.+?_[0-9a-f]{5,}_(\d+)(_|$)", Path(path).name)
    return int(match.group(1)) if match else -1


def summarize_trials(results: Any, budget: int) -> list[TrialRow]:
    rows = []
    for r in results:
        m = r.metrics or {}
        epochs = int(m.get("epoch", 0) or 0)
        val = m.get(METRIC)
        val = float(val) if isinstance(val, (int, float)) else math.nan
        if m.get("diverged"):
            status = "diverged"
        elif r.error is not None:
            status = "errored"
        elif epochs >= budget and math.isfinite(val):
            status = "completed"
        else:
            status = "stopped"
        error = m.get("reason") or (str(r.error).strip().splitlines()[-1] if r.error is not None else "")
        params = {k: v for k, v in (r.config or {}).items()}
        rows.append(
            TrialRow(
                trial_id=str(m.get("trial_id", "")) or Path(r.path).name,
                number=trial_number(r.path),
                params=params,
                epochs=epochs,
                val_mse=val,
                status=status,
                error=error,
                node=str(m.get("hostname", "")) + (f":{m['node_id'][:8]}" if m.get("node_id") else ""),
                path=str(r.path),
            )
        )
    return rows


def pick_best(rows: list[TrialRow]) -> TrialRow:
    """The winner: lowest validation MSE among trials that ran their full budget."""
    full = [r for r in rows if r.status == "completed"]
    if not full:
        raise BssError(
            "no trial ran its full budget without error, so there is no best configuration: see the trial "
            "errors in the search/ folder, then raise tune.num_samples or loosen the space"
        )
    return min(full, key=lambda r: r.val_mse)


def search_summary(cfg: SearchConfig, rows: list[TrialRow], wall_s: float) -> dict[str, Any]:
    best = pick_best(rows)
    best_cfg = with_overrides(cfg.base.to_dict(), best.params)
    return {
        "best_trial": best.trial_id,
        "best_params": best.params,
        "best_val_mse": best.val_mse,
        "best_config": best_cfg.to_dict(),
        "num_trials": len(rows),
        "num_completed": sum(r.status == "completed" for r in rows),
        "num_stopped_early": sum(r.status == "stopped" for r in rows),
        "num_errored": sum(r.status in ("errored", "diverged") for r in rows),
        "num_diverged": sum(r.status == "diverged" for r in rows),
        "search_wall_s": wall_s,
        "trials": [r.as_dict() for r in sorted(rows, key=lambda r: (r.status != "completed", _nan_last(r.val_mse)))],
    }


def _nan_last(v: float) -> float:
    return v if math.isfinite(v) else math.inf


# --------------------------------------------------------------------------------------
# Retrain


class RetrainProgress:
    """A Tune callback printing one progress line per retrain epoch."""

    def __new__(cls, seeds: int, epochs: int) -> Any:
        from ray.tune import Callback

        class _Progress(Callback):
            def __init__(self) -> None:
                self.done: set[str] = set()

            def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
                seed = trial.config.get("train.seed")
                line = (
                    f"retrain seed {seed}: epoch {result.get('epoch')}/{epochs} val {result.get(METRIC, math.nan):.3e}"
                )
                if "test_mse_mean" in result:
                    line += f" test {result['test_mse_mean']:.3e}"
                print(f"{line}  [{len(self.done)}/{seeds} seeds done]", flush=True)

            def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
                self.done.add(trial.trial_id)
                print(f"retrain seed {trial.config.get('train.seed')} finished [{len(self.done)}/{seeds} seeds done]",
                      flush=True)  # fmt: skip

        return _Progress()


def run_retrain(cfg: SearchConfig, best_cfg: Config, root: str, resume_cmd: str) -> Any:
    from ray import tune

    seeds = cfg.retrain.seed_list
    trainable = _trainable(cfg, best_cfg, evaluate_test=True)
    path = _experiment_path(root, "retrain")
    if tune.Tuner.can_restore(path):
        log.info("resuming the retrain at %s", path)
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"train.seed": tune.grid_search(seeds)},
            tune_config=tune.TuneConfig(
                metric=METRIC,
                mode=MODE,
                num_samples=1,
                max_concurrent_trials=cfg.retrain.max_concurrent or cfg.tune.max_concurrent,
            ),
            run_config=_run_config(cfg, root, "retrain", [RetrainProgress(len(seeds), best_cfg.train.epochs)]),
        )
    t0 = time.time()
    results = tuner.fit()
    log.info("retrain finished in %.0f s", time.time() - t0)
    return _finish(results, len(seeds), "retrain", resume_cmd)


def summarize_retrain(results: Any) -> list[dict[str, Any]]:
    rows = []
    for r in results:
        m = r.metrics or {}
        rows.append(
            {
                "seed": (r.config or {}).get("train.seed"),
                "val_mse": m.get(METRIC),
                "test_mse_mean": m.get("test_mse_mean"),
                "metrics": {k: v for k, v in m.items() if k.startswith(("test_", "baseline_", "protocol_"))},
                "checkpoint": r.checkpoint.path if r.checkpoint else None,
                "error": str(r.error).strip().splitlines()[-1] if r.error is not None else "",
                "path": str(r.path),
            }
        )
    return sorted(rows, key=lambda row: row["seed"])
