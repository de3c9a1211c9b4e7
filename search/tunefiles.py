"""Tune's own files in the experiment: written whole or not at all, and checked before a --resume trusts them.

Tune keeps each phase's state (``search/``, ``retrain/``) in a handful of files: ``tuner.pkl`` (written once,
when the experiment is created), and per session ``experiment_state-<session>.json`` (every trial's status
and checkpoints), ``searcher-state-<session>.pkl``, ``search_gen_state-<session>.json`` and
``callback-states-<session>.pkl``. Two things went wrong with them:

- **Half-written.** Tune copies them from the driver's staging folder to storage with pyarrow, file by
  file, in place: a full disk left ``experiment_state-*.json`` cut off mid-string. For a local (or NFS)
  experiment Tune now writes through :func:`tune_filesystem`, whose files appear under their names only
  once whole (a temp file beside each, renamed over it), so a failed write leaves the previous version.
  Object stores need nothing: an S3 or GCS object appears only once its upload completes.
- **Trusted blindly.** When Tune cannot read its state on a restore it logs the error and starts the
  experiment again, rerunning every trial (or fails later, far from the cause). :func:`check_resumable`
  refuses such a ``--resume`` first, in one line naming the file and the fix; :func:`restore_mode` tells the
  tuners when ``tuner.pkl`` alone is missing, which the tuners rebuild exactly as the experiment first
  wrote it, from the experiment's own config.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import pickletools
from pathlib import Path
from typing import Any

import pyarrow
import pyarrow.fs
from ray.air.constants import EXPR_PROGRESS_FILE, EXPR_RESULT_FILE
from ray.tune import Callback

from bss_model.errors import ConfigError
from bss_model.io import _temp_beside

log = logging.getLogger("bss")

TUNER_PKL = "tuner.pkl"
STATE_GLOB = "experiment_state-*.json"


# --------------------------------------------------------------------------------------
# Whole files on a local (or NFS) experiment


class _WholeFile:
    """A file being written to a temp name beside ``path``; renamed over it on close, or removed if a write
    failed (the temp file respects the umask: bss_model.io._temp_beside). No fsync: this guards against a
    full disk and a crash mid-copy, and Tune writes these files every few seconds."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.fd, self.tmp = _temp_beside(self.path)
        self.failed = self.closed = False

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        try:
            while view:
                view = view[os.write(self.fd, view) :]
        except BaseException:
            self._discard()  # now: pyarrow may never close a stream whose write failed
            raise
        return len(data)

    def _discard(self) -> None:
        self.failed = self.closed = True
        try:
            os.close(self.fd)
        finally:
            self.tmp.unlink(missing_ok=True)

    def flush(self) -> None:
        pass

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            os.close(self.fd)  # NFS reports a failed write-back here
        except OSError:
            self.failed = True
            raise
        finally:
            if self.failed:
                self.tmp.unlink(missing_ok=True)
        os.replace(self.tmp, self.path)


class WholeFilesHandler(pyarrow.fs.FileSystemHandler):
    """The local filesystem, except that a file opened for writing appears under its name only once whole."""

    def __init__(self) -> None:
        self.fs = pyarrow.fs.LocalFileSystem()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WholeFilesHandler)

    def __ne__(self, other: object) -> bool:
        return not isinstance(other, WholeFilesHandler)

    def get_type_name(self) -> str:
        return "local+whole-files"

    def normalize_path(self, path: str) -> str:
        return self.fs.normalize_path(path)

    def get_file_info(self, paths: list[str]) -> list[pyarrow.fs.FileInfo]:
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector: pyarrow.fs.FileSelector) -> list[pyarrow.fs.FileInfo]:
        return self.fs.get_file_info(selector)

    def create_dir(self, path: str, recursive: bool) -> None:
        self.fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path: str) -> None:
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self) -> None:
        raise OSError("refusing to delete the contents of the root folder")

    def delete_file(self, path: str) -> None:
        self.fs.delete_file(path)

    def move(self, src: str, dest: str) -> None:
        self.fs.move(src, dest)

    def copy_file(self, src: str, dest: str) -> None:
        with self.fs.open_input_stream(src) as f, self.open_output_stream(dest, None) as out:
            while chunk := f.read(1 << 20):
                out.write(chunk)

    def open_input_stream(self, path: str) -> Any:
        return self.fs.open_input_stream(path)

    def open_input_file(self, path: str) -> Any:
        return self.fs.open_input_file(path)

    def open_output_stream(self, path: str, metadata: Any) -> Any:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return pyarrow.PythonFile(_WholeFile(path), mode="w")

    def open_append_stream(self, path: str, metadata: Any) -> Any:
        return self.fs.open_append_stream(path, metadata=metadata)


def tune_filesystem(root: str) -> pyarrow.fs.FileSystem | None:
    """What Tune writes the experiment at ``root`` through: whole files for a local (or NFS) folder; None
    (Ray's own, from the URI) for object storage."""
    return None if "://" in root else pyarrow.fs.PyFileSystem(WholeFilesHandler())


# --------------------------------------------------------------------------------------
# A retried trial keeps its history


# The files Tune's JSON and CSV loggers copy back from storage when a trial (re)starts from a checkpoint, by
# the names those loggers use.
LOGGER_FILES = (EXPR_RESULT_FILE, EXPR_PROGRESS_FILE)


