"""The final step's model work: the best seed's weights as ``best_model.pt``, its test separations,
and the seed ensemble (the average of every seed's predictions) scored by the protocol.

This is the only place after the retrain that reads a Ray checkpoint or runs a model; the report
only renders what it is given. ``best_model.pt`` stays one model: the ensemble is a figure.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from bss_model import checkpoint as ckpt
from bss_model.config import EvalConfig
from bss_model.data import load_test, mix
from bss_model.errors import BssError, one_line
from bss_model.evaluate import assemble, load_for_evaluation, models_draws, protocol_indices
from search.results import EnsembleResult, Evaluation, SeedResult, Separations

log = logging.getLogger("bss")

FILENAME = "best_model.pt"


# What a user of best_model.pt needs besides the weights, written into the file: how to build the
# model's input, what its channels are, and how its layers connect (the parts a reimplementation
# would have to guess; a wrong guess at the concatenation order alone costs about 1.5 in MSE).
CONVENTIONS = {
    "input": "x = (digit + fashion) / 2: shape [N, 1, 32, 32], float32, pixels in [0, 1] (uint8 / 255)",
    "input_range": [0.0, 1.0],
    "image_size": [28, 28],
    "model_size": [32, 32],
    "pad_offset": [2, 2],
    "padding": "each 28x28 image is zero-padded to 32x32 at offset (2, 2): x[..., 2:30, 2:30] is the image",
    "output": "shape [N, 2, 32, 32] on the input's scale: channel 0 = digit, channel 1 = fashion; [..., 2:30, 2:30] "
    "crops back to 28x28",
    "output_channels": ["digit", "fashion"],
    "concat": "each decoder level: torch.cat([up(h), skip], dim=1), the transposed conv's output first, then the "
    "encoder's skip at that resolution",
    "layers": "encoders.i (shallow to deep): convs, each 3x3 padding 1 [+ BatchNorm if model.norm = batch] + ReLU, "
    "kept as the skip, then 2x2 max-pool; bottleneck: the same convs; decoders.i (deep to shallow): up = 2x2 "
    "stride-2 transposed conv, concat, convs; head: 1x1 conv head.proj to 2 channels, then 3x3 depthwise "
    "head.depthwise (groups 2, padding 1); model.head = consistent adds x - mean of the 2 channels to each; "
    "model.output = relu ends with a ReLU",
    "load": "model, cfg = bss_model.checkpoint.load_model('best_model.pt'); model.eval(); y = model(x)",
}


def portable_config(config: dict) -> dict:
    """The config without the training machine's data folder: on another machine it names nothing
    (the loader falls back to $BSS_DATA_DIR and the data cache)."""
    return {**config, "data": {**config.get("data", {}), "dir": ""}}


def export_best_model(best: SeedResult, path: Path) -> None:
    """Copy the best seed's weights + resolved config into ``path`` (``torch.load(..., weights_only=True)``),
    with the input/output conventions (``CONVENTIONS``) and no absolute path of this machine."""
    with tune.Checkpoint(best.checkpoint).as_directory() as d:
        state = ckpt.load(Path(d) / ckpt.FILENAME)
    ckpt.save(
        {
            "config": portable_config(state["config"]),
            "conventions": CONVENTIONS,
            "model": state["model"],
            "epoch": state["epoch"],
            "n_params": state.get("n_params"),
            "seed": best.seed,
            "val_mse": best.val_mse,
            "test": {k: v for k, v in best.metrics.items() if not isinstance(v, list)},
        },
        path,
    )


def predict_separations(model_path: Path, n: int, data_dir: str = "") -> Separations:
    """``n`` test mixtures (from the protocol's first draw) with their true and predicted components.
    ``data_dir``: the data folder of this run (best_model.pt holds none)."""
    model, cfg = ckpt.load_model(model_path)
    model.eval()
    cfg.data.dir = data_dir or cfg.data.dir
    test_digit, test_fashion = load_test(cfg.data)
    i_digit, i_fashion = protocol_indices(len(test_digit), len(test_fashion), 1, n, cfg.eval.seed)[0]
    x, target = mix(torch.as_tensor(test_digit[i_digit]), torch.as_tensor(test_fashion[i_fashion]))
    with torch.no_grad():
        pred = model(x).float()
    mse = float(((pred - target) ** 2).mean())
    return Separations(x=x.numpy(), target=target.numpy(), pred=pred.numpy(), mse=mse)


def ensemble_members(seeds: list[SeedResult]) -> list[SeedResult]:
    """The seeds the evaluation scores, alone and as the ensemble: whole retrains (every epoch, no error),
    never a search trial or a seed cut short."""
    return [s for s in seeds if s.finished and s.checkpoint and not s.error]


def seed_draws(
    seeds: list[SeedResult],
    eval_overrides: dict[str, Any] | None = None,
    device: str = "auto",
    threads: int = 0,
    subset: list[int] | None = None,
) -> tuple[dict[int, list[dict[str, float]]], EvalConfig]:
    """The protocol's raw figures for the finished seeds (:func:`ensemble_members`) on the draws in ``subset``
    (bss_model.evaluate.models_draws: each seed, the mix baseline, their average), from each seed's final
    retrain checkpoint. The data comes from the first one's config and the draws from ``eval_overrides``
    (the experiment's ``base.eval`` now, so a ``--resume`` that changed an evaluation setting is scored with
    it), which are returned with them. ``threads``: torch's intra-op threads in this process (a Ray task of
    its own)."""
    members = ensemble_members(seeds)
    with contextlib.ExitStack() as stack:
        dirs = [Path(stack.enter_context(tune.Checkpoint(s.checkpoint).as_directory())) for s in members]
        models, cfg, runtime = load_for_evaluation(
            [d / ckpt.FILENAME for d in dirs], eval_overrides=eval_overrides, device=device, threads=threads
        )
        test_digit, test_fashion = load_test(cfg.data)
        return models_draws(models, test_digit, test_fashion, cfg.eval, runtime, subset), cfg.eval


def evaluation_of(seeds: list[SeedResult], per_draw: dict[int, list[dict[str, float]]], cfg: EvalConfig) -> Evaluation:
    """The Evaluation from every draw's raw figures (merged from the tasks that computed them)."""
    members = ensemble_members(seeds)
    r = assemble(per_draw, len(members), cfg)
    ens = r["ensemble"]
    ensemble = EnsembleResult(
        seeds=[s.seed for s in members],
        test_mse=ens["test_mse_ensemble"],
        test_mse_std=ens["test_mse_ensemble_std"],
        per_draw=ens["test_mse_ensemble_per_draw"],
        checkpoints=[str(s.checkpoint) for s in members],
    )
    return Evaluation(seeds={s.seed: m for s, m in zip(members, r["models"], strict=True)}, ensemble=ensemble)


