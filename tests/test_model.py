"""Tests for bss_model.model: the reference network's size, every variant's shapes, the consistent head, FLOPs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from bss_model.config import ModelConfig, config_from_dict
from bss_model.model import build_model, count_parameters, forward_flops
from bss_model.variants import VARIANTS


def model_config(variant: str = "seed", **overrides: object) -> ModelConfig:
    """A validated ModelConfig, built the way a user's config is (preset, then explicit keys)."""
    return config_from_dict({"model": {"variant": variant, **overrides}}).model


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


def test_seed_variant_is_the_reference_network() -> None:
    model = build_model(model_config("seed"))
    assert count_parameters(model) == 3_684_214
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (3, 2, 32, 32) and y.dtype == torch.float32
    assert torch.isfinite(y).all()


def _check_runs(cfg: ModelConfig, batch: int = 2) -> None:
    model = build_model(cfg)
    x = torch.rand(batch, 1, 32, 32)
    model.train()
    y = model(x)
    assert y.shape == (batch, 2, 32, 32)
    assert torch.isfinite(y).all()
    # Training works end to end: every parameter receives a gradient.
    nn.functional.mse_loss(y, torch.rand_like(y)).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"
    model.eval()
    with torch.no_grad():
        assert model(x[:1]).shape == (1, 2, 32, 32)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_builds_and_runs(variant: str) -> None:
    cfg = model_config(variant)
    assert {k: getattr(cfg, k) for k in VARIANTS[variant]} == VARIANTS[variant]
    _check_runs(cfg)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("depth", [1, 3, 5])
@pytest.mark.parametrize("norm", ["none", "batch"])
def test_variants_at_other_depths_and_norms(variant: str, depth: int, norm: str) -> None:
    # Narrow (filters=4) so depth 5 stays small: the widths double per level.
    cfg = model_config(variant, filters=4, depth=depth, norm=norm)
    _check_runs(cfg)
    model = build_model(cfg)
    has_bn = any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert has_bn == (norm == "batch")
    assert len(model.encoders) == depth and len(model.decoders) == depth


@pytest.mark.parametrize("head", ["depthwise", "consistent"])
def test_no_bottleneck_and_single_convs(head: str) -> None:
    _check_runs(model_config("tiny", bottleneck_convs=0, encoder_convs=1, decoder_convs=1, head=head))


def test_widths_follow_the_config() -> None:
    cfg = model_config("seed")
    model = build_model(cfg)
    enc_widths = [down.convs[0].out_channels for down in model.encoders]
    assert enc_widths == [cfg.filters * 2**i for i in range(cfg.depth)]
    dec_widths = [up.up.out_channels for up in model.decoders]
    assert dec_widths == [cfg.decoder_mult * w for w in reversed(enc_widths)]
    # Changing one field changes the parameter count (the field is really used).
    base = count_parameters(model)
    for field, value in (("filters", 16), ("depth", 3), ("decoder_convs", 2), ("decoder_mult", 2)):
        assert count_parameters(build_model(dataclasses.replace(cfg, **{field: value}))) != base, field


def _randomize(model: nn.Module, std: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)


