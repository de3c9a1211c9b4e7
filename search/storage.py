"""The experiment folder: where it lives (local path or URI), the --resume checks, and the files between steps.

An experiment lives in one folder, ``<storage_path>/<name>/``:

    search_config.yaml   the resolved config (what --resume checks against)
    search/              the Tune experiment of the search (trials, checkpoints, TB events)
    search_summary.json  trial table and the chosen configuration, once the search ended
    retrain/             the Tune experiment of the retrain over seeds
    report.json, report.md, best_model.pt, *.png   the user's results

``tensorboard --logdir <storage_path>/<name>`` shows every trial and retrain seed. With URI
storage (s3://, gs://) Tune writes the two experiments there directly; the files the driver
writes go to a local mirror, ``results/<name>/``, and are uploaded. The storage is the truth:
a run reads ``search_config.yaml`` and ``search_summary.json`` back from it (and ``optuna.db``
when the mirror has none), so a driver on another machine, with an empty mirror, resumes the
experiment as well as the one that started it.

S3 and S3-compatible stores (MinIO, SeaweedFS, Ceph) are configured the AWS way, through the
environment only: ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (or a profile, or an instance
role) and, for a store that is not AWS, ``AWS_ENDPOINT_URL`` (e.g. ``http://minio:9000``), which
pyarrow -- and so Ray -- reads like the AWS SDKs do.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import yaml

from bss_model.config import config_diff, describe_diff, read_text
from bss_model.errors import BssError, ConfigError
from bss_model.io import atomic_write_json, atomic_write_text
from search.config import SearchConfig, search_config_from_dict
from search.results import SearchSummary

log = logging.getLogger("bss")

CONFIG_FILE = "search_config.yaml"
SUMMARY_FILE = "search_summary.json"


class StorageUnavailable(BssError):
    """The experiment's storage stopped answering mid-run; what it holds is kept and a resume continues."""

    exit_code = 75  # EX_TEMPFAIL: try again later


# How pyarrow words a storage that does not answer (or refuses), in the errors of trials and of Tune.
STORAGE_FAILURES = ("AWS Error", "When testing for existence of bucket", "GCS Error", "Could not connect to server")


def storage_failure(text: str) -> bool:
    """Whether an error text (a trial's, or Tune's) says the storage failed, rather than the trial."""
    return any(k in text for k in STORAGE_FAILURES)


def storage_lost(root: str, what: str, exc: BaseException | str, resume_cmd: str) -> StorageUnavailable:
    text = " ".join(str(exc).split())
    return StorageUnavailable(
        f"the storage of {root} failed during the {what} ({text[:300]}): the trials' checkpoints and the state "
        f"saved before the failure are kept there; once the storage answers again, resume with `{resume_cmd}`"
    )


def is_uri(path: str) -> bool:
    return "://" in path


# pyarrow filesystems by type_name, and the scheme of their URIs.
_SCHEMES = {"s3": "s3", "gcs": "gs", "hdfs": "hdfs"}


def uri_of(path: str, filesystem: object | None) -> str:
    """A path that Ray gives with its filesystem (a Result's ``path``, a Checkpoint's ``path``) as a URI.

    Ray's paths on object storage lack their scheme (``bucket/key``); pyarrow, and a ``Checkpoint``
    built from one, would read that as a local path. Local paths are returned as they are.
    """
    scheme = _SCHEMES.get(getattr(filesystem, "type_name", "local"))
    if scheme is None or is_uri(path):
        return path
    return f"{scheme}://{path.lstrip('/')}"