def evaluate_seeds(
    seeds: list[SeedResult], eval_overrides: dict[str, Any] | None = None, device: str = "auto", threads: int = 0
) -> Evaluation:
    """The protocol for every finished seed and for their ensemble (the average of their predictions), in one
    pass over the draws (bss_model.evaluate.evaluate_models: each model runs once per pair), in this process.
    Empty if no seed finished."""
    if not ensemble_members(seeds):
        return Evaluation(seeds={}, ensemble=None)
    return evaluation_of(seeds, *seed_draws(seeds, eval_overrides, device, threads))


def evaluation_task(
    seeds: list[SeedResult], eval_settings: dict[str, Any], device: str, workers: int, gpus: float
) -> Evaluation:
    """The protocol as Ray tasks (the driver's machine may have no GPU and no data): on a GPU, one task with a
    whole GPU; on CPUs, ``workers`` tasks of one CPU and one thread each, every task scoring its share of the
    draws (every model on them), merged here. Processes of one thread each stay fast on a loaded machine,
    where one process of several OpenMP threads slows down many times (measured: README "The job on a time
    budget"). Its errors are one line (EvaluationFailed), after which --resume runs the evaluation again."""
    if not ensemble_members(seeds):
        return Evaluation(seeds={}, ensemble=None)
    cfg = EvalConfig(**eval_settings)
    if gpus:
        chunks, resources, threads = [None], {"num_cpus": 1, "num_gpus": gpus}, 0
    else:
        k = max(1, min(workers, cfg.draws))
        chunks, resources, threads = [list(range(i, cfg.draws, k)) for i in range(k)], {"num_cpus": 1}, 1
    task = ray.remote(max_retries=1, **resources)(seed_draws)
    try:
        parts = ray.get([task.remote(seeds, eval_settings, device, threads, chunk) for chunk in chunks])
    except Exception as exc:  # a RayTaskError around whatever the evaluation raised
        text = str(getattr(exc, "cause", None) or exc).strip()
        raise EvaluationFailed(one_line(text.splitlines()[-1] if text else type(exc).__name__)) from None
    return evaluation_of(seeds, {k: v for part, _ in parts for k, v in part.items()}, cfg)


class EvaluationFailed(BssError):
    """The protocol could not be run on the retrained seeds (their checkpoints are kept)."""

    exit_code = 1
