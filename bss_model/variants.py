"""Named U-Net variants: presets of ``ModelConfig`` fields.

A config names a variant (``model.variant: seed``); the preset's fields are
applied first and any model key the config sets explicitly overrides them.
This module is pure data so the config layer can use it without importing torch.
"""

from __future__ import annotations

import copy

# The parts every preset states, at the reference's choice unless the preset says otherwise: a variant sets the
# whole shape, so `--set model.variant=seed` (or a trial's variant) on a config that had gates drops them.
PARTS: dict[str, object] = dict(block="plain", attention="none", dilation=[1], upsample="transpose")

_PRESETS: dict[str, dict[str, object]] = {
    # The reference Keras network, exactly: 3,684,214 parameters.
    "seed": dict(
        filters=32,
        depth=2,
        encoder_convs=2,
        bottleneck_convs=2,
        decoder_convs=4,
        decoder_mult=4,
        norm="none",
        head="depthwise",
    ),
    # The reference topology with batch norm and the mixture-consistent head.
    "seed-bn-consistent": dict(
        filters=32,
        depth=2,
        encoder_convs=2,
        bottleneck_convs=2,
        decoder_convs=4,
        decoder_mult=4,
        norm="batch",
        head="consistent",
    ),
    # The best verified peer's shape (DanieleMorotti/Blind-Image-Separation, 2.999e-4 on 10 x 20,000 test pairs):
    # a wide, shallow plain U-Net with batch norm, 2 pools (an 8x8 bridge), 128-256-512 channels, decoders as
    # wide as the matching encoder, ReLU outputs. Built from our parts: 7,445,270 parameters against the peer's
    # 8,272,130 (Keras's count). The difference, by hand: its up-sampling is a 3x3 stride-2 transposed conv
    # (+819,200 weights over our 2x2), its convs keep their biases beside batch norm (+2,560), Keras counts
    # batch norm's running mean and variance as parameters (+5,120), and its heads are two 1x1 convs where
    # ours is a 1x1 conv + a depthwise 3x3 (-20). ~3.2 GFLOP per sample forward (seed: 2.7).
    "published-wide": dict(
        filters=128,
        depth=2,
        encoder_convs=2,
        bottleneck_convs=2,
        decoder_convs=2,
        decoder_mult=1,
        norm="batch",
        head="depthwise",
        output="relu",
    ),
    # The reference topology with batch norm, the consistent head and ReLU outputs (the recipe of our best H100
    # run, 2.969e-4), with additive attention gates on both skips (Attention U-Net, Oktay et al. 2018; the
    # peer EnricoPittini/Blind-Source-Separation, 3.146e-4): 3,699,096 parameters (seed-bn-consistent's
    # 3,686,198 + 12,898 in the two gates).
    "attention-unet": dict(
        filters=32,
        depth=2,
        encoder_convs=2,
        bottleneck_convs=2,
        decoder_convs=4,
        decoder_mult=4,
        norm="batch",
        head="consistent",
        output="relu",
        attention="gate",
    ),
    # The same with every level's convs as one pre-activation residual unit (ResUNet-style): 3,798,806
    # parameters (+112,672 in the 1x1 projections where a level changes width; batch norm on each conv's input
    # instead of its output: -64).
    "residual-unet": dict(
        filters=32,
        depth=2,
        encoder_convs=2,
        bottleneck_convs=2,
        decoder_convs=4,
        decoder_mult=4,
        norm="batch",
        head="consistent",
        output="relu",
        block="residual",
    ),
    # A deeper, narrower-decoder U-Net: a good GPU starting point for search.
    "deep": dict(
        filters=32,
        depth=3,
        encoder_convs=2,
        bottleneck_convs=2,
        decoder_convs=2,
        decoder_mult=2,
        norm="batch",
        head="consistent",
    ),
    # Tiny: for smoke runs and tests on a 2-core CPU (~20k parameters).
    "tiny": dict(
        filters=8,
        depth=2,
        encoder_convs=1,
        bottleneck_convs=1,
        decoder_convs=1,
        decoder_mult=2,
        norm="none",
        head="depthwise",
    ),
}

# "published-shape" is published-wide's name before the variants of the parts (issue 22): configs and checkpoints
# that name it still load, as the same shape.
_PRESETS["published-shape"] = _PRESETS["published-wide"]

VARIANTS: dict[str, dict[str, object]] = {name: copy.deepcopy({**PARTS, **preset}) for name, preset in _PRESETS.items()}
