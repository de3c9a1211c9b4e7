"""The reference evaluation protocol, and batched MSE used by validation too.

Protocol: ``draws`` (10) draws of ``pairs`` (20,000) test pairs, each drawn uniformly
with replacement from the 10k x 10k MNIST-test x Fashion-test pairs by one seeded
generator. We report the mean, std (ddof=0) and min of the per-draw MSE, the
per-component MSE, and the same figures for the *mix baseline* that predicts ``x``
for both components. A *seed ensemble* (the average of several models' predictions) is
scored on the same draws and reported as ``test_mse_ensemble``, never mixed up with the
single-model mean.

``python -m bss_model.evaluate --checkpoint PATH`` prints the result as JSON. This
is the only code path that reads the test sets.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bss_model.checkpoint import load_model
from bss_model.config import Config, EvalConfig
from bss_model.data import mix
from bss_model.runtime import Runtime, apply_torch_settings, resolve_device, resolve_runtime

Predictor = Callable[[torch.Tensor], torch.Tensor]


def protocol_indices(
    n_digit: int, n_fashion: int, draws: int, pairs: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The protocol's draws: one generator, ``draws`` x (idx_digit, idx_fashion) (``bss_model.data.draw_from``)."""
    from bss_model.data import draw_from

    rng = np.random.default_rng(seed)
    return [draw_from(rng, n_digit, n_fashion, pairs) for _ in range(draws)]


@torch.no_grad()
def batched_mse(
    predict: Predictor,
    digit: torch.Tensor,
    fashion: torch.Tensor,
    idx_digit: np.ndarray,
    idx_fashion: np.ndarray,
    batch_size: int,
) -> dict[str, float]:
    """MSE of ``predict`` over the pairs (digit[idx_digit], fashion[idx_fashion]), in batches.

    ``digit``/``fashion`` are uint8 [N,32,32] tensors already on the device. Sums are kept in
    float64 so 20,000 x 2 x 1024 squared errors add up without drift.
    """
    return batched_mses([predict], digit, fashion, idx_digit, idx_fashion, batch_size)[0]


@torch.no_grad()
def batched_mses(
    predicts: Sequence[Predictor],
    digit: torch.Tensor,
    fashion: torch.Tensor,
    idx_digit: np.ndarray,
    idx_fashion: np.ndarray,
    batch_size: int,
    ensemble_of: int = 0,
) -> list[dict[str, float]]:
    """:func:`batched_mse` of several predictors in one pass over the pairs: each batch is mixed once and fed
    to every predictor. With ``ensemble_of`` = k, one more result follows: the MSE of the first k predictors'
    averaged predictions (in float32), computed from the very predictions scored alone, so the ensemble
    costs no extra forward."""
    device = digit.device
    outputs = len(predicts) + (1 if ensemble_of else 0)
    sums = torch.zeros(outputs, 2, dtype=torch.float64, device=device)  # [output, (digit, fashion)]
    i_digit = torch.as_tensor(idx_digit, device=device)
    i_fashion = torch.as_tensor(idx_fashion, device=device)
    n = len(idx_digit)
    # Every batch has one shape: a short last batch is padded with pairs it then ignores, so a
    # compiled model or cuDNN's autotuner never sees a new shape at the end of a pass.
    size = min(batch_size, n)
    for start in range(0, n, size):
        rows = torch.arange(start, start + size, device=device).clamp_(max=n - 1)
        keep = min(size, n - start)
        x, y = mix(digit[i_digit[rows]], fashion[i_fashion[rows]])
        preds = [p(x)[:keep].float() for p in predicts]
        if ensemble_of:
            total = preds[0]
            for pred in preds[1:ensemble_of]:
                total = total + pred
            preds.append(total / ensemble_of)
        for k, pred in enumerate(preds):
            err = (pred - y[:keep]) ** 2
            sums[k, 0] += err[:, 0].sum(dtype=torch.float64)
            sums[k, 1] += err[:, 1].sum(dtype=torch.float64)
    per = n * digit.shape[-1] * digit.shape[-2]
    out = []
    for d, f in (sums / per).tolist():
        out.append({"mse": (d + f) / 2, "mse_digit": d, "mse_fashion": f})
    return out


