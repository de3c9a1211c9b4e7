"""Tests for bss_model.model: the reference network's size, every variant's shapes, the consistent head, FLOPs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from bss_model.config import ModelConfig, config_from_dict
from bss_model.model import (
    AttentionGate,
    BilinearUp,
    ConvBlock,
    ResidualBlock,
    build_model,
    count_parameters,
    forward_flops,
)
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


def test_published_wide_parameters_by_hand() -> None:
    cfg = model_config("published-wide")
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
    assert count_parameters(model) == expected == 7_445_270  # the peer's Keras count: 8,272,130 (variants.py)
    widths = [d.convs[0].out_channels for d in model.encoders] + [model.bottleneck[0].out_channels]
    assert widths == [128, 256, 512]
    assert isinstance(model.output, nn.ReLU)
    # The variant's name before issue 22 still builds the same shape (its configs and checkpoints load).
    assert VARIANTS["published-shape"] == VARIANTS["published-wide"]


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


# --------------------------------------------------------------------------------------
# The family's other parts: residual units, attention gates, dilation, bilinear up-sampling


def _zero_convs_(module: nn.Module) -> None:
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.zero_()
                if m.bias is not None:
                    m.bias.zero_()


def test_the_defaults_build_every_existing_variant_as_before() -> None:
    """model.block/attention/dilation/upsample at their defaults add nothing: the sizes before issue 22, and no
    parameter of the new parts, so checkpoints written before them load."""
    before = {"seed": 3_684_214, "seed-bn-consistent": 3_686_198, "published-shape": 7_445_270, "deep": 3_536_374,
              "tiny": 29_462}  # fmt: skip
    for variant, n in before.items():
        cfg = model_config(variant)
        assert (cfg.block, cfg.attention, cfg.dilation, cfg.upsample) == ("plain", "none", [1], "transpose")
        model = build_model(cfg)
        assert count_parameters(model) == n, variant
        new_parts = [k for k in model.state_dict() if any(p in k for p in ("gate", "shortcut", "body", "up.conv"))]
        assert not new_parts, new_parts
        assert all(m.dilation == (1, 1) for m in model.modules() if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize("norm", ["none", "batch"])
def test_conv_block_dilation_keeps_the_size_and_the_parameters(norm: str) -> None:
    block = ConvBlock(3, 5, 4, norm, dilation=[1, 2, 4])
    convs = [m for m in block if isinstance(m, nn.Conv2d)]
    assert [c.dilation[0] for c in convs] == [1, 2, 4, 1]  # the rates repeat over the convs
    assert [c.padding[0] for c in convs] == [1, 2, 4, 1]
    per_conv = 2 * 5 if norm == "batch" else 5  # BN's scale and shift, or the conv's bias
    assert count_parameters(block) == 9 * 3 * 5 + 3 * 9 * 5 * 5 + 4 * per_conv
    assert count_parameters(block) == count_parameters(ConvBlock(3, 5, 4, norm))
    assert block(torch.rand(2, 3, 8, 8)).shape == (2, 5, 8, 8)


def test_a_dilated_conv_reaches_as_far_as_its_rate() -> None:
    """A rate-d 3x3 conv reads the pixels d away (and not those in between): the receptive field in model.py."""
    conv = ConvBlock(1, 1, 1, dilation=[3])[0]
    x = torch.zeros(1, 1, 9, 9, requires_grad=True)
    conv(x)[0, 0, 4, 4].backward()
    reached = (x.grad[0, 0] != 0).nonzero().tolist()
    assert sorted(reached) == [[r, c] for r in (1, 4, 7) for c in (1, 4, 7)]


@pytest.mark.parametrize(("norm", "c_in", "c_out"), [("none", 4, 4), ("none", 3, 5), ("batch", 4, 4), ("batch", 3, 5)])
def test_residual_block_shape_and_parameters_by_hand(norm: str, c_in: int, c_out: int) -> None:
    block = ResidualBlock(c_in, c_out, 3, norm)
    bias = norm == "none"
    convs = 9 * c_in * c_out + 2 * 9 * c_out * c_out + (3 * c_out if bias else 0)
    bns = (2 * c_in + 2 * 2 * c_out) if norm == "batch" else 0  # pre-activation: BN on each conv's *input*
    projection = 0 if c_in == c_out else c_in * c_out + (c_out if bias else 0)
    assert count_parameters(block) == convs + bns + projection
    assert isinstance(block.shortcut, nn.Identity) == (c_in == c_out)
    assert block(torch.rand(2, c_in, 8, 8)).shape == (2, c_out, 8, 8)


@pytest.mark.parametrize(("norm", "c_in", "c_out"), [("none", 4, 4), ("none", 3, 5), ("batch", 4, 4), ("batch", 3, 5)])
def test_a_residual_block_with_zeroed_convs_is_the_identity_or_its_projection(norm: str, c_in: int, c_out: int):
    block = ResidualBlock(c_in, c_out, 2, norm, dilation=[1, 2])
    x = torch.randn(2, c_in, 8, 8)  # negative values too: a ReLU after the sum would show
    with torch.no_grad():
        assert (block(x) - (x if c_in == c_out else block.shortcut(x))).abs().max() > 1e-3  # the branch counts...
        for m in block.body.modules():  # ... until its convs are zero
            if isinstance(m, nn.Conv2d):
                m.weight.zero_()
                if m.bias is not None:
                    m.bias.zero_()
        y = block(x)
        torch.testing.assert_close(y, x if c_in == c_out else block.shortcut(x), atol=0, rtol=0)


def test_the_first_residual_unit_takes_the_image_as_it_is() -> None:
    """No batch norm + ReLU before the network's first conv: it would zero every pixel darker than the mean."""
    model = build_model(model_config("tiny", block="residual", norm="batch", encoder_convs=2))
    first, inner = model.encoders[0].convs, model.encoders[1].convs
    assert [type(m) for m in first.body] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Conv2d]
    assert [type(m) for m in inner.body] == [nn.BatchNorm2d, nn.ReLU, nn.Conv2d] * 2  # later units pre-activate


