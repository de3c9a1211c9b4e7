"""Tests for bss_model.evaluate: the reference protocol on the real test sets, checked against plain numpy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from bss_model.config import DataConfig, EvalConfig, TrainConfig
from bss_model.data import load_test
from bss_model.evaluate import (
    batched_mse,
    evaluate_ensemble,
    evaluate_model,
    mix_baseline,
    protocol_indices,
    run_protocol,
)
from bss_model.runtime import Runtime, resolve_runtime

DRAWS, PAIRS = 3, 2000


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Two intra-op threads on a shared 2-core machine can be many times slower than one.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def test_sets(data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    a, b = load_test(DataConfig(dir=str(data_dir), download=False))
    assert a.shape == (10000, 32, 32) and b.shape == (10000, 32, 32) and a.dtype == b.dtype == np.uint8
    return a, b


@pytest.fixture(scope="module")
def runtime() -> Runtime:
    return resolve_runtime(TrainConfig(device="cpu", precision="fp32", compile="off"))


def numpy_mse(
    a: np.ndarray, b: np.ndarray, idx_digit: np.ndarray, idx_fashion: np.ndarray, predict
) -> dict[str, float]:
    """MSE in float64 numpy, from the padded uint8 images, independently of the torch code.

    ``predict(x)`` returns the two predicted components for the [N, H, W] mixtures ``x``.
    """
    ca = a[idx_digit].astype(np.float64) / 255.0
    cb = b[idx_fashion].astype(np.float64) / 255.0
    x = (ca + cb) / 2.0
    pa, pb = predict(x)
    digit = float(np.mean((pa - ca) ** 2))
    fashion = float(np.mean((pb - cb) ** 2))
    return {"mse": (digit + fashion) / 2, "mse_digit": digit, "mse_fashion": fashion}


def numpy_mix_baseline(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return x, x


def numpy_zeros(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros_like(x), np.zeros_like(x)


class MixModule(nn.Module):
    """The mix baseline as a model: the model path must then score exactly like the baseline."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.expand(-1, 2, -1, -1).clone()


class ZeroModule(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[0], 2, *x.shape[2:], dtype=x.dtype, device=x.device)


def test_protocol_indices_follow_the_documented_generator_order() -> None:
    # One generator; per draw idx_digit then idx_fashion, each uniform with replacement over the test set.
    draws = protocol_indices(10000, 9000, DRAWS, PAIRS, seed=5)
    rng = np.random.default_rng(5)
    assert len(draws) == DRAWS
    for idx_digit, idx_fashion in draws:
        np.testing.assert_array_equal(idx_digit, rng.integers(0, 10000, PAIRS))
        np.testing.assert_array_equal(idx_fashion, rng.integers(0, 9000, PAIRS))
        assert idx_digit.min() >= 0 and idx_digit.max() < 10000 and idx_fashion.max() < 9000
    # With replacement: 2000 draws out of 10000 all distinct is essentially impossible.
    assert len(np.unique(draws[0][0])) < PAIRS


def test_mix_baseline_matches_numpy(test_sets) -> None:
    a, b = test_sets
    cfg = EvalConfig(draws=DRAWS, pairs=PAIRS, seed=0, batch_size=700)
    result = run_protocol(mix_baseline, torch.as_tensor(a), torch.as_tensor(b), cfg)
    expected = [
        numpy_mse(a, b, i_digit, i_fashion, numpy_mix_baseline)
        for i_digit, i_fashion in protocol_indices(10000, 10000, DRAWS, PAIRS, 0)
    ]
    np.testing.assert_allclose(result["mse_per_draw"], [e["mse"] for e in expected], rtol=1e-6)
    np.testing.assert_allclose(result["mse_mean"], np.mean([e["mse"] for e in expected]), rtol=1e-6)
    np.testing.assert_allclose(result["mse_digit"], np.mean([e["mse_digit"] for e in expected]), rtol=1e-6)
    np.testing.assert_allclose(result["mse_fashion"], np.mean([e["mse_fashion"] for e in expected]), rtol=1e-6)
    # Sanity of scale: predicting the mixture for both sources costs a few hundredths.
    assert 0.01 < result["mse_mean"] < 0.1


