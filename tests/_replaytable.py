"""A synthetic learning-curve table in the form benchmarks/learning_curves.py writes, for replay tests."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def bench(name: str) -> Any:
    """A script of benchmarks/ as a module (the folder is not a package: its scripts run from a checkout)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the class is built
        spec.loader.exec_module(module)
    return sys.modules[name]


def synthetic_table(n_configs: int = 30, epochs: int = 9, seed: int = 0, diverged: int = 2) -> dict[str, Any]:
    """Configs drawn from the CPU table's space; each curve ``floor + gap / epoch**rate``, floor set by lr
    and filters (so TPE has something to learn), a few runs diverged part-way."""
    lc = bench("learning_curves")
    space = lc.table_space(8)
    points = [lc.scale_point(p, 8) for p in lc.SEARCH_POINTS]
    params = lc.draw_configs(space, points, n_configs, seed)
    rng = np.random.default_rng(seed)
    configs, runs = [], []
    for cid, p in enumerate(params):
        floor = 1e-3 * (1 + abs(math.log(p["train.lr"] / 1.5e-3))) * (8 / p["model.filters"]) ** 0.5
        gap, rate = float(rng.uniform(0.01, 0.05)), float(rng.uniform(0.5, 1.5))
        curve = [floor + gap / e**rate for e in range(1, epochs + 1)]
        status = "completed"
        if 0 < cid <= diverged + 2 and cid > 2:  # a few diverge (never a starting point)
            curve, status = curve[: epochs // 2], "diverged"
        # Bigger models are slower to train and, for the multi-objective replay, cost more parameters.
        n_params = int(p["model.filters"] ** 2 * 900 * p["model.decoder_mult"] * rng.uniform(0.8, 1.25))
        configs.append({"id": cid, "params": p, "samples_per_s": float(rng.uniform(300, 3000)), "n_params": n_params})
        if cid == 0:
            configs[-1]["role"] = "reference"
        runs.append({"config": cid, "seed": 0, "status": status, "val_mse": curve, "samples": []})
    base = {"train": {"epochs": epochs, "samples_per_epoch": 1536}}
    return {"meta": {"base": base}, "space": space, "configs": configs, "runs": runs}