def model_predictor(model: torch.nn.Module, runtime: Runtime) -> Predictor:
    """Wrap a model for inference with the runtime's precision and memory format."""

    def predict(x: torch.Tensor) -> torch.Tensor:
        if runtime.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with runtime.autocast():
            return model(x)

    return predict


def ensemble_predictor(models: Sequence[torch.nn.Module], runtime: Runtime) -> Predictor:
    """The average of the models' predictions (in float32), each model run as :func:`model_predictor` runs it."""
    if not models:
        raise ValueError("an ensemble needs at least one model")
    predictors = [model_predictor(m, runtime) for m in models]

    def predict(x: torch.Tensor) -> torch.Tensor:
        total = predictors[0](x).float()
        for p in predictors[1:]:
            total = total + p(x).float()
        return total / len(predictors)

    return predict


def mix_baseline(x: torch.Tensor) -> torch.Tensor:
    """The trivial separator: predict the mixture for both components."""
    return x.expand(-1, 2, -1, -1)


def _summary(draws: list[dict[str, float]]) -> dict[str, Any]:
    per_draw = np.array([d["mse"] for d in draws])
    return {
        "mse_mean": float(per_draw.mean()),
        "mse_std": float(per_draw.std()),
        "mse_min": float(per_draw.min()),
        "mse_per_draw": per_draw.tolist(),
        "mse_digit": float(np.mean([d["mse_digit"] for d in draws])),
        "mse_fashion": float(np.mean([d["mse_fashion"] for d in draws])),
    }


def run_protocol(
    predict: Predictor, test_digit: torch.Tensor, test_fashion: torch.Tensor, cfg: EvalConfig
) -> dict[str, Any]:
    """Per-draw MSEs of ``predict`` and their summary (mean, std, min, per component)."""
    return run_protocols([predict], test_digit, test_fashion, cfg)[0]


def run_protocols(
    predicts: Sequence[Predictor],
    test_digit: torch.Tensor,
    test_fashion: torch.Tensor,
    cfg: EvalConfig,
    ensemble_of: int = 0,
) -> list[dict[str, Any]]:
    """:func:`run_protocol` for several predictors on the same draws in one pass (:func:`batched_mses`), and,
    with ``ensemble_of`` = k, for the first k's averaged predictions last."""
    return summarize_draws(protocol_draws(predicts, test_digit, test_fashion, cfg, ensemble_of))


def protocol_draws(
    predicts: Sequence[Predictor],
    test_digit: torch.Tensor,
    test_fashion: torch.Tensor,
    cfg: EvalConfig,
    ensemble_of: int = 0,
    subset: Sequence[int] | None = None,
) -> dict[int, list[dict[str, float]]]:
    """The protocol's raw figures, ``{draw: [one dict per output]}``, for the draws in ``subset`` (default all).

    Every draw's pairs come from the one seeded generator in order, so a subset scores exactly the pairs the
    whole protocol would: the draws can be split between processes and merged (:func:`summarize_draws`)."""
    indices = protocol_indices(len(test_digit), len(test_fashion), cfg.draws, cfg.pairs, cfg.seed)
    wanted = range(cfg.draws) if subset is None else subset
    return {
        k: batched_mses(predicts, test_digit, test_fashion, *indices[k], cfg.batch_size, ensemble_of) for k in wanted
    }


def summarize_draws(per_draw: dict[int, list[dict[str, float]]]) -> list[dict[str, Any]]:
    """Each output's summary (:func:`_summary`) over the draws, in draw order."""
    draws = [per_draw[k] for k in sorted(per_draw)]
    return [_summary([d[i] for d in draws]) for i in range(len(draws[0]))]


def evaluate_model(
    model: torch.nn.Module,
    test_digit: np.ndarray,
    test_fashion: np.ndarray,
    cfg: EvalConfig,
    runtime: Runtime,
) -> dict[str, Any]:
    """The full protocol result: the model's figures plus the mix baseline's, on the same draws."""
    return evaluate_models([model], test_digit, test_fashion, cfg, runtime)["models"][0]


def evaluate_ensemble(
    models: Sequence[torch.nn.Module],
    test_digit: np.ndarray,
    test_fashion: np.ndarray,
    cfg: EvalConfig,
    runtime: Runtime,
) -> dict[str, Any]:
    """The protocol for the average of ``models``' predictions, on the same draws as :func:`evaluate_model`.

    Keys say "ensemble" so nobody confuses the result with the mean of the single models' MSEs
    (by convexity of the squared error it is never worse than that mean).
    """
    return evaluate_models(models, test_digit, test_fashion, cfg, runtime)["ensemble"]


