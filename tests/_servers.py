"""Real servers for the tests, on this machine only: PostgreSQL (Debian's, from /usr/lib/postgresql/*/bin) and an
MLflow tracking server. Each binds to 127.0.0.1, runs in its own session, and is stopped by its PID -- and what it
started, by process group -- when the ``with`` block ends, whatever happened inside it."""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests._searchutil import Ports, Proc


def postgres_bin() -> Path:
    """The newest PostgreSQL on this machine (.ci/run installs Debian's `postgresql` where it is missing)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    if not found:
        pytest.fail("PostgreSQL is not installed: apt-get install postgresql (.ci/run does)", pytrace=False)
    return found[-1].parent


def _stop(p: subprocess.Popen, sig: int, timeout: float = 30) -> None:
    """``sig`` to the server's PID, a wait for it to exit, then SIGKILL to whatever is left of its session."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(p.pid, sig)
    with contextlib.suppress(subprocess.TimeoutExpired):
        p.wait(timeout)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(p.pid, signal.SIGKILL)  # (it runs in a session of its own: start_new_session)
    with contextlib.suppress(subprocess.TimeoutExpired):
        p.wait(10)


@contextlib.contextmanager
def postgres(ports: Ports) -> Iterator[dict[str, Any]]:
    """A PostgreSQL server on 127.0.0.1 with a password user ``bss`` and a database ``studies``.

    initdb refuses to run as root: as root, the server runs as ``nobody`` in a folder of its own.
    """
    bindir = postgres_bin()
    user = "nobody" if os.geteuid() == 0 else None
    folder = Path(tempfile.mkdtemp(prefix="bss-pg-"))
    password = secrets.token_hex(12)
    try:
        (folder / "pw").write_text(password + "\n")
        if user:
            ids = pwd.getpwnam(user)
            for path in (folder, folder / "pw"):
                os.chown(path, ids.pw_uid, ids.pw_gid)
        subprocess.run([str(bindir / "initdb"), "-D", str(folder / "data"), "-U", "bss", "--auth=scram-sha-256",
                        "--pwfile", str(folder / "pw"), "-E", "UTF8", "--no-sync"],
                       user=user, check=True, capture_output=True, timeout=120)  # fmt: skip
        port = ports.one()
        args = [str(bindir / "postgres"), "-D", str(folder / "data"), "-h", "127.0.0.1", "-p", str(port),
                "-k", str(folder), "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
                "-c", "max_connections=40", "-c", "shared_buffers=16MB"]  # fmt: skip
        with open(folder / "server.log", "wb") as log:
            p = subprocess.Popen(args, user=user, stdout=log, stderr=log, start_new_session=True, cwd=folder)
        try:
            import psycopg

            deadline = time.monotonic() + 60
            while True:
                try:
                    conn = psycopg.connect(host="127.0.0.1", port=port, user="bss", password=password,
                                           dbname="postgres", connect_timeout=5, autocommit=True)  # fmt: skip
                    break
                except psycopg.OperationalError:
                    if p.poll() is not None or time.monotonic() > deadline:
                        raise AssertionError(
                            "PostgreSQL did not start:\n" + (folder / "server.log").read_text()
                        ) from None
                    time.sleep(0.3)
            with conn:
                conn.execute("CREATE DATABASE studies")
            yield {"port": port, "user": "bss", "password": password, "pid": p.pid,
                   "url": f"postgresql://bss@127.0.0.1:{port}/studies"}  # fmt: skip
        finally:
            _stop(p, signal.SIGINT)  # PostgreSQL's fast shutdown
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def mlflow_server(ports: Ports, folder: Path) -> Iterator[dict[str, Any]]:
    """``mlflow server`` on 127.0.0.1 (one worker), its runs in a SQLite file under ``folder``."""
    port = ports.one()
    mlflow = Path(sys.executable).parent / "mlflow"
    args = [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
            "--default-artifact-root", str(folder / "artifacts")]  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    proc = Proc(args, folder, {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}, "mlflow")
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"mlflow server did not start:\n{proc.tail()}")
            time.sleep(0.5)
        yield {"url": url, "pid": proc.pid}
    finally:
        _stop(proc.p, signal.SIGTERM)
        proc.cleanup()  # and any descendant that left its session