def test_evaluate_model_scores_model_and_baseline_on_the_protocol_draws(test_sets, runtime) -> None:
    a, b = test_sets
    cfg = EvalConfig(draws=DRAWS, pairs=PAIRS, seed=3, batch_size=1000)
    draws = protocol_indices(10000, 10000, DRAWS, PAIRS, 3)
    result = evaluate_model(ZeroModule(), a, b, cfg, runtime)
    assert (result["draws"], result["pairs"], result["seed"]) == (DRAWS, PAIRS, 3)
    zeros = [numpy_mse(a, b, i_digit, i_fashion, numpy_zeros) for i_digit, i_fashion in draws]
    baseline = [numpy_mse(a, b, i_digit, i_fashion, numpy_mix_baseline) for i_digit, i_fashion in draws]
    np.testing.assert_allclose(result["test_mse_per_draw"], [e["mse"] for e in zeros], rtol=1e-6)
    np.testing.assert_allclose(result["test_mse_digit"], np.mean([e["mse_digit"] for e in zeros]), rtol=1e-6)
    np.testing.assert_allclose(result["test_mse_fashion"], np.mean([e["mse_fashion"] for e in zeros]), rtol=1e-6)
    np.testing.assert_allclose(result["baseline_mix_mse_per_draw"], [e["mse"] for e in baseline], rtol=1e-6)
    np.testing.assert_allclose(result["baseline_mix_mse_mean"], np.mean([e["mse"] for e in baseline]), rtol=1e-6)
    # Predicting zeros is much worse than predicting the mixture.
    assert result["test_mse_mean"] > 2 * result["baseline_mix_mse_mean"]


def test_model_and_baseline_use_the_same_draws(test_sets, runtime) -> None:
    # A model that *is* the baseline must score exactly like it, draw by draw.
    a, b = test_sets
    result = evaluate_model(MixModule(), a, b, EvalConfig(draws=DRAWS, pairs=PAIRS, seed=11), runtime)
    for key in ("mse_per_draw", "mse_mean", "mse_std", "mse_min", "mse_digit", "mse_fashion"):
        assert result[f"test_{key}"] == result[f"baseline_mix_{key}"], key


@pytest.mark.parametrize("prefix", ["test_", "baseline_mix_"])
def test_summary_statistics_match_the_per_draw_values(test_sets, runtime, prefix: str) -> None:
    a, b = test_sets
    result = evaluate_model(ZeroModule(), a, b, EvalConfig(draws=4, pairs=500, seed=1), runtime)
    per_draw = np.array(result[f"{prefix}mse_per_draw"])
    assert per_draw.shape == (4,)
    assert len(set(per_draw.tolist())) == 4, "different draws should give different MSEs"
    assert result[f"{prefix}mse_mean"] == pytest.approx(per_draw.mean(), rel=1e-12)
    assert result[f"{prefix}mse_std"] == pytest.approx(per_draw.std(ddof=0), rel=1e-12)
    assert result[f"{prefix}mse_min"] == per_draw.min()
    assert per_draw.min() <= result[f"{prefix}mse_mean"] <= per_draw.max()
    assert result[f"{prefix}mse_std"] > 0


def test_draws_are_reproducible_for_a_seed_and_differ_across_seeds(test_sets) -> None:
    a, b = (torch.as_tensor(t) for t in test_sets)
    run = lambda seed: run_protocol(mix_baseline, a, b, EvalConfig(draws=2, pairs=1000, seed=seed))  # noqa: E731
    first, again, other = run(7), run(7), run(8)
    assert first == again
    assert first["mse_per_draw"] != other["mse_per_draw"]
    for (i_digit, i_fashion), (ja, jb) in zip(
        protocol_indices(10000, 10000, 2, 1000, 7), protocol_indices(10000, 10000, 2, 1000, 7), strict=True
    ):
        np.testing.assert_array_equal(i_digit, ja)
        np.testing.assert_array_equal(i_fashion, jb)
    assert not np.array_equal(
        protocol_indices(10000, 10000, 1, 1000, 7)[0][0], protocol_indices(10000, 10000, 1, 1000, 8)[0][0]
    )
    # The draws within one protocol differ from each other too.
    d0, d1 = protocol_indices(10000, 10000, 2, 1000, 7)
    assert not np.array_equal(d0[0], d1[0])


def test_batched_mse_does_not_depend_on_the_batch_size(test_sets) -> None:
    a, b = (torch.as_tensor(t) for t in test_sets)
    i_digit, i_fashion = protocol_indices(10000, 10000, 1, 1234, 2)[0]
    whole = batched_mse(mix_baseline, a, b, i_digit, i_fashion, 1234)
    for batch_size in (100, 333, 5000):
        parts = batched_mse(mix_baseline, a, b, i_digit, i_fashion, batch_size)
        for key in whole:
            assert parts[key] == pytest.approx(whole[key], rel=1e-12), (batch_size, key)
    one_by_one = batched_mse(mix_baseline, a, b, i_digit[:50], i_fashion[:50], 1)
    in_one_batch = batched_mse(mix_baseline, a, b, i_digit[:50], i_fashion[:50], 50)
    for key in one_by_one:
        assert one_by_one[key] == pytest.approx(in_one_batch[key], rel=1e-12), key


# --------------------------------------------------------------------------------------
# Seed ensembles


class Affine(nn.Module):
    """digit = a_d * x + b_d, fashion = a_f * x + b_f: simple enough to recompute in numpy."""

    def __init__(self, a_digit: float, b_digit: float, a_fashion: float, b_fashion: float) -> None:
        super().__init__()
        self.coef = (a_digit, b_digit, a_fashion, b_fashion)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a_d, b_d, a_f, b_f = self.coef
        return torch.cat([a_d * x + b_d, a_f * x + b_f], dim=1)