def _storage_error(root: str, exc: Exception) -> ConfigError:
    """One line naming what is wrong with URI storage and the fix: endpoint, bucket or credentials."""
    text = " ".join(str(exc).split())
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
    bucket = root.split("://", 1)[1].split("/", 1)[0]
    at = f" at {endpoint}" if endpoint else ""
    if "NETWORK_CONNECTION" in text or "Could not connect" in text or "Could not resolve" in text:
        where = f"AWS_ENDPOINT_URL={endpoint}" if endpoint else "the default AWS endpoint"
        return ConfigError(
            f"storage {root} cannot be reached ({where}: {text}): start the S3 server, or set AWS_ENDPOINT_URL to "
            "its address (e.g. http://127.0.0.1:9000 for MinIO, :8333 for SeaweedFS; unset for AWS)"
        )
    if "not found" in text.lower() and "bucket" in text.lower() or "NoSuchBucket" in text:
        return ConfigError(
            f"storage {root}: bucket '{bucket}' does not exist{at}: create it (e.g. `aws s3 mb s3://{bucket}`) "
            "or fix --storage-path / tune.storage_path"
        )
    if any(k in text for k in ("ACCESS_DENIED", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                               "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "Forbidden", "403")):  # fmt: skip
        return ConfigError(
            f"storage {root}: access denied{at} ({text}): set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or "
            f"AWS_PROFILE) to credentials that may write bucket '{bucket}'"
        )
    return ConfigError(
        f"storage {root} cannot be written ({type(exc).__name__}: {text}): check the URI, AWS_ENDPOINT_URL and "
        "the AWS_* credentials, or set tune.storage_path to a writable folder"
    )


def _filesystem(uri: str, quick: bool = False) -> tuple[Any, str]:
    """pyarrow's filesystem and path for ``uri`` (every storage access here opens it this way); ``quick``: S3
    gives up after 2 attempts (a check, not a job)."""
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(uri)
    if quick and getattr(fs, "type_name", "") == "s3":
        # The same filesystem (from_uri resolved region, endpoint and credentials from the URI and AWS_*),
        # but with 2 attempts: an unreachable endpoint then fails in about a second, not ten.
        options = dict(fs.__reduce__()[1][0])
        fs = pyarrow.fs.S3FileSystem(**options, retry_strategy=pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=2))
    return fs, path


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
        try:
            fs, path = _filesystem(root, quick=True)
            fs.create_dir(path, recursive=True)
            probe = f"{path.rstrip('/')}/.write-probe-{os.getpid()}"
            with fs.open_output_stream(probe) as f:
                f.write(b"ok")
            fs.delete_file(probe)
        except Exception as exc:  # pyarrow raises many types for auth/network/scheme problems
            raise _storage_error(root, exc) from None
        return
    path = Path(root)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-probe-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        # The folder itself: prepare_experiment probes the storage path, not the experiment under it.
        raise ConfigError(
            f"storage_path {path} cannot be written ({exc.strerror or exc}): "
            "set tune.storage_path (or --storage-path) to a writable folder"
        ) from None


def check_folder(root: str, what: str, fix: str = "move the file, or choose another --name or --storage-path") -> None:
    """Refuse an experiment path that is a file (or below one): every write into it would fail later."""
    if is_uri(root):
        return
    for path in (Path(root), *Path(root).parents):
        if path.exists():
            if not path.is_dir():
                below = "" if path == Path(root) else f" ({path} is a file)"
                raise ConfigError(f"{what} {root} is not a folder{below}: {fix}")
            return


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

    fs, base = _filesystem(root)
    for name in names:
        if (local / name).exists():
            try:
                pyarrow.fs.copy_files(str(local / name), f"{base}/{name}", destination_filesystem=fs)
            except OSError as exc:
                raise StorageUnavailable(
                    f"could not upload {name} to {root} ({' '.join(str(exc).split())[:300]}): the file is in {local};"
                    " rerun the same command with --resume once the storage answers"
                ) from None


def download(root: str, local: Path, names: list[str], missing_only: bool = False) -> set[str]:
    """Copy files of URI storage into the local mirror; returns the names that storage has (for local
    storage: those the folder has). ``missing_only``: keep a file the mirror already has (one the
    driver writes locally and uploads later)."""
    if not is_uri(root):
        return {name for name in names if (local / name).exists()}
    import pyarrow.fs

    fs, base = _filesystem(root)
    found = set()
    for name in names:
        target = local / name
        if fs.get_file_info(f"{base}/{name}").type != pyarrow.fs.FileType.File:
            continue
        found.add(name)
        if missing_only and target.exists():
            continue
        local.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{name}.download")
        pyarrow.fs.copy_files(f"{base}/{name}", str(tmp), source_filesystem=fs)
        os.replace(tmp, target)
    return found


def save_resolved_config(cfg: SearchConfig, root: str) -> None:
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    out = local_dir(root)
    atomic_write_text(out / CONFIG_FILE, text)
    upload(root, out, [CONFIG_FILE])


def load_saved_config(root: str) -> SearchConfig | None:
    path = local_dir(root) / CONFIG_FILE
    if CONFIG_FILE not in download(root, path.parent, [CONFIG_FILE]):
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


def read_local_json(path: Path) -> Any:
    """A JSON file of the local mirror, or None if it does not exist."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def load_json(root: str, name: str) -> Any:
    """An experiment file as JSON, from storage (the mirror's copy for URI storage), or None if it has none;
    a damaged one is one line naming it."""
    path = local_dir(root) / name
    if name not in download(root, path.parent, [name]):
        return None
    try:
        return json.loads(read_text(path, "experiment file", "restore it from a copy"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"experiment file {path} is damaged ({exc}): restore it from a copy") from None


def save_summary(root: str, summary: SearchSummary) -> None:
    out = local_dir(root)
    atomic_write_json(out / SUMMARY_FILE, summary.to_dict())
    upload(root, out, [SUMMARY_FILE])


def load_summary(root: str) -> SearchSummary | None:
    """The finished search's summary; None while the search has not finished."""
    path = local_dir(root) / SUMMARY_FILE
    if SUMMARY_FILE not in download(root, path.parent, [SUMMARY_FILE]):  # storage, not the mirror, decides
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
    """The names in a folder of the experiment (local or URI), folders with a trailing /; empty if it does not exist."""
    if not is_uri(path):
        return [p.name + ("/" if p.is_dir() else "") for p in Path(path).iterdir()] if Path(path).is_dir() else []
    import pyarrow.fs

    fs, base = _filesystem(path)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(base, allow_not_found=True))
    return [info.base_name + ("/" if info.type == pyarrow.fs.FileType.Directory else "") for info in infos]


def has_started(root: str) -> bool:
    """Whether a run of this experiment got as far as Tune: a trial folder, a saved Tune state, or results.

    A run that failed before that (an ImportError at start-up, Ray failing to start) leaves at most
    its config, its log and Tune's tuner.pkl: nothing to resume and nothing to lose, so its name is
    free for the next run.
    """
    if set(RESULT_FILES) & set(_tune_entries(root)):  # in storage: the local mirror may be stale or absent
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
    """The report is written last: storage (not the local mirror, empty on another machine) says if it exists."""
    return "report.json" in download(root, local_dir(root), ["report.json"])


def resume_changes(saved: SearchConfig, cfg: SearchConfig, root: str) -> dict[str, tuple[Any, Any]]:
    """The changes a ``--resume`` may make to the experiment's saved config (``{key: (saved, now)}``).

    Anything else is refused in one line naming each key with both values: the search (and a retrain
    under way) ran with it, and Tune restores its own experiment state, so a changed setting would be
    half applied or silently ignored. A finished experiment takes no change at all.
    """
    diff = config_diff(saved.to_dict(), cfg.to_dict())
    for key in ("tune.name", "tune.storage_path"):  # they name the experiment: equal by construction
        diff.pop(key, None)
    if diff.get("base.data.dir", (None, None))[1] == "":
        # No data dir now: a driver on a Ray cluster leaves it to each node's $BSS_DATA_DIR
        # (pipeline.resolve_data_dir). That says nothing about the data, so it is no change.
        del diff["base.data.dir"]
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
        if key == "budget":  # a budget may grow or shrink on --resume (its ledger counts what was spent), not
            return all(diff[key])  # appear or go: the search ran time-boxed or it did not
        return key.startswith(DATA_KEYS + EVAL_KEYS) or (key.startswith("retrain.") and not retrain_started)

    refused = {k: v for k, v in diff.items() if not allowed(k)}
    if refused:
        later = "retrain.* (before the retrain starts), " if not retrain_started else ""
        raise ConfigError(
            f"cannot --resume {root} with other settings ({describe_diff(refused, 'experiment', 'now')}): the run so "
            f"far used the experiment's; only {later}base.eval.*, base.data.dir, tune.verbose and budget (a "
            "budget's size, not whether there is one) may change on --resume. Resume "
            f"with its config ({local_dir(root) / CONFIG_FILE}) or start a new experiment with --name NEW"
        )
    return diff


def prepare_experiment(cfg: SearchConfig, resume: bool) -> str:
    """Check the experiment folder against --resume; returns the experiment root."""
    root = experiment_root(cfg)
    check_writable(str(Path(root).parent) if not is_uri(root) else root)
    check_folder(root, "the experiment")
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