class KeepTrialHistory(Callback):
    """Keeps the rows a failed trial reported before Tune retries it.

    Tune's loggers write a trial's ``result.json`` and ``progress.csv`` in the driver's staging folder, and
    the driver uploads that folder with its experiment state, every 10 s or so. When a trial restarts from
    a checkpoint, the loggers first copy both files back *from storage* over the driver's own (so a
    restarted driver carries on from them). Within one driver that copy is older than the driver's: the
    rows reported since the last upload, the failed attempt's, were lost. In CI a trial lost its epoch-1
    row so, the row that said it had run on the worker node that died. Uploading the driver's copies as
    the trial is queued for its retry makes that copy-back a no-op.
    """

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        fs = trial.storage.storage_filesystem
        for name in LOGGER_FILES:
            local = Path(trial.local_path, name)
            if not local.is_file():
                continue
            try:
                pyarrow.fs.copy_files(str(local), f"{trial.storage.trial_fs_path}/{name}", destination_filesystem=fs)
            except OSError as exc:  # storage down: the retry fails on its checkpoint too, and says so
                log.warning("could not save %s of trial %s before its retry: %s", name, trial, exc)


# --------------------------------------------------------------------------------------
# Checking Tune's state before a --resume restores it


def _fs_and_path(path: str) -> tuple[Any, str]:
    from search.storage import _filesystem, is_uri

    return _filesystem(path) if is_uri(path) else (pyarrow.fs.LocalFileSystem(), path)


def _entries(path: str) -> list[str]:
    from search.storage import _tune_entries

    return _tune_entries(path)


def _read(path: str) -> bytes:
    fs, p = _fs_and_path(path)
    with fs.open_input_stream(p) as f:
        return f.read()


def _whole_pickle(data: bytes) -> bool:
    """A complete pickle (its opcodes parse up to STOP), checked without running any of it."""
    try:
        ops = list(pickletools.genops(data))
    except Exception:  # noqa: BLE001 - genops raises ValueError and others on truncated data
        return False
    return bool(ops) and ops[-1][0].name == "STOP"


def _damage(path: str, name: str) -> str | None:
    """Why the state file ``name`` in ``path`` cannot be read back, else None."""
    try:
        data = _read(f"{path}/{name}")
    except OSError as exc:
        return " ".join(str(exc).split())[:200]
    if not name.startswith("experiment_state-"):  # Tune pickles the others (search_gen_state-*.json too)
        return None if _whole_pickle(data) else "a cut-off pickle"
    try:
        state = json.loads(data)
    except ValueError as exc:
        return f"not valid JSON: {exc}"
    if name.startswith("experiment_state-") and not (isinstance(state, dict) and "trial_data" in state):
        return "no trial_data in it"
    return None


def saved_state(root: str, phase: str) -> str | None:
    """The newest ``experiment_state-*.json`` of a phase (the one Tune restores), None if it has none."""
    from search.storage import tune_path

    states = sorted(e for e in _entries(tune_path(root, phase)) if fnmatch.fnmatch(e, STATE_GLOB))
    return states[-1] if states else None


def check_resumable(root: str, phase: str) -> None:
    """Refuse (one line, before Ray starts) a --resume that Tune would silently turn into a fresh start."""
    from search.storage import tune_path

    path = tune_path(root, phase)
    entries = _entries(path)
    trials = [e for e in entries if e.endswith("/")]
    states = sorted(e for e in entries if fnmatch.fnmatch(e, STATE_GLOB))
    keep = "nothing was changed"
    if not states:
        if trials:
            raise ConfigError(
                f"cannot --resume {root}: Tune's state of the {phase} ({phase}/{STATE_GLOB}) is missing though "
                f"{len(trials)} of its trials ran, so Tune would start the {phase} over and run them all again: "
                f"restore the file from a copy, or start a new experiment with --name NEW; {keep}"
            )
        return
    newest = states[-1]
    session = newest[len("experiment_state-") : -len(".json")]
    for name in (newest, f"searcher-state-{session}.pkl", f"search_gen_state-{session}.json",
                 f"callback-states-{session}.pkl", TUNER_PKL):  # fmt: skip
        if name != newest and name not in entries:
            continue  # absent: Tune goes on without it (tuner.pkl: rebuilt, see restore_mode)
        why = _damage(path, name)
        if why is None:
            continue
        if name == TUNER_PKL:
            continue  # rebuilt from the config (restore_mode), the damaged copy kept beside it
        older = f", or move it aside to resume from the state before ({states[-2]}: the trials since then run " \
            "again)" if name == newest and len(states) > 1 else ""  # fmt: skip
        raise ConfigError(
            f"cannot --resume {root}: Tune's state file {phase}/{name} is damaged ({why}), so Tune would start the "
            f"{phase} over and rerun its finished trials: restore it from a copy{older}, or start a new experiment "
            f"with --name NEW; {keep}"
        )


def restore_mode(root: str, phase: str) -> str:
    """How a tuner continues a phase: "restore" (Tune's state and tuner.pkl are there), "rebuild" (the state
    is there but tuner.pkl is missing or damaged: build the phase's Tuner from the config, which writes
    tuner.pkl as the experiment first did, then restore) or "new" (no saved state: nothing to continue)."""
    from search.storage import tune_path

    if saved_state(root, phase) is None:
        return "new"
    path = tune_path(root, phase)
    if TUNER_PKL in _entries(path) and _damage(path, TUNER_PKL) is None:
        return "restore"
    fs, p = _fs_and_path(f"{path}/{TUNER_PKL}")
    if fs.get_file_info(p).type == pyarrow.fs.FileType.File:
        fs.move(p, f"{p}.damaged")  # kept, not overwritten: the rebuild writes a new tuner.pkl
        log.warning("%s/%s is damaged (kept as %s.damaged): rebuilding it from the experiment's config",
                    phase, TUNER_PKL, TUNER_PKL)  # fmt: skip
    else:
        log.warning("%s/%s is missing: rebuilding it from the experiment's config", phase, TUNER_PKL)
    return "rebuild"
