"""The U-Net family: parts first, then an assembly whose ``forward`` reads like the diagram.

Widths and depths are parameters (the search tunes them). With the ``seed``
variant the network is the reference Keras model exactly (3,684,214 parameters):

    x ─ Enc(32) ──────────────────────────────┐ skip
         └ pool ─ Enc(64) ─────────────┐ skip │
                   └ pool ─ Bottleneck(128)   │
                         Up(256) ← convT ─ cat┘ ─ 4 convs
                         Up(128) ← convT ─ cat ─┘ ─ 4 convs
                         Head: 1x1 conv → 2 ch → depthwise 3x3
                         [Output: ReLU, if model.output = relu]

The other parts of the family, each off by default (the defaults build exactly the network above):

- ``model.block = residual``: every level's convs are one pre-activation residual unit (ResidualBlock).
- ``model.attention = gate``: each skip passes an additive attention gate (AttentionGate) before the concat.
- ``model.dilation``: dilation rates of the bottleneck's convs ([1, 2, 4]), repeated over its convs.
- ``model.upsample = bilinear``: bilinear x2 then a 3x3 conv (BilinearUp), in place of the transposed conv.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bss_model.config import ModelConfig


def _rate(dilation: Sequence[int], i: int) -> int:
    """Conv ``i``'s dilation: the rates repeat over a block's convs ([1, 2] over 3 convs: 1, 2, 1)."""
    return dilation[i % len(dilation)]


class ConvBlock(nn.Sequential):
    """``n`` x (conv3x3 → [BatchNorm] → ReLU), 'same' padding so 32x32 stays 32x32.

    ``dilation``: the convs' rates (padding = rate keeps the size). A 3x3 conv of rate d at a level
    whose pixels are s input pixels apart widens the receptive field by 2·d·s input pixels.
    """

    def __init__(self, c_in: int, c_out: int, n: int, norm: str = "none", dilation: Sequence[int] = (1,)) -> None:
        layers: list[nn.Module] = []
        for i in range(n):
            d = _rate(dilation, i)
            # With batch norm the conv bias is redundant (BN's shift replaces it).
            layers.append(nn.Conv2d(c_in if i == 0 else c_out, c_out, 3, padding=d, dilation=d, bias=norm == "none"))
            if norm == "batch":
                layers.append(nn.BatchNorm2d(c_out))
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class ResidualBlock(nn.Module):
    """A pre-activation residual unit (He et al. 2016, "Identity Mappings in Deep Residual Networks"):
    ``n`` x ([BatchNorm] → ReLU → conv3x3) on a branch, added to the input, or to its 1x1 projection
    where the widths differ.

    Pre- rather than post-activation: nothing follows the addition, so the shortcut is a clean identity
    (a unit whose branch outputs zero is exactly the identity, or its projection; gradients reach every
    level unscaled), as in ResUNet (Zhang et al. 2018), the residual U-Net built from these units. The
    network's first unit sees the image itself: its first conv is not pre-activated (``preactivate=False``),
    as ResNet-v2's and ResUNet's first units, since batch norm + ReLU on the raw mixture would zero every
    pixel darker than the batch mean. A level's ``n`` convs are one unit, so a residual level has the
    plain level's convs (and receptive field) plus at most one 1x1 projection.
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        n: int,
        norm: str = "none",
        dilation: Sequence[int] = (1,),
        preactivate: bool = True,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(n):
            c = c_in if i == 0 else c_out
            if i > 0 or preactivate:
                if norm == "batch":
                    layers.append(nn.BatchNorm2d(c))
                # Not in place on the unit's input: the shortcut reads it too.
                layers.append(nn.ReLU(inplace=i > 0 or norm == "batch"))
            d = _rate(dilation, i)
            # Biases are redundant with batch norm here too: every unit's sum reaches a BN (the next unit's,
            # through pooling or the concat) or the head, whose own bias absorbs a constant.
            layers.append(nn.Conv2d(c, c_out, 3, padding=d, dilation=d, bias=norm == "none"))
        self.body = nn.Sequential(*layers)
        self.shortcut = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1, bias=norm == "none")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The branch first: a sum takes its first operand's memory layout, and the shortcut of the 1-channel
        # image (whose layout is ambiguous) comes out NCHW, which made every later level of a channels_last
        # network NCHW too: 0.72x the plain block's training throughput on this CPU, against ~1x in this order.
        return self.body(x) + self.shortcut(x)


