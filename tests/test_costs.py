"""The costs beside val MSE (search/costs.py) on a tiny U-Net: params and macs against hand counts, cpu_ms real."""

from __future__ import annotations

import math

import torch

from bss_model.config import ModelConfig
from bss_model.model import build_model
from bss_model.runtime import cpu_has_native_bf16
from search.costs import count_macs, cpu_model, latency_ms, model_costs

# One level, one conv everywhere, two filters: small enough to count by hand.
TINY = ModelConfig(filters=2, depth=1, encoder_convs=1, bottleneck_convs=1, decoder_convs=1, decoder_mult=1)
# (params, multiply-accumulates at 32x32) per layer: weights + biases; output pixels x c_out x c_in/groups x k^2
# (a transposed conv: input pixels x c_in x c_out x k^2).
HAND = {
    "encoder conv 1->2, 3x3 at 32x32": (1 * 2 * 9 + 2, 32 * 32 * 2 * 1 * 9),
    "bottleneck conv 2->4, 3x3 at 16x16": (2 * 4 * 9 + 4, 16 * 16 * 4 * 2 * 9),
    "up: transposed conv 4->2, 2x2 stride 2 from 16x16": (4 * 2 * 4 + 2, 16 * 16 * 4 * 2 * 4),
    "decoder conv (2+2)->2, 3x3 at 32x32": (4 * 2 * 9 + 2, 32 * 32 * 2 * 4 * 9),
    "head 1x1 conv 2->2": (2 * 2 + 2, 32 * 32 * 2 * 2),
    "head depthwise 3x3, groups 2": (2 * 9 + 2, 32 * 32 * 2 * 1 * 9),
}


def test_params_and_macs_match_the_hand_count():
    costs = model_costs(TINY)
    assert costs == {"params": sum(p for p, _ in HAND.values()), "macs": sum(m for _, m in HAND.values())}
    assert costs == {"params": 230, "macs": 141_312}  # the sums above, written out


def test_macs_are_per_sample_and_leave_the_model_as_it_was():
    model = build_model(TINY).train()
    assert count_macs(model) == 141_312 and model.training
    wider = ModelConfig(**{**TINY.__dict__, "filters": 4})  # the same layers, twice as wide inside
    by_hand = (
        32 * 32 * 4 * 9
        + 16 * 16 * 8 * 4 * 9
        + 16 * 16 * 8 * 4 * 4
        + 32 * 32 * 4 * 8 * 9
        + 32 * 32 * 2 * 4
        + 32 * 32 * 2 * 9
    )
    assert model_costs(wider)["macs"] == by_hand == 464_896


def test_cpu_ms_is_positive_finite_and_says_what_it_holds_for():
    threads = torch.get_num_threads()
    costs = model_costs(TINY, measure=("cpu_ms",), batch=4, repeats=2)
    assert math.isfinite(costs["cpu_ms"]) and costs["cpu_ms"] > 0
    assert costs["latency_batch"] == 4 and costs["cpu_model"] == cpu_model() and cpu_model()
    assert costs["cpu_precision"] == ("bf16" if cpu_has_native_bf16() else "fp32")  # what auto picks here
    assert torch.get_num_threads() == threads  # the timer's one thread was given back


def test_a_bigger_batch_takes_longer():
    model = build_model(ModelConfig(filters=8, depth=2, encoder_convs=1, bottleneck_convs=1, decoder_convs=1))
    one, _ = latency_ms(model, "cpu", batch=1, repeats=3, min_run_time=0.05)
    many, _ = latency_ms(model, "cpu", batch=64, repeats=3, min_run_time=0.05)
    assert many > 4 * one, (one, many)  # 64x the work; far more than the noise of a shared machine