AFFINE = [(0.9, 0.01, 1.1, -0.02), (1.3, -0.05, 0.6, 0.04), (0.7, 0.0, 1.2, 0.01)]


def test_ensemble_of_affine_models_matches_numpy(test_sets, runtime) -> None:
    a, b = test_sets
    cfg = EvalConfig(draws=2, pairs=500, seed=4, batch_size=200)
    result = evaluate_ensemble([Affine(*c) for c in AFFINE], a, b, cfg, runtime)

    def numpy_average(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        digit = np.mean([a_d * x + b_d for a_d, b_d, _, _ in AFFINE], axis=0)
        fashion = np.mean([a_f * x + b_f for _, _, a_f, b_f in AFFINE], axis=0)
        return digit, fashion

    expected = [numpy_mse(a, b, i_d, i_f, numpy_average) for i_d, i_f in protocol_indices(10000, 10000, 2, 500, 4)]
    np.testing.assert_allclose(result["test_mse_ensemble_per_draw"], [e["mse"] for e in expected], rtol=1e-5)
    np.testing.assert_allclose(result["test_mse_ensemble"], np.mean([e["mse"] for e in expected]), rtol=1e-5)
    np.testing.assert_allclose(
        result["test_mse_ensemble_digit"], np.mean([e["mse_digit"] for e in expected]), rtol=1e-5
    )
    assert result["ensemble_size"] == 3 and (result["draws"], result["pairs"], result["seed"]) == (2, 500, 4)


def test_ensemble_of_unets_matches_numpy_averaged_predictions(test_sets, runtime) -> None:
    # Three different random tiny U-Nets; numpy averages their separate predictions on the same draws.
    from bss_model.config import config_from_dict
    from bss_model.model import build_model

    a, b = test_sets
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(build_model(config_from_dict({"model": {"variant": "tiny", "head": "consistent"}}).model))
    cfg = EvalConfig(draws=2, pairs=300, seed=9, batch_size=128)
    result = evaluate_ensemble(models, a, b, cfg, runtime)
    singles = [evaluate_model(m, a, b, cfg, runtime)["test_mse_mean"] for m in models]

    expected = []
    for i_digit, i_fashion in protocol_indices(10000, 10000, 2, 300, 9):
        x = (a[i_digit].astype(np.float64) + b[i_fashion].astype(np.float64)) / 2 / 255.0
        with torch.no_grad():
            preds = [m.eval()(torch.as_tensor(x[:, None], dtype=torch.float32)).double().numpy() for m in models]
        average = np.mean(preds, axis=0)
        expected.append(numpy_mse(a, b, i_digit, i_fashion, lambda _x, p=average: (p[:, 0], p[:, 1]))["mse"])
    np.testing.assert_allclose(result["test_mse_ensemble_per_draw"], expected, rtol=1e-5)
    # Convexity of the squared error: the average's MSE never exceeds the mean single-model MSE,
    # and three different models really differ (the average is strictly better here).
    assert result["test_mse_ensemble"] < np.mean(singles)
    # One model is its own ensemble.
    one = evaluate_ensemble(models[:1], a, b, cfg, runtime)
    assert one["test_mse_ensemble"] == pytest.approx(singles[0], rel=1e-12)
    with pytest.raises(ValueError, match="at least one"):
        evaluate_ensemble([], a, b, cfg, runtime)


def test_ensemble_of_checkpoints_scores_their_evaluated_weights(test_sets, runtime, data_dir, tmp_path) -> None:
    from bss_model import checkpoint as ckpt
    from bss_model.config import load_config
    from bss_model.evaluate import evaluate_ensemble_checkpoints
    from bss_model.model import build_model

    a, b = test_sets
    cfg = load_config(None, ["model.variant=tiny", "train.precision=fp32", "train.compile=off", "eval.seed=5"])
    models, paths = [], []
    for seed in range(2):
        torch.manual_seed(seed)
        models.append(build_model(cfg.model))
        paths.append(tmp_path / f"seed{seed}.pt")
        ckpt.save({"config": cfg.to_dict(), "model": models[-1].state_dict()}, paths[-1])
    result = evaluate_ensemble_checkpoints(paths, str(data_dir), {"draws": 2, "pairs": 300}, device="cpu")
    direct = evaluate_ensemble(models, a, b, EvalConfig(draws=2, pairs=300, seed=5), runtime)
    assert result["checkpoints"] == [str(p) for p in paths]
    np.testing.assert_allclose(result["test_mse_ensemble_per_draw"], direct["test_mse_ensemble_per_draw"], rtol=1e-6)
    assert (result["draws"], result["pairs"], result["seed"], result["ensemble_size"]) == (2, 300, 5, 2)
