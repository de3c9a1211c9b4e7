"""The evaluation the report states: each finished retrain seed on the protocol, and the seed ensemble (their
predictions averaged) on the same draws, from one pass -- checked against an independent numpy computation
on tiny checkpoints, and against the one-model protocol."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bss_model import checkpoint as ckpt
from bss_model.config import load_config
from bss_model.data import load_test
from bss_model.evaluate import evaluate_checkpoint
from bss_model.model import build_model
from search.best_model import evaluate_seeds
from search.report import build_report, render_markdown
from search.results import RetrainSummary, SeedResult

DRAWS, PAIRS, EVAL_SEED = 2, 300, 3


def numpy_draws(n_digit: int, n_fashion: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The protocol's draws, written out again: one generator; per draw the digit indices, then the fashion ones."""
    rng = np.random.default_rng(EVAL_SEED)
    return [(rng.integers(0, n_digit, PAIRS), rng.integers(0, n_fashion, PAIRS)) for _ in range(DRAWS)]


def numpy_ensemble_mse(models: list[torch.nn.Module], digit: np.ndarray, fashion: np.ndarray) -> list[float]:
    """Per draw: each model predicts alone; numpy averages the predictions and takes the MSE in float64."""
    out = []
    for i_digit, i_fashion in numpy_draws(len(digit), len(fashion)):
        d = digit[i_digit].astype(np.float64) / 255.0
        f = fashion[i_fashion].astype(np.float64) / 255.0
        x = torch.as_tensor(((d + f) / 2)[:, None], dtype=torch.float32)
        with torch.no_grad():
            preds = [m.eval()(x).double().numpy() for m in models]
        average = np.mean(preds, axis=0)
        out.append(float((np.mean((average[:, 0] - d) ** 2) + np.mean((average[:, 1] - f) ** 2)) / 2))
    return out


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> tuple[list[SeedResult], list[torch.nn.Module]]:
    """Three retrain seeds as the retrain leaves them (a Tune checkpoint folder each); the third never
    finished its retrain, so it is neither evaluated nor in the ensemble."""
    root = tmp_path_factory.mktemp("retrain")
    cfg = load_config(None, ["model.variant=tiny", "train.precision=fp32", f"data.dir={data_dir}",
                             f"eval.draws={DRAWS}", f"eval.pairs={PAIRS}", f"eval.seed={EVAL_SEED}"])  # fmt: skip
    rows, models = [], []
    for i, seed in enumerate((1000, 1001, 1002)):
        torch.manual_seed(seed)
        model = build_model(cfg.model)
        folder = root / f"train_trial_{seed}" / "checkpoint_000001"
        folder.mkdir(parents=True)
        ckpt.save({"config": cfg.to_dict(), "model": model.state_dict(), "epoch": 1}, folder / ckpt.FILENAME)
        whole = i < 2
        rows.append(SeedResult(seed, 0.01 + i, None, {}, str(folder), "" if whole else "RuntimeError: lost",
                               str(folder.parent), samples=640, finished=whole))  # fmt: skip
        models.append(model)
    return rows, models


def test_report_ensemble_equals_numpy_averaged_predictions(seeds, data_dir: Path) -> None:
    rows, models = seeds
    evaluation = evaluate_seeds(rows, device="cpu")
    ensemble = evaluation.ensemble
    assert ensemble is not None and ensemble.seeds == [1000, 1001]  # the seed that did not finish is out
    assert sorted(evaluation.seeds) == [1000, 1001]
    assert ensemble.checkpoints == [rows[0].checkpoint, rows[1].checkpoint]
    rows = evaluation.apply(rows)
    r = build_report(None, RetrainSummary(rows, best=rows[0], ensemble=ensemble), {}, wall_s=1.0)

    digit, fashion = load_test(load_config(None, [f"data.dir={data_dir}"]).data)
    expected = numpy_ensemble_mse(models[:2], digit, fashion)
    np.testing.assert_allclose(r["test_mse_ensemble_per_draw"], expected, rtol=1e-5)
    assert r["test_mse_ensemble"] == pytest.approx(np.mean(expected), rel=1e-5)
    assert r["test_mse_ensemble_std"] == pytest.approx(np.std(expected), rel=1e-3)  # over draws, ddof=0
    # Convexity of the squared error: the average of two different models beats their mean single MSE.
    singles = [np.mean(numpy_ensemble_mse([m], digit, fashion)) for m in models[:2]]
    assert r["test_mse_ensemble"] < np.mean(singles)
    assert "ensemble of 2 seeds (averaged predictions" in render_markdown(r)


def test_one_pass_gives_each_seed_what_the_one_model_protocol_gives(seeds, data_dir: Path) -> None:
    """The joint pass scores each seed exactly as bss-evaluate scores its checkpoint alone (same draws, same
    batches), and the mix baseline with it."""
    rows, models = seeds
    evaluation = evaluate_seeds(rows, device="cpu")
    digit, fashion = load_test(load_config(None, [f"data.dir={data_dir}"]).data)
    for i, row in enumerate(rows[:2]):
        alone = evaluate_checkpoint(Path(row.checkpoint) / ckpt.FILENAME, device="cpu")
        joint = evaluation.seeds[row.seed]
        assert joint["test_mse_per_draw"] == pytest.approx(alone["test_mse_per_draw"], rel=1e-6)
        assert joint["baseline_mix_mse_mean"] == pytest.approx(alone["baseline_mix_mse_mean"], rel=1e-9)
        expected = numpy_ensemble_mse([models[i]], digit, fashion)
        np.testing.assert_allclose(joint["test_mse_per_draw"], expected, rtol=1e-5)
    applied = evaluation.apply(rows)
    assert applied[0].test_mse_mean == evaluation.seeds[1000]["test_mse_mean"] and applied[2].test_mse_mean is None
    assert applied[0].metrics["protocol_draws"] == DRAWS and "test_mse_per_draw" not in applied[0].metrics


def test_no_finished_seed_no_evaluation(seeds) -> None:
    rows, _ = seeds
    evaluation = evaluate_seeds([rows[2]], device="cpu")
    assert evaluation.ensemble is None and evaluation.seeds == {}
