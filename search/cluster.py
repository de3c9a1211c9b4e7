"""The Ray connection: a cluster at --address / $RAY_ADDRESS, else a new local Ray on this machine."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import ray

from bss_model.errors import ConfigError
from search import guard

# Every Ray worker of the job runs this first (search/trainable.py): the worker process's own settings,
# made once where the process starts rather than by each trial function.
WORKER_SETUP = {"worker_process_setup_hook": "search.trainable.setup_worker"}


def check_reachable(address: str) -> None:
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
    """Connect to ``address`` (or $RAY_ADDRESS), else start a local Ray with this machine's CPUs/GPUs.

    ``ray.init`` replaces the SIGTERM handler with one that calls ``sys.exit`` wherever the driver is; the
    entry point's (search.guard: SIGTERM as Ctrl-C, Tune's state saved) is put back."""
    if ray.is_initialized():
        return
    sigterm = guard.keep_sigterm_handler()
    try:
        _init_ray(address)
    finally:
        guard.reinstall(sigterm)


def _init_ray(address: str | None) -> None:
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        check_reachable(address)
        import bss_model
        import search

        # Ship our two packages to the cluster so nodes need only the dependencies. As folders, not module
        # objects: inside a `ray job submit` job Ray merges this with the job's runtime env by deep copy,
        # and a module cannot be copied (TypeError: cannot pickle 'module' object).
        modules = [str(Path(m.__file__).parent) for m in (bss_model, search)]
        try:
            ray.init(
                address=address,
                runtime_env={"py_modules": modules, **WORKER_SETUP},
                logging_level=logging.WARNING,
            )
        except ray.exceptions.AuthenticationError as exc:
            raise ConfigError(
                f"the Ray cluster at {address} refused this driver's authentication ({' '.join(str(exc).split())[:300]}"
                "): export RAY_AUTH_MODE=token, with the cluster's token in ~/.ray/auth_token or RAY_AUTH_TOKEN "
                "(README: token authentication)"
            ) from None
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
        runtime_env=WORKER_SETUP,
    )


def cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0))


def trial_gpus(gpus_per_trial: float) -> float:
    """The GPUs a trial (or the ensemble task) asks Ray for: ``tune.gpus_per_trial`` where the cluster
    has GPUs, else 0, so the same config runs on a laptop."""
    return gpus_per_trial if cluster_gpus() > 0 else 0.0
