"""What a budget's plan is sized from: this hardware's speed, measured for a few seconds before the job starts.

:func:`probe` trains a configuration for a couple of seconds with the threads a trial will have, times one
validation pass and one checkpoint (an epoch's tail), and times the protocol's inference with the threads
the evaluation will have. It runs where the trials will run: in the driver before a local Ray starts, or
as a Ray task with a trial's resources on a cluster (search/pipeline.py). The search measures the real
thing for the winner, and the retrain is planned from that (search/budget.py).

Torch's thread count is process-wide: :func:`torch_threads` sets it for the probe and gives it back.
"""

from __future__ import annotations

import contextlib
import copy
import io
import time
from collections.abc import Iterator

import torch

from bss_model import losses
from bss_model.config import Config
from bss_model.data import PairSampler, Splits, draw_pairs, load_splits
from bss_model.evaluate import batched_mse, model_predictor
from bss_model.model import build_model
from bss_model.runtime import resolve_runtime
from bss_model.step import TrainStep
from search.budget import ACTOR_START_ESTIMATE_S, Speeds

# Pairs of the validation pass the probe times (scaled to data.val_pairs): enough for a steady rate.
PROBE_VAL_PAIRS = 2000


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _rate(run: callable, items_per_call: int, seconds: float) -> float:
    """Items per second of ``run()``, called repeatedly for about ``seconds`` (at least twice)."""
    calls, t0 = 0, time.perf_counter()
    while calls < 2 or time.perf_counter() - t0 < seconds:
        run()
        calls += 1
    return calls * items_per_call / (time.perf_counter() - t0)


def inference_rate(cfg: Config, threads: int, seconds: float = 1.0, model: torch.nn.Module | None = None) -> float:
    """Images per second of ``cfg``'s model applied as the protocol applies it (its runtime, eval.batch_size
    batches) with ``threads`` intra-op threads. The weights do not change the speed: a fresh model serves."""
    from bss_model.evaluate import inference_runtime

    cfg = copy.deepcopy(cfg)
    with torch_threads(threads), torch.no_grad():
        rt = inference_runtime(cfg, cfg.train.device)
        model = rt.prepare_model(model if model is not None else build_model(cfg.model)).eval()
        predict = model_predictor(model, rt)
        x = torch.rand(cfg.eval.batch_size, 1, 32, 32, device=rt.device)
        predict(x)
        return _rate(lambda: float(predict(x).sum()), cfg.eval.batch_size, seconds)


def probe(
    cfg: Config, train_threads: int, eval_threads: int, splits: Splits | None = None, seconds: float = 2.0
) -> Speeds:
    """The speeds of ``cfg`` on this process's hardware (see the module docstring). ``splits``: the data,
    if the caller has it loaded (else it is read here, and its reading counts as part of a trial's setup)."""
    t0 = time.perf_counter()
    splits = splits if splits is not None else load_splits(cfg.data)
    data_s = time.perf_counter() - t0
    t = cfg.train
    with torch_threads(train_threads), torch.no_grad():
        torch.manual_seed(0)
        t0 = time.perf_counter()
        rt = resolve_runtime(t)
        model = rt.prepare_model(build_model(cfg.model))
        sampler = PairSampler(splits.train_digit, splits.train_fashion, rt.device, seed=0)
        step = TrainStep(model, sampler, t, rt, objective=losses.objective(t.loss, t.charbonnier_eps))
        with torch.enable_grad():
            step.run(3)  # oneDNN's primitives, torch.compile, a CUDA graph's capture: a trial's setup
            float(step.loss_sum)
            setup_s = data_s + time.perf_counter() - t0
            steps = max(1, 2048 // t.batch_size)
            train_rate = _rate(lambda: (step.run(steps), float(step.loss_sum)), steps * t.batch_size, seconds)
        val_digit = torch.as_tensor(splits.val_digit, device=rt.device)
        val_fashion = torch.as_tensor(splits.val_fashion, device=rt.device)
        pairs = min(PROBE_VAL_PAIRS, cfg.data.val_pairs)
        idx = draw_pairs(len(val_digit), len(val_fashion), pairs, 0)
        model.eval()
        t0 = time.perf_counter()
        batched_mse(model_predictor(model, rt), val_digit, val_fashion, *idx, cfg.eval.batch_size)
        val_s = (time.perf_counter() - t0) * cfg.data.val_pairs / pairs
        t0 = time.perf_counter()
        torch.save({"model": model.state_dict(), "optimizer": step.opt.state_dict()}, io.BytesIO())
        checkpoint_s = time.perf_counter() - t0
    infer_rate = inference_rate(cfg, eval_threads, seconds / 2, model)
    if rt.device.type == "cuda":  # the driver keeps no GPU memory the trials' shares of the card would miss
        del model, step, sampler, val_digit, val_fashion
        torch.cuda.empty_cache()
    return Speeds(
        train_samples_per_s=train_rate,
        epoch_tail_s=val_s + 2 * checkpoint_s,  # the checkpoint is written, then copied by Tune
        trial_setup_s=setup_s + ACTOR_START_ESTIMATE_S,
        infer_images_per_s=infer_rate,
        batch_size=t.batch_size,
    )
