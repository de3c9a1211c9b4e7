"""Named U-Net variants: presets of ``ModelConfig`` fields.

A config names a variant (``model.variant: seed``); the preset's fields are
applied first and any model key the config sets explicitly overrides them.
This module is pure data so the config layer can use it without importing torch.
"""

from __future__ import annotations

VARIANTS: dict[str, dict[str, object]] = {
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
    # The shape of the best published result for this task (3.00e-4 test MSE): a plain U-Net with
    # batch norm, 2 pools, 128-256-512 channels, decoders as wide as the matching encoder, ReLU
    # outputs. Built from our parts: 7,445,270 parameters (theirs: 8.3M; the up-sampling and head
    # details are not published), ~3.2 GFLOP per sample forward (seed: 2.7).
    "published-shape": dict(
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
