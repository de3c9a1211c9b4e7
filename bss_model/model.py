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
"""

from __future__ import annotations

import torch
from torch import nn

from bss_model.config import ModelConfig


class ConvBlock(nn.Sequential):
    """``n`` x (conv3x3 → [BatchNorm] → ReLU), 'same' padding so 32x32 stays 32x32."""

    def __init__(self, c_in: int, c_out: int, n: int, norm: str = "none") -> None:
        layers: list[nn.Module] = []
        for i in range(n):
            # With batch norm the conv bias is redundant (BN's shift replaces it).
            layers.append(nn.Conv2d(c_in if i == 0 else c_out, c_out, 3, padding=1, bias=norm == "none"))
            if norm == "batch":
                layers.append(nn.BatchNorm2d(c_out))
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class Down(nn.Module):
    """Encoder level: convs at this resolution (the skip), then 2x2 max-pool."""

    def __init__(self, c_in: int, c_out: int, n: int, norm: str) -> None:
        super().__init__()
        self.convs = ConvBlock(c_in, c_out, n, norm)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        skip = self.convs(x)
        return self.pool(skip), skip


class Up(nn.Module):
    """Decoder level: 2x2 stride-2 transposed conv, concat the skip, then convs."""

    def __init__(self, c_in: int, c_skip: int, c_out: int, n: int, norm: str) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(c_in, c_out, 2, stride=2)
        self.convs = ConvBlock(c_out + c_skip, c_out, n, norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.convs(torch.cat([self.up(x), skip], dim=1))


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
        for w in widths:
            self.encoders.append(Down(c, w, cfg.encoder_convs, cfg.norm))
            c = w
        # Bottleneck doubles the deepest width (128 for the reference); 0 convs = identity.
        c_bottom = cfg.filters * 2**cfg.depth if cfg.bottleneck_convs else c
        self.bottleneck = ConvBlock(c, c_bottom, cfg.bottleneck_convs, cfg.norm)
        self.decoders = nn.ModuleList()
        c = c_bottom
        for w in reversed(widths):  # deep → shallow; the reference's decoder is 4x the encoder width
            self.decoders.append(Up(c, w, cfg.decoder_mult * w, cfg.decoder_convs, cfg.norm))
            c = cfg.decoder_mult * w
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
