"""The experiment folder: where it lives (local path or URI), the --resume checks, and the files between steps.

An experiment lives in one folder, ``<storage_path>/<name>/``:

    search_config.yaml   the resolved config (what --resume checks against)
    search/              the Tune experiment of the search (trials, checkpoints, TB events)
    search_summary.json  trial table and the chosen configuration, once the search ended
    retrain/             the Tune experiment of the retrain over seeds
    report.json, report.md, best_model.pt, *.png   the user's results

``tensorboard --logdir <storage_path>/<name>`` shows every trial and retrain seed. With URI
storage (s3://, gs://) Tune writes the two experiments there directly; the files the driver
writes go to a local mirror, ``results/<name>/``, and are uploaded.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import yaml

from bss_model.config import config_diff, describe_diff, read_text
from bss_model.errors import ConfigError
from bss_model.io import atomic_write_json, atomic_write_text
from search.config import SearchConfig, search_config_from_dict
from search.results import SearchSummary

log = logging.getLogger("bss")

CONFIG_FILE = "search_config.yaml"
SUMMARY_FILE = "search_summary.json"


def is_uri(path: str) -> bool:
    return "://" in path


def experiment_root(cfg: SearchConfig) -> str:
    """``storage_path/name`` with local paths made absolute (trials chdir into their own dirs)."""
    storage = cfg.tune.storage_path
    if is_uri(storage):
        return storage.rstrip("/") + "/" + cfg.tune.name
    return str(Path(storage).expanduser().resolve() / cfg.tune.name)


def root_of(folder: str) -> str:
    """An experiment folder named on the command line, as an experiment root."""
    return folder if is_uri(folder) else str(Path(folder).expanduser().resolve())


def tune_path(root: str, phase: str) -> str:
    """The Tune experiment of one phase (``search`` or ``retrain``)."""
    return f"{root.rstrip('/')}/{phase}"


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
    atomic_write_text(out / CONFIG_FILE, text)
    upload(root, out, [CONFIG_FILE])


def load_saved_config(root: str) -> SearchConfig | None:
    path = local_dir(root) / CONFIG_FILE
    if not path.exists():
        return None
    fix = f"restore it from a copy, or start a new experiment with --name NEW (the experiment is at {root})"
    try:
        data = yaml.safe_load(read_text(path, "experiment file", fix))
    except yaml.YAMLError as exc:
        raise ConfigError(f"experiment file {path} is damaged (not valid YAML: {type(exc).__name__}): {fix}") from None
    try:
        return search_config_from_dict(data if isinstance(data, dict) else {})
    except ConfigError as exc:
        raise ConfigError(f"experiment file {path} does not hold a valid search config ({exc}): {fix}") from None


def save_summary(root: str, summary: SearchSummary) -> None:
    out = local_dir(root)
    atomic_write_json(out / SUMMARY_FILE, summary.to_dict())
    upload(root, out, [SUMMARY_FILE])


def load_summary(root: str) -> SearchSummary | None:
    """The finished search's summary; None while the search has not finished."""
    path = local_dir(root) / SUMMARY_FILE
    if not path.exists():
        return None
    try:
        return SearchSummary.from_dict(json.loads(read_text(path, "experiment file", "restore it from a copy")))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        # Damaged (a truncated copy, an edit): the trials are still in search/, so rerunning the summary is safe.
        raise ConfigError(
            f"experiment file {path} is damaged ({type(exc).__name__}: {exc}): delete it and rerun with --resume "
            "to rebuild it from the search's trials, or restore it from a copy"
        ) from None


# What a run leaves once it has started a trial: any of these means the name is taken.
RESULT_FILES = (SUMMARY_FILE, "report.json", "best_model.pt")


def _tune_entries(path: str) -> list[str]:
    """The names in a Tune experiment folder (local or URI); empty if it does not exist."""
    if not is_uri(path):
        return [p.name + ("/" if p.is_dir() else "") for p in Path(path).iterdir()] if Path(path).is_dir() else []
    import pyarrow.fs

    fs, base = pyarrow.fs.FileSystem.from_uri(path)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(base, allow_not_found=True))
    return [info.base_name + ("/" if info.type == pyarrow.fs.FileType.Directory else "") for info in infos]


def has_started(root: str) -> bool:
    """Whether a run of this experiment got as far as Tune: a trial folder, a saved Tune state, or results.

    A run that failed before that (an ImportError at start-up, Ray failing to start) leaves at most
    its config, its log and Tune's tuner.pkl: nothing to resume and nothing to lose, so its name is
    free for the next run.
    """
    if any((local_dir(root) / name).exists() for name in RESULT_FILES):
        return True
    for phase in ("search", "retrain"):
        for name in _tune_entries(tune_path(root, phase)):
            if name.endswith("/") or (name.startswith("experiment_state") and name.endswith(".json")):
                return True
    return False


# Where the data lives (the files are checksummed, so the same data from another folder trains the same),
# and how much the console says.
DATA_KEYS = ("base.data.dir", "base.data.download", "tune.verbose")
# Never used by the search, only by the retrain's evaluation: changeable until the retrain finishes (a
# retrain that failed on one of them, e.g. an evaluation batch too large for the card, can be fixed).
EVAL_KEYS = ("base.eval.",)


def is_finished(root: str) -> bool:
    return (local_dir(root) / "report.json").exists()


def resume_changes(saved: SearchConfig, cfg: SearchConfig, root: str) -> dict[str, tuple[Any, Any]]:
    """The changes a ``--resume`` may make to the experiment's saved config (``{key: (saved, now)}``).

    Anything else is refused in one line naming each key with both values: the search (and a retrain
    under way) ran with it, and Tune restores its own experiment state, so a changed setting would be
    half applied or silently ignored. A finished experiment takes no change at all.
    """
    diff = config_diff(saved.to_dict(), cfg.to_dict())
    for key in ("tune.name", "tune.storage_path"):  # they name the experiment: equal by construction
        diff.pop(key, None)
    if not diff:
        return {}
    if is_finished(root):
        raise ConfigError(
            f"cannot --resume {root} with other settings ({describe_diff(diff, 'experiment', 'now')}): it is "
            "finished (report.json), so they would not apply; resume it with its own config, or start a new "
            "experiment with --name NEW"
        )
    retrain_started = bool(_tune_entries(tune_path(root, "retrain")))

    def allowed(key: str) -> bool:
        return key.startswith(DATA_KEYS + EVAL_KEYS) or (key.startswith("retrain.") and not retrain_started)

    refused = {k: v for k, v in diff.items() if not allowed(k)}
    if refused:
        later = "retrain.* (before the retrain starts), " if not retrain_started else ""
        raise ConfigError(
            f"cannot --resume {root} with other settings ({describe_diff(refused, 'experiment', 'now')}): the run so "
            f"far used the experiment's; only {later}base.eval.*, base.data.dir and tune.verbose may change on "
            "--resume. Resume "
            f"with its config ({local_dir(root) / CONFIG_FILE}) or start a new experiment with --name NEW"
        )
    return diff


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
        if saved is not None:
            resume_changes(saved, cfg, root)
    elif has_started(root):
        raise ConfigError(
            f"experiment {root} already exists: pass --resume to continue it, or choose another name with "
            f"--set tune.name=NEW (nothing was overwritten)"
        )
    elif exists:
        log.info("%s holds no trial (its run stopped before the first): starting the experiment there afresh", root)
    return root