@pytest.mark.parametrize("variant", ["tiny", "seed-bn-consistent"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_consistent_head_reconstructs_the_mixture(variant: str, seed: int) -> None:
    torch.manual_seed(seed)
    model = build_model(model_config(variant, head="consistent"))
    _randomize(model, std=0.05)
    x = torch.rand(4, 1, 32, 32)
    for mode in (model.train, model.eval):
        mode()
        with torch.no_grad():
            y = model(x)
        assert y.abs().max() > 1e-3, "degenerate output would make the check vacuous"
        torch.testing.assert_close((y[:, 0:1] + y[:, 1:2]) / 2, x, atol=1e-6, rtol=0)
    # The components themselves are not the mixture: the head splits it, it does not copy it.
    assert not torch.allclose(y[:, 0:1], x, atol=1e-3)


def test_consistent_head_holds_for_large_random_weights_in_float64() -> None:
    model = build_model(model_config("tiny", head="consistent")).double()
    _randomize(model, std=0.5)
    x = torch.rand(4, 1, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        y = model(x)
    assert y.abs().max() > 1.0
    torch.testing.assert_close((y[:, 0:1] + y[:, 1:2]) / 2, x, atol=1e-9 * float(y.abs().max()), rtol=0)


def test_depthwise_head_does_not_reconstruct_the_mixture() -> None:
    # The control for the test above: without the projection the identity does not hold.
    model = build_model(model_config("tiny", head="depthwise"))
    _randomize(model, std=0.05)
    x = torch.rand(4, 1, 32, 32)
    with torch.no_grad():
        y = model(x)
    assert not torch.allclose((y[:, 0:1] + y[:, 1:2]) / 2, x, atol=1e-3)


# --------------------------------------------------------------------------------------
# FLOPs


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_forward_flops_matches_torch_flop_counter(variant: str) -> None:
    model = build_model(model_config(variant))
    counter = FlopCounterMode(display=False)
    model.eval()
    with counter, torch.no_grad():
        model(torch.zeros(1, 1, 32, 32))
    flops = forward_flops(model)
    assert flops > 0
    assert flops == counter.get_total_flops()


def test_forward_flops_by_hand() -> None:
    # conv 3x3, 1 -> 4 channels on 32x32: 2 * 4 * 32 * 32 * (1 * 9)
    assert forward_flops(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1))) == 2 * 4 * 32 * 32 * 9
    # grouped: each output channel sees in_channels / groups inputs
    grouped = nn.Sequential(nn.Conv2d(1, 4, 1), nn.Conv2d(4, 4, 3, padding=1, groups=2))
    assert forward_flops(grouped) == 2 * 4 * 32 * 32 * 1 + 2 * 4 * 32 * 32 * 2 * 9
    # transposed 2x2 stride 2, 1 -> 3 channels: each input pixel scatters into 3 * 4 outputs
    assert forward_flops(nn.Sequential(nn.ConvTranspose2d(1, 3, 2, stride=2))) == 2 * 1 * 32 * 32 * 3 * 4


def test_forward_flops_scales_with_width() -> None:
    seed = model_config("seed")
    base = forward_flops(build_model(seed))
    assert 2.5e9 < base < 3.0e9  # ~2.73 GFLOP per 32x32 sample for the reference network
    doubled = forward_flops(build_model(dataclasses.replace(seed, filters=2 * seed.filters)))
    # Almost every conv has both in- and out-width proportional to filters: ~4x.
    assert 3.8 < doubled / base <= 4.0
    # Leaves the model in the mode it found it in.
    model = build_model(seed)
    model.train()
    forward_flops(model)
    assert model.training


# --------------------------------------------------------------------------------------
# Output activation and the published shape


@pytest.mark.parametrize("variant", ["seed", "tiny"])
def test_relu_output_is_the_relu_of_the_plain_output(variant: str) -> None:
    plain = build_model(model_config(variant))
    relu = build_model(model_config(variant, output="relu"))
    assert count_parameters(relu) == count_parameters(plain)
    _randomize(plain, std=0.05)
    relu.load_state_dict(plain.state_dict())  # same keys: the activation holds no state
    x = torch.rand(4, 1, 32, 32)
    with torch.no_grad():
        y_plain, y_relu = plain(x), relu(x)
    assert (y_plain < 0).any() and (y_plain > 0).any(), "the check needs outputs of both signs"
    torch.testing.assert_close(y_relu, y_plain.clamp(min=0), atol=0, rtol=0)
    _check_runs(model_config(variant, output="relu"))


def test_seed_keeps_the_reference_size_with_a_relu_output() -> None:
    assert count_parameters(build_model(model_config("seed", output="relu"))) == 3_684_214
    assert model_config("seed").output == "none"


def test_consistent_head_with_relu_clips_after_the_projection() -> None:
    torch.manual_seed(3)
    plain = build_model(model_config("tiny", head="consistent"))
    _randomize(plain, std=0.05)
    relu = build_model(model_config("tiny", head="consistent", output="relu"))
    relu.load_state_dict(plain.state_dict())
    x = torch.rand(4, 1, 32, 32)
    with torch.no_grad():
        y_plain, y = plain(x), relu(x)
    assert (y >= 0).all()
    clipped = (y_plain < 0).any(dim=1, keepdim=True)
    assert clipped.any() and (~clipped).any(), "the check needs clipped and unclipped pixels"
    # Mixture consistency holds exactly wherever neither component was clipped...
    mean = (y[:, 0:1] + y[:, 1:2]) / 2
    torch.testing.assert_close(mean[~clipped], x[~clipped], atol=1e-6, rtol=0)
    # ...and the clipped pixels are the projection's, clamped (the ReLU is not applied before it).
    torch.testing.assert_close(y, y_plain.clamp(min=0), atol=0, rtol=0)


def _conv(c_in: int, c_out: int, k: int, bias: bool) -> int:
    return c_in * c_out * k * k + (c_out if bias else 0)


def test_published_shape_parameters_by_hand() -> None:
    cfg = model_config("published-shape")
    assert (cfg.filters, cfg.depth, cfg.norm, cfg.output, cfg.decoder_mult) == (128, 2, "batch", "relu", 1)

    def block(c_in: int, c_out: int) -> int:  # 2 x (conv3x3 without bias, BN with weight and bias)
        return _conv(c_in, c_out, 3, False) + 2 * c_out + _conv(c_out, c_out, 3, False) + 2 * c_out

    expected = (
        block(1, 128) + block(128, 256)  # encoders
        + block(256, 512)  # bottleneck
        + _conv(512, 256, 2, True) + block(512, 256)  # up: transposed conv, then convs on [up, skip]
        + _conv(256, 128, 2, True) + block(256, 128)
        + _conv(128, 2, 1, True) + 2 * 9 + 2  # head: 1x1 to 2 channels, depthwise 3x3
    )  # fmt: skip
    model = build_model(cfg)
    assert count_parameters(model) == expected
    widths = [d.convs[0].out_channels for d in model.encoders] + [model.bottleneck[0].out_channels]
    assert widths == [128, 256, 512]
    assert isinstance(model.output, nn.ReLU)


def keras_glorot_bound(m: nn.Module) -> float:
    """Keras's glorot-uniform bound, computed from *Keras's* kernel layout for the same layer."""
    k = m.kernel_size[0] * m.kernel_size[1]
    if isinstance(m, nn.ConvTranspose2d):  # Keras Conv2DTranspose kernel (kh, kw, out, in)
        fan_in, fan_out = k * m.out_channels, k * m.in_channels
    elif m.groups == m.in_channels == m.out_channels > 1:  # DepthwiseConv2D kernel (kh, kw, in, 1)
        fan_in, fan_out = k * m.in_channels, k
    else:  # Conv2D kernel (kh, kw, in, out)
        fan_in, fan_out = k * m.in_channels, k * m.out_channels
    return (6 / (fan_in + fan_out)) ** 0.5


@pytest.mark.parametrize("variant", ["seed", "seed-bn-consistent"])
def test_keras_init_draws_glorot_uniform_kernels_and_zero_biases(variant: str) -> None:
    torch.manual_seed(0)
    model = build_model(model_config(variant, init="keras"))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)]
    assert any(isinstance(m, nn.ConvTranspose2d) for m in convs) and any(m.groups > 1 for m in convs)
    for m in convs:
        bound, w = keras_glorot_bound(m), m.weight.detach()
        assert float(w.abs().max()) <= bound
        if w.numel() >= 4000:  # uniform on [-b, b]: std b / sqrt(3)
            assert float(w.std()) == pytest.approx(bound / 3**0.5, rel=0.05), m
        assert m.bias is None or not m.bias.any()
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        assert bool((bn.weight == 1).all()) and not bn.bias.any()


def test_torch_init_is_the_default_and_keras_init_is_another_draw() -> None:
    def weights(**kw) -> list[torch.Tensor]:
        torch.manual_seed(0)
        return [p.detach().clone() for p in build_model(model_config("seed", **kw)).parameters()]

    default, torch_init, keras = weights(), weights(init="torch"), weights(init="keras")
    assert all(torch.equal(a, b) for a, b in zip(default, torch_init, strict=True))
    assert not any(torch.equal(a, b) for a, b in zip(default, keras, strict=True) if a.ndim == 4)
    # a 3x3 conv with as many inputs as outputs: torch's bound is 1/sqrt(9c), Keras's sqrt(1/(3c))
    deep = [(a, b) for a, b in zip(default, keras, strict=True) if a.ndim == 4 and a.shape[1] == a.shape[0] >= 64]
    assert deep and all(float(b.std() / a.std()) == pytest.approx(3**0.5, rel=0.05) for a, b in deep)
