"""The Ray connection: a cluster at --address / $RAY_ADDRESS, else a new local Ray on this machine."""

from __future__ import annotations

import logging
import os
import socket
from collections import Counter
from pathlib import Path
from typing import Any

import ray

from bss_model.config import Config
from bss_model.errors import ConfigError

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
    """Connect to ``address`` (or $RAY_ADDRESS), else start a local Ray with this machine's CPUs/GPUs."""
    if ray.is_initialized():
        return
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
        except (ConnectionError, RuntimeError) as exc:
            raise ConfigError(f"cannot connect to the Ray cluster at {address} ({exc}): check --address") from None
        return
    cpus, gpus = local_resources()
    ray.init(
        # "local" always starts a new Ray: a bare ray.init() would silently attach to any Ray
        # already running on this machine (e.g. from `ray start`) and then refuse num_cpus.
        address="local",
        num_cpus=cpus,
        num_gpus=gpus,
        include_dashboard=False,
        dashboard_host="127.0.0.1",  # never expose the dashboard beyond this machine by default
        logging_level=logging.WARNING,
        runtime_env=WORKER_SETUP,
    )


def local_resources() -> tuple[int, int]:
    """The CPUs and GPUs a local Ray gets: those this process may use (its affinity), and the visible GPUs."""
    import torch

    from bss_model.runtime import usable_cpus

    return usable_cpus(), torch.cuda.device_count()


def check_local_run(cpus_per_trial: float, gpus_per_trial: float, configs: dict[str, Config]) -> None:
    """Before a *local* Ray starts: a trial this machine can schedule, and configs it can train.

    A trial asking for more CPUs (or GPUs) than the machine has waits forever, with no message, and the
    experiment's name is taken by then. A device, CUDA option or thread count the machine lacks fails
    every trial. On a cluster the nodes decide instead: :func:`warn_unschedulable` after connecting, and
    each trial checks its own node (bss_model.runtime, where it applies its settings).
    ``configs``: ``{prefix for the error: config}`` of what the trials will train.
    """
    from bss_model.runtime import check_machine

    cpus, gpus = local_resources()
    if cpus_per_trial > cpus:
        raise ConfigError(
            f"tune.cpus_per_trial={cpus_per_trial:g} is more than the {cpus} CPU(s) this machine gives Ray, so no "
            f"trial could ever start: use {cpus} or fewer (or --address a Ray cluster with nodes that large)"
        )
    if gpus and gpus_per_trial > gpus:
        raise ConfigError(
            f"tune.gpus_per_trial={gpus_per_trial:g} is more than this machine's {gpus} GPU(s), so no trial could "
            f"ever start: use {gpus} or fewer (a fraction, e.g. 0.25, shares one GPU between trials)"
        )
    for prefix, cfg in configs.items():
        try:
            check_machine(cfg.train)
        except ConfigError as exc:
            raise ConfigError(f"{prefix}{exc}") from None


def unschedulable(nodes: list[dict[str, Any]], cpus: float, gpus: float) -> str:
    """The warning for a trial that no alive node of the cluster can hold ('' if one can); ``nodes`` as
    :func:`ray.nodes` gives them."""
    alive = [n.get("Resources", {}) for n in nodes if n.get("Alive")]
    if any(r.get("CPU", 0) >= cpus and r.get("GPU", 0) >= gpus for r in alive):
        return ""
    shapes = Counter((r.get("CPU", 0), r.get("GPU", 0)) for r in alive)
    have = ", ".join(f"{k} x {c:g} CPU/{g:g} GPU" for (c, g), k in sorted(shapes.items())) or "none alive"
    return (
        f"no node of the Ray cluster can hold one trial (tune.cpus_per_trial={cpus:g}, GPUs {gpus:g}; nodes: "
        f"{have}): the trials wait until such a node joins (an autoscaler may add one); otherwise stop with "
        "Ctrl-C and lower tune.cpus_per_trial / tune.gpus_per_trial"
    )


def warn_unschedulable(cpus: float, gpus: float) -> None:
    """On a connected cluster: warn (never refuse: an autoscaler can add nodes) when no node can hold a trial."""
    message = unschedulable(ray.nodes(), cpus, gpus)
    if message:
        logging.getLogger("bss").warning(message)


def cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0))


def local_gpus() -> int:
    """The CUDA GPUs a local Ray would get (init_ray)."""
    import torch

    return torch.cuda.device_count()


def largest_node_cpus() -> float:
    """The CPUs of the cluster's largest alive node: what one task can use at most."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return max((float(n.get("Resources", {}).get("CPU", 0)) for n in nodes), default=1.0) or 1.0


def trial_gpus(gpus_per_trial: float) -> float:
    """The GPUs a trial (or the ensemble task) asks Ray for: ``tune.gpus_per_trial`` where the cluster
    has GPUs, else 0, so the same config runs on a laptop."""
    return gpus_per_trial if cluster_gpus() > 0 else 0.0