def conv_block(
    block: str,
    c_in: int,
    c_out: int,
    n: int,
    norm: str,
    dilation: Sequence[int] = (1,),
    image_input: bool = False,
) -> nn.Module:
    """A level's ``n`` convs as ``model.block`` builds them; ``n = 0`` is the identity (no bottleneck convs)."""
    if n == 0:
        return nn.Identity()
    if block == "residual":
        return ResidualBlock(c_in, c_out, n, norm, dilation, preactivate=not image_input)
    return ConvBlock(c_in, c_out, n, norm, dilation)


class AttentionGate(nn.Module):
    """An additive attention gate on a skip connection (Attention U-Net, Oktay et al. 2018):

        α = sigmoid(psi(ReLU(theta(skip) + phi(g))))      one coefficient in [0, 1] per pixel
        gated skip = α · skip

    ``g`` is the gating signal from the coarser level: here the decoder's up-sampled feature, which is
    on the skip's grid already (as in the common PyTorch port), so neither the strided theta nor the
    resampling of α of the paper's version is needed. theta, phi and psi are 1x1 convs through
    ``c_int`` channels (half the skip's, as in the paper's experiments); no batch norm, as in the paper's
    gate. α = 1 everywhere is the ungated skip (``psi`` with zero weights and a large bias).
    """

    def __init__(self, c_skip: int, c_gate: int, c_int: int | None = None) -> None:
        super().__init__()
        c_int = c_int or max(1, c_skip // 2)
        self.theta = nn.Conv2d(c_skip, c_int, 1, bias=False)  # phi's bias serves both
        self.phi = nn.Conv2d(c_gate, c_int, 1)
        self.psi = nn.Conv2d(c_int, 1, 1)

    def coefficients(self, skip: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.psi(F.relu(self.theta(skip) + self.phi(g))))

    def forward(self, skip: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return skip * self.coefficients(skip, g)


class NoGate(nn.Module):
    """``model.attention = none``: the skip passes as it is (no parameters: old checkpoints load)."""

    def forward(self, skip: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return skip


class BilinearUp(nn.Module):
    """Bilinear x2 up-sampling, then a 3x3 conv to ``c_out`` channels: Odena et al.'s (2016)
    resize-convolution, against the 2x2 stride-2 transposed conv, whose kernels tile the output and can
    leave a checkerboard. Both are linear (no norm, no activation), like the transposed conv here."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))


def up_sampler(upsample: str, c_in: int, c_out: int) -> nn.Module:
    if upsample == "bilinear":
        return BilinearUp(c_in, c_out)
    return nn.ConvTranspose2d(c_in, c_out, 2, stride=2)


class Down(nn.Module):
    """Encoder level: convs at this resolution (the skip), then 2x2 max-pool."""

    def __init__(self, c_in: int, c_out: int, n: int, norm: str, block: str = "plain", first: bool = False) -> None:
        super().__init__()
        self.convs = conv_block(block, c_in, c_out, n, norm, image_input=first)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        skip = self.convs(x)
        return self.pool(skip), skip


class Up(nn.Module):
    """Decoder level: up-sample (2x2 stride-2 transposed conv, or bilinear + conv), gate the skip
    (or not), concat ``[up, skip]``, then convs."""

    def __init__(
        self,
        c_in: int,
        c_skip: int,
        c_out: int,
        n: int,
        norm: str,
        block: str = "plain",
        attention: str = "none",
        upsample: str = "transpose",
    ) -> None:
        super().__init__()
        self.up = up_sampler(upsample, c_in, c_out)
        self.gate = AttentionGate(c_skip, c_out) if attention == "gate" else NoGate()
        self.convs = conv_block(block, c_out + c_skip, c_out, n, norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = self.up(x)
        return self.convs(torch.cat([up, self.gate(skip, up)], dim=1))


class DepthwiseHead(nn.Module):
    """The reference head: 1x1 conv to the 2 components, then a depthwise 3x3 conv."""

    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(c_in, 2, 1)
        self.depthwise = nn.Conv2d(2, 2, 3, padding=1, groups=2)

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.depthwise(self.proj(h))


class ConsistentHead(DepthwiseHead):
    """Mixture-consistency projection on top of the reference head.

    The residual of the estimate is ``r = x - (â + b̂)/2`` (half the residual of the sum,
    ``2x - (â + b̂)``). Adding ``r`` to each component makes ``(â + b̂)/2 == x`` hold
    exactly, so the network only has to learn how to *split* the mixture.
    """

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(h, x)
        residual = x - y.mean(dim=1, keepdim=True)
        return y + residual


HEADS = {"depthwise": DepthwiseHead, "consistent": ConsistentHead}


class UNet(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        widths = [cfg.filters * 2**i for i in range(cfg.depth)]  # encoder widths, shallow → deep
        self.encoders = nn.ModuleList()
        c = 1
        for i, w in enumerate(widths):
            self.encoders.append(Down(c, w, cfg.encoder_convs, cfg.norm, cfg.block, first=i == 0))
            c = w
        # Bottleneck doubles the deepest width (128 for the reference); 0 convs = identity.
        # Its receptive field: after the encoders a bottleneck pixel sees 1 + (2·encoder_convs + 1)·(2**depth - 1)
        # input pixels (16 for the reference), and each bottleneck conv of rate d adds 2·d·2**depth. At depth 2
        # (an 8x8 map): 2 plain convs reach 16 + 2·8 = 32 pixels, half what a corner pixel needs to see the
        # opposite corner (64); dilation [1, 2, 4] over 3 convs reaches 16 + 8·(1 + 2 + 4) = 72, the whole image
        # from every cell, where 3 plain convs reach 40. Rates of at least the map's side (8 here) read only
        # zero padding off the centre tap.
        c_bottom = cfg.filters * 2**cfg.depth if cfg.bottleneck_convs else c
        self.bottleneck = conv_block(cfg.block, c, c_bottom, cfg.bottleneck_convs, cfg.norm, cfg.dilation)
        self.decoders = nn.ModuleList()
        c = c_bottom
        for w in reversed(widths):  # deep → shallow; the reference's decoder is 4x the encoder width
            out = cfg.decoder_mult * w
            self.decoders.append(Up(c, w, out, cfg.decoder_convs, cfg.norm, cfg.block, cfg.attention, cfg.upsample))
            c = out
        self.head = HEADS[cfg.head](c)
        # The output activation comes after the head, so with the consistent head the ReLU clips
        # the *projected* components: both are >= 0, and (digit + fashion)/2 == x still holds
        # exactly wherever neither was clipped -- as for the true sources, which are in [0, 1].
        # (Before the projection it would be undone: adding the residual can make a component
        # negative again.) No parameters: seed stays 3,684,214 with either output.
        self.output = nn.ReLU() if cfg.output == "relu" else nn.Identity()
        if cfg.init == "keras":
            keras_init_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, skips = x, []
        for down in self.encoders:
            h, skip = down(h)
            skips.append(skip)
        h = self.bottleneck(h)
        for up, skip in zip(self.decoders, reversed(skips), strict=True):
            h = up(h, skip)
        return self.output(self.head(h, x))


def keras_init_(model: nn.Module) -> None:
    """Keras's default initialisers, in place: glorot-uniform kernels, zero biases (BN keeps 1 and 0).

    torch's xavier_uniform_ gives Keras's glorot bound sqrt(6 / (fan_in + fan_out)) for every conv
    here: the two libraries lay kernels out differently, but for plain, transposed and depthwise
    convs alike the *sum* of the fans is the same.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def build_model(cfg: ModelConfig) -> UNet:
    return UNet(cfg)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_flops(model: nn.Module, size: int = 32) -> int:
    """Multiply-adds x 2 of one forward pass of one sample (convs and transposed convs).

    Training costs about 3x this (forward + two backward matmuls); the throughput
    benchmark reports achieved GFLOP/s from it.
    """
    flops = 0
    hooks = []

    def conv_hook(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal flops
        k = mod.weight.shape[2] * mod.weight.shape[3]
        c_in_per_group = mod.in_channels // mod.groups
        flops += 2 * out.shape[1] * out.shape[2] * out.shape[3] * c_in_per_group * k

    def convt_hook(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal flops
        x = inp[0]
        k = mod.weight.shape[2] * mod.weight.shape[3]
        flops += 2 * x.shape[1] * x.shape[2] * x.shape[3] * mod.out_channels * k

    for m in model.modules():
        if isinstance(m, nn.ConvTranspose2d):
            hooks.append(m.register_forward_hook(convt_hook))
        elif isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 1, size, size, device=next(model.parameters()).device))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return flops