def test_attention_gate_parameters_shape_and_coefficients_in_unit_interval() -> None:
    gate = AttentionGate(6, 10)  # c_int = 3: half the skip's channels
    assert count_parameters(gate) == 6 * 3 + (10 * 3 + 3) + (3 + 1)  # theta (no bias), phi, psi
    torch.manual_seed(1)
    _randomize(gate, std=1.0)  # weights of both signs, and large inputs: the sigmoid saturates at both ends
    skip, g = 20 * torch.randn(4, 6, 8, 8), 20 * torch.randn(4, 10, 8, 8)
    a = gate.coefficients(skip, g).detach()
    assert a.shape == (4, 1, 8, 8)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert float(a.min()) < 0.05 and float(a.max()) > 0.95, "the check needs coefficients near both ends"
    torch.testing.assert_close(gate(skip, g), skip * a)


def test_a_gate_forced_fully_open_reproduces_the_ungated_skip() -> None:
    gate = AttentionGate(6, 10)
    skip, g = torch.randn(2, 6, 8, 8), torch.randn(2, 10, 8, 8)
    assert not torch.allclose(gate(skip, g), skip)
    with torch.no_grad():
        gate.psi.weight.zero_()
        gate.psi.bias.fill_(100.0)  # sigmoid(100) is 1.0 in float32
    torch.testing.assert_close(gate(skip, g), skip, atol=0, rtol=0)
    # And a whole U-Net whose gates are all open is the ungated U-Net with the same weights.
    gated, plain = (build_model(model_config("tiny", norm="batch", attention=a)) for a in ("gate", "none"))
    _randomize(plain, std=0.05)
    result = gated.load_state_dict(plain.state_dict(), strict=False)
    assert not result.unexpected_keys and all(".gate." in k for k in result.missing_keys)
    for up in gated.decoders:
        with torch.no_grad():
            up.gate.psi.weight.zero_()
            up.gate.psi.bias.fill_(100.0)
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(gated.eval()(x), plain.eval()(x), atol=0, rtol=0)


def test_bilinear_up_shape_parameters_and_what_it_computes() -> None:
    up = BilinearUp(6, 4)
    assert count_parameters(up) == 9 * 6 * 4 + 4
    x = torch.rand(2, 6, 4, 4)
    y = up(x)
    assert y.shape == (2, 4, 8, 8)
    expected = F.conv2d(F.interpolate(x, size=(8, 8), mode="bilinear"), up.conv.weight, up.conv.bias, padding=1)
    torch.testing.assert_close(y, expected)
    # Against the transposed conv it replaces: 9 instead of 4 weights per channel pair.
    assert count_parameters(nn.ConvTranspose2d(6, 4, 2, stride=2)) == 4 * 6 * 4 + 4


def test_the_new_variants_parameters_by_hand() -> None:
    def gates(c_skips: list[int], c_gates: list[int]) -> int:
        return sum(s * (s // 2) + g * (s // 2) + s // 2 + s // 2 + 1 for s, g in zip(c_skips, c_gates, strict=True))

    base = count_parameters(build_model(model_config("seed-bn-consistent")))
    attention = build_model(model_config("attention-unet"))
    assert count_parameters(attention) == base + gates([64, 32], [256, 128]) == 3_699_096
    # residual-unet: a 1x1 projection per level (no bias with BN); BN moves from each conv's output to its input.
    levels = [(1, 32, 2), (32, 64, 2), (64, 128, 2), (256 + 64, 256, 4), (128 + 32, 128, 4)]  # (c_in, c_out, n)
    projections = sum(c_in * c_out for c_in, c_out, _ in levels)
    bn_out = sum(2 * c_out * n for _, c_out, n in levels)
    bn_in = sum(2 * (c_in + (n - 1) * c_out) for c_in, c_out, n in levels) - 2 * 1  # none before the image
    residual = build_model(model_config("residual-unet"))
    assert count_parameters(residual) == base + projections - bn_out + bn_in == 3_798_806
    for cfg in (model_config("attention-unet"), model_config("residual-unet")):
        assert (cfg.norm, cfg.head, cfg.output) == ("batch", "consistent", "relu")


@pytest.mark.parametrize(
    "parts",
    [{"block": "residual"}, {"attention": "gate"}, {"dilation": [1, 2, 4], "bottleneck_convs": 3},
     {"upsample": "bilinear"}, {"block": "residual", "attention": "gate", "dilation": [2], "upsample": "bilinear"}],
    ids=["residual", "gate", "dilation", "bilinear", "all"],
)  # fmt: skip
@pytest.mark.parametrize("norm", ["none", "batch"])
def test_every_part_trains_at_every_depth(parts: dict, norm: str) -> None:
    for depth in (1, 3):
        _check_runs(model_config("tiny", filters=4, depth=depth, norm=norm, **parts))
    _check_runs(model_config("tiny", filters=4, **{**parts, "bottleneck_convs": 0}))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_the_size_check_counts_the_new_parts(variant: str) -> None:
    """approx_weights (the config's no-device-could-hold-it check) knows every part, without building the model."""
    from bss_model.config import approx_weights

    for parts in ({}, {"block": "residual", "attention": "gate", "upsample": "bilinear"}):
        cfg = model_config(variant, **parts)
        assert approx_weights(cfg) == pytest.approx(count_parameters(build_model(cfg)), rel=0.01), parts