def _ensemble_keys(r: dict[str, Any], size: int, cfg: EvalConfig) -> dict[str, Any]:
    return {
        "test_mse_ensemble": r["mse_mean"],
        "test_mse_ensemble_std": r["mse_std"],
        "test_mse_ensemble_min": r["mse_min"],
        "test_mse_ensemble_per_draw": r["mse_per_draw"],
        "test_mse_ensemble_digit": r["mse_digit"],
        "test_mse_ensemble_fashion": r["mse_fashion"],
        "ensemble_size": size,
        "draws": cfg.draws,
        "pairs": cfg.pairs,
        "seed": cfg.seed,
    }


def evaluate_models(
    models: Sequence[torch.nn.Module],
    test_digit: np.ndarray,
    test_fashion: np.ndarray,
    cfg: EvalConfig,
    runtime: Runtime,
) -> dict[str, Any]:
    """The protocol for several models and their ensemble in one pass over the draws (one forward per model
    and pair: a separate ensemble pass would run every model twice).

    ``{"models": [evaluate_model's result for each], "ensemble": evaluate_ensemble's result}``, each figure
    equal to what the one-model functions compute on the same draws.
    """
    return assemble(models_draws(models, test_digit, test_fashion, cfg, runtime), len(models), cfg)


def models_draws(
    models: Sequence[torch.nn.Module],
    test_digit: np.ndarray,
    test_fashion: np.ndarray,
    cfg: EvalConfig,
    runtime: Runtime,
    subset: Sequence[int] | None = None,
) -> dict[int, list[dict[str, float]]]:
    """:func:`evaluate_models`'s raw figures for the draws in ``subset``: per draw, each model, the mix baseline,
    and (with several models) their average, in that order; :func:`assemble` turns every draw's into results."""
    if not models:
        raise ValueError("nothing to evaluate: pass at least one model")
    digit = torch.as_tensor(test_digit, device=runtime.device)
    fashion = torch.as_tensor(test_fashion, device=runtime.device)
    for m in models:
        m.eval()
    predicts = [model_predictor(m, runtime) for m in models]
    ensemble_of = len(models) if len(models) > 1 else 0
    return protocol_draws([*predicts, mix_baseline], digit, fashion, cfg, ensemble_of, subset)


def assemble(per_draw: dict[int, list[dict[str, float]]], n_models: int, cfg: EvalConfig) -> dict[str, Any]:
    """:func:`evaluate_models`'s result from the raw figures of every draw (:func:`models_draws`, merged)."""
    if sorted(per_draw) != list(range(cfg.draws)):
        raise ValueError(f"the protocol has draws 0..{cfg.draws - 1}, got {sorted(per_draw)}")
    out = summarize_draws(per_draw)
    singles, baseline = out[:n_models], out[n_models]
    averaged = out[-1] if n_models > 1 else singles[0]
    results = []
    for single in singles:
        result = {f"test_{k}": v for k, v in single.items()}
        result.update({f"baseline_mix_{k}": v for k, v in baseline.items()})
        result.update({"draws": cfg.draws, "pairs": cfg.pairs, "seed": cfg.seed})
        results.append(result)
    return {"models": results, "ensemble": _ensemble_keys(averaged, n_models, cfg)}


def load_for_evaluation(
    checkpoints: Sequence[str | Path],
    data_dir: str | None = None,
    eval_overrides: dict[str, Any] | None = None,
    device: str = "auto",
    threads: int = 0,
) -> tuple[list[torch.nn.Module], Config, Runtime]:
    """Checkpoints' evaluated weights (the EMA when on) ready to score, with the first one's config.

    Loaded with ``weights_only=True``. The data and protocol settings come from the first
    checkpoint's config (plus overrides), so one checkpoint alone and an ensemble of several are
    scored on the very same draws, with the same runtime.
    """
    if not checkpoints:
        raise ValueError("nothing to evaluate: pass at least one checkpoint")
    loaded = [load_model(path, device="cpu") for path in checkpoints]
    cfg = loaded[0][1]
    if data_dir:
        cfg.data.dir = str(Path(data_dir).resolve())
    for key, value in (eval_overrides or {}).items():
        setattr(cfg.eval, key, value)
    cfg.eval.validate()
    runtime = inference_runtime(cfg, device, threads)
    return [runtime.prepare_model(model) for model, _ in loaded], cfg, runtime


def inference_runtime(cfg: Config, device: str, threads: int = 0) -> Runtime:
    """The runtime a trained model is applied with (the protocol, ``bss-separate``): the checkpoint's own
    precision and memory format, on ``device`` and with ``threads``, never with CUDA graphs (a training-step
    matter). ``cfg.train`` is updated to match."""
    cfg.train.device, cfg.train.cuda_graphs = device, "off"
    runtime = resolve_runtime(cfg.train)
    apply_torch_settings(runtime, threads)
    return runtime


def evaluate_ensemble_checkpoints(
    checkpoints: Sequence[str | Path],
    data_dir: str | None = None,
    eval_overrides: dict[str, Any] | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """Score the average of several checkpoints' predictions on the draws each is scored on alone."""
    from bss_model.data import load_test

    models, cfg, runtime = load_for_evaluation(checkpoints, data_dir, eval_overrides, device)
    test_digit, test_fashion = load_test(cfg.data)
    result = evaluate_ensemble(models, test_digit, test_fashion, cfg.eval, runtime)
    result["checkpoints"] = [str(p) for p in checkpoints]
    return result


def evaluate_checkpoint(
    checkpoint: str | Path,
    data_dir: str | None = None,
    eval_overrides: dict[str, Any] | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """Load a checkpoint and run the protocol on the test sets."""
    from bss_model.data import load_test

    (model,), cfg, runtime = load_for_evaluation([checkpoint], data_dir, eval_overrides, device)
    test_digit, test_fashion = load_test(cfg.data)
    return evaluate_model(model, test_digit, test_fashion, cfg.eval, runtime)


def check_flags(overrides: dict[str, Any]) -> None:
    """The protocol flags' ranges, in the words the user typed (``--seed -1``, not ``eval.seed=-1``)."""
    from bss_model.errors import ConfigError

    try:
        EvalConfig(**overrides).validate()
    except ConfigError as exc:
        message = str(exc)
        for key in overrides:
            message = message.replace(f"eval.{key}=", f"--{key} ")
        raise ConfigError(message) from None


def check_finite_result(result: dict[str, Any], checkpoint: str | Path) -> None:
    """Refuse a protocol result with a non-finite score: finite weights can still overflow to inf or NaN."""
    import math

    from bss_model.errors import CheckpointError

    bad = [k for k, v in result.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise CheckpointError(
            f"{checkpoint} predicts non-finite values ({bad[0]}={result[bad[0]]}): its weights overflow; pass "
            "another checkpoint, or retrain"
        )


def main(argv: list[str] | None = None) -> int:
    from bss_model.cli import add_common_flags
    from bss_model.errors import cli_entry

    @cli_entry
    def _main() -> int:
        p = argparse.ArgumentParser(prog="python -m bss_model.evaluate", description=__doc__.split("\n")[0])
        p.add_argument("--checkpoint", required=True, help="checkpoint.pt, a run folder, or best_model.pt")
        p.add_argument("--data-dir", default=None, help="folder with mnist/ and fashion-mnist/ (else BSS_DATA_DIR, …)")
        p.add_argument("--draws", type=int, default=None)
        p.add_argument("--pairs", type=int, default=None)
        p.add_argument("--seed", type=int, default=None)
        p.add_argument("--device", default="auto")
        add_common_flags(p, "bss-evaluate")
        args = p.parse_args(argv)
        overrides = {k: v for k in ("draws", "pairs", "seed") if (v := getattr(args, k)) is not None}
        check_flags(overrides)
        resolve_device(args.device, "--device")
        result = evaluate_checkpoint(args.checkpoint, args.data_dir, overrides, args.device)
        check_finite_result(result, args.checkpoint)
        json.dump(result, sys.stdout, indent=2, allow_nan=False)  # NaN is not JSON: refused above, never printed
        print()
        return 0

    return _main()


if __name__ == "__main__":
    raise SystemExit(main())
