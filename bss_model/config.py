"""Typed configuration: defaults in code, YAML overrides them, ``--set`` overrides the YAML.

The config is a tree of dataclasses. ``load_config`` reads a YAML file with
``yaml.safe_load`` (so Python tags are rejected), applies ``--set key=value``
overrides, checks every key and type against the dataclasses, then calls each
section's ``validate`` for ranges. Every problem raises :class:`ConfigError`
with one line that names the key and the fix.

The same machinery (:func:`build`, :func:`apply_overrides`) serves the search
config in ``search/config.py``, which nests a whole :class:`Config` as ``base``.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import errno
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from bss_model.errors import ConfigError
from bss_model.variants import VARIANTS

# --------------------------------------------------------------------------------------
# What the pipeline can run. Validation accepts exactly these ranges, so a value that passes
# never fails later (in numpy's seeding, in an allocation, or hours into a search).

# np.random.seed, optuna's TPESampler and torch's generators all take seeds in [0, 2**32 - 1].
MAX_SEED = 2**32 - 1
TRAIN_IMAGES = 60_000  # each of MNIST's and Fashion-MNIST's training sets
MAX_PAIRS = 10_000_000  # one validation list or one protocol draw (500x the reference's draw)
MAX_DRAWS = 10_000
MAX_PROTOCOL_PAIRS = 100_000_000  # all draws of the protocol together: 1.6 GB of indices
# A batch of 32x32 images beyond this needs tens of GB of activations even for the tiny U-Net.
MAX_BATCH = 65_536
MAX_EPOCHS = 100_000
MAX_SAMPLES_PER_EPOCH = 1_000_000_000
MAX_FILTERS = 1024
MAX_CONVS = 64
MAX_DECODER_MULT = 64
MAX_WEIGHTS = 2_000_000_000  # fp32 weights, gradients and two Adam moments: 32 GB
# The learning rate and the weight decay enter the optimizer's float32 arithmetic (torch casts them to the
# weights' dtype): beyond float32's 3.4e38, lr / (1 - beta1) or lr x weight_decay is a RuntimeError
# ("cannot be converted to type float without overflow") at the first step. At 1e15 both stay far inside.
MAX_OPTIMIZER_VALUE = 1e15
MAX_TIME_LIMIT_S = 30 * 24 * 3600.0  # a month: longer than any budget, short enough for every clock sum
MAX_THREADS = 4096  # a static bound; the CPUs a process may use are checked where it runs (bss_model.runtime)
# A bottleneck map is at most 16x16 (depth 1): a conv of rate 16 or more reads only zero padding off its centre tap.
MAX_DILATION = 15
MAX_EDGE_WEIGHT = 100.0  # train.edge_weight (loss: edge): see its check
# YAML that the config machinery can walk: nesting deeper than this (a real config is 5 levels at most) and
# aliases (&a / *a) that expand to more values than this are refused by the loader (load_yaml), before any
# recursive walk or repr() of an error message can run out of stack or memory.
MAX_YAML_DEPTH = 100
MAX_YAML_ALIAS_VALUES = 10_000

# --------------------------------------------------------------------------------------
# The sections


@dataclass
class DataConfig:
    # Folder holding mnist/ and fashion-mnist/. Empty: $BSS_DATA_DIR, then the per-user
    # cache, then (Fashion-MNIST) Debian's /usr/share/datasets/fashion-mnist/.
    dir: str = ""
    # Download missing files from the public mirrors into the cache (checksums verified).
    download: bool = True
    # Fraction of each *training* set held out for validation; the test sets are only
    # ever touched by final evaluation.
    val_fraction: float = 0.1
    split_seed: int = 1234
    # Validation uses one fixed list of pairs (seeded), so every epoch and every trial
    # is scored on exactly the same mixtures and val MSEs are comparable.
    val_pairs: int = 10000
    val_seed: int = 0

    def validate(self) -> None:
        # Both parts of each 60,000-image training set must keep at least one image (split_indices rounds).
        check_range(
            0.0 < self.val_fraction < 1.0 and 1 <= round(TRAIN_IMAGES * self.val_fraction) < TRAIN_IMAGES,
            "data.val_fraction",
            self.val_fraction,
            f"a fraction that leaves images on both sides of the {TRAIN_IMAGES}-image training sets, e.g. 0.1",
        )
        check_seed("data.split_seed", self.split_seed)
        check_range(
            1 <= self.val_pairs <= MAX_PAIRS, "data.val_pairs", self.val_pairs, f"a pair count in 1..{MAX_PAIRS:,}"
        )
        check_seed("data.val_seed", self.val_seed)


@dataclass
class ModelConfig:
    # A preset from bss_model/variants.py; keys set explicitly beside it override it.
    variant: str = "seed"
    filters: int = 32  # width of the first encoder level; level i has filters * 2**i
    depth: int = 2  # number of poolings; 32x32 supports at most 5
    encoder_convs: int = 2
    bottleneck_convs: int = 2  # 0 = no bottleneck convs (the deepest pool feeds the decoder)
    decoder_convs: int = 4
    decoder_mult: int = 4  # decoder level width = decoder_mult x the matching encoder width
    norm: Literal["none", "batch"] = "none"
    head: Literal["depthwise", "consistent"] = "depthwise"
    # Output activation after the head: none (the reference) or relu (the sources are >= 0).
    output: Literal["none", "relu"] = "none"
    # Each level's convs: plain (conv [BN] ReLU, the reference) or one pre-activation residual unit.
    block: Literal["plain", "residual"] = "plain"
    # Skip connections: as they are (the reference), or through additive attention gates (Attention U-Net).
    attention: Literal["none", "gate"] = "none"
    # Dilation rates of the bottleneck's convs, repeated over them: [1] (the reference), [1, 2, 4], ...
    # Also written 2 (every conv) or "1,2,4" (the form a search space's choices take).
    dilation: list[int] = field(default_factory=lambda: [1])
    # Decoder up-sampling: a 2x2 stride-2 transposed conv (the reference), or bilinear x2 + a 3x3 conv.
    upsample: Literal["transpose", "bilinear"] = "transpose"
    # Initial weights: torch's defaults, or keras (the reference's Keras defaults: glorot-uniform
    # kernels and zero biases, about sqrt(3)x torch's scale for a 3x3 conv; configs/seed.yaml).
    init: Literal["torch", "keras"] = "torch"

    def validate(self) -> None:
        check_range(self.variant in VARIANTS, "model.variant", self.variant, f"one of {sorted(VARIANTS)}")
        check_range(
            1 <= self.filters <= MAX_FILTERS, "model.filters", self.filters, f"a filter count in 1..{MAX_FILTERS}"
        )
        check_range(
            1 <= self.depth <= 5,
            "model.depth",
            self.depth,
            "1..5 (a 32x32 input halves per level: 2**depth must divide 32)",
        )
        convs = f"1..{MAX_CONVS}"
        check_range(1 <= self.encoder_convs <= MAX_CONVS, "model.encoder_convs", self.encoder_convs, convs)
        check_range(
            0 <= self.bottleneck_convs <= MAX_CONVS, "model.bottleneck_convs", self.bottleneck_convs, f"0..{MAX_CONVS}"
        )
        check_range(1 <= self.decoder_convs <= MAX_CONVS, "model.decoder_convs", self.decoder_convs, convs)
        mult = f"1..{MAX_DECODER_MULT}"
        check_range(1 <= self.decoder_mult <= MAX_DECODER_MULT, "model.decoder_mult", self.decoder_mult, mult)
        check_range(
            1 <= len(self.dilation) <= MAX_CONVS and all(1 <= d <= MAX_DILATION for d in self.dilation),
            "model.dilation",
            self.dilation,
            f"1..{MAX_CONVS} rates, each in 1..{MAX_DILATION}, e.g. [1] (none) or [1, 2, 4]",
        )
        weights = approx_weights(self)
        if weights > MAX_WEIGHTS:
            raise ConfigError(
                f"model.filters={self.filters} with model.depth={self.depth} and "
                f"model.decoder_mult={self.decoder_mult} makes about {weights:.2g} weights, more than one device "
                f"can train ({MAX_WEIGHTS:.0e}): lower model.filters, model.depth or model.decoder_mult"
            )


@dataclass
class TrainConfig:
    seed: int = 0
    epochs: int = 120
    # The budget is counted in samples, not steps, so trials with different batch sizes see
    # the same data per epoch (and per ASHA rung). Steps per epoch = round(samples / batch),
    # so the samples actually seen are steps x batch_size (see steps_per_epoch()).
    # The default is the reference's 5,062 steps x batch 32.
    samples_per_epoch: int = 161_984
    # A wall-clock limit on the run in seconds (0 = none), for budgeted jobs (search/budget.py). Epochs become
    # time slices: epoch k ends by k/epochs of the limit (its validation included), or at its sample budget if
    # that comes first, and the cosine schedule runs on the larger of its step fraction and its time fraction,
    # so the lr reaches min_lr at the limit however fast the machine is. samples_per_epoch 0 means no sample
    # budget at all: each epoch is its time slice (the budgeted search's trials, compared at equal time).
    time_limit_s: float = 0.0
    batch_size: int = 32
    lr: float = 1e-3
    # adam: the reference; weight_decay is then an L2 term added to the gradient (Adam rescales it).
    # adamw: decoupled weight decay (Loshchilov & Hutter), applied to conv/linear weights only.
    optimizer: Literal["adam", "adamw"] = "adam"
    weight_decay: float = 0.0
    adam_eps: float = 1e-8  # torch's default; Keras's Adam (the reference) uses 1e-7
    # The training objective (bss_model/losses.py). The score is always MSE, whatever this is.
    loss: Literal["mse", "l1", "charbonnier", "edge"] = "mse"
    charbonnier_eps: float = 1e-3
    # loss: edge is MSE + λ · MSE of the Sobel gradients; λ starts at edge_weight and is annealed to 0 by the
    # end of training (bss_model.losses.edge_weight_at). The Sobel term of white noise is 12x its MSE.
    edge_weight: float = 0.1
    # Exponential moving average of the weights (bss_model/ema.py); 0 = off. When on, validation,
    # checkpoints' evaluated weights, best_model.pt and the protocol all use the average.
    ema_decay: float = 0.0
    # plateau: the reference's ReduceLROnPlateau on val MSE, stepped once per epoch.
    # cosine: linear warmup for warmup_epochs, then cosine decay to min_lr, per step.
    schedule: Literal["plateau", "cosine"] = "plateau"
    # torch's ReduceLROnPlateau semantics: the lr drops after *more than* `patience` epochs without an
    # improvement, and an improvement is `val < best * (1 - threshold)` (rel) or `val < best - threshold`
    # (abs). Keras's patience=p, min_delta=d is torch's patience=p-1, threshold=d, abs (configs/seed.yaml).
    plateau_factor: float = 0.5
    plateau_patience: int = 10
    plateau_threshold: float = 1e-4
    plateau_threshold_mode: Literal["rel", "abs"] = "rel"
    min_lr: float = 1e-5
    warmup_epochs: float = 1.0
    grad_clip: float = 0.0  # max grad norm; 0 = off
    # Hardware knobs. "auto" picks what measured fastest per device (bss_model/runtime.py says what).
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    channels_last: Literal["auto", "on", "off"] = "auto"
    compile: Literal["auto", "on", "off"] = "auto"
    # Capture the whole training step in a CUDA graph and replay it (CUDA only; see bss_model/step.py).
    cuda_graphs: Literal["auto", "on", "off"] = "auto"
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    # Logging
    tensorboard: bool = True
    image_every: int = 5  # epochs between TensorBoard image grids; 0 = never
    log_every: int = 0  # steps between console progress lines; 0 = once per epoch

    def validate(self) -> None:
        check_seed("train.seed", self.seed)
        check_range(1 <= self.epochs <= MAX_EPOCHS, "train.epochs", self.epochs, f"1..{MAX_EPOCHS:,}")
        check_finite(
            0 <= self.time_limit_s <= MAX_TIME_LIMIT_S,
            "train.time_limit_s",
            self.time_limit_s,
            f"in [0, {MAX_TIME_LIMIT_S:.0f}] seconds (0 = no limit)",
        )
        low = 0 if self.time_limit_s else 1  # 0 samples = epochs end on time alone: only with a time limit
        check_range(
            low <= self.samples_per_epoch <= MAX_SAMPLES_PER_EPOCH,
            "train.samples_per_epoch",
            self.samples_per_epoch,
            f"1..{MAX_SAMPLES_PER_EPOCH:,}, e.g. 161984"
            + (" (or 0, epochs on time alone, with train.time_limit_s)" if self.time_limit_s else ""),
        )
        check_range(1 <= self.batch_size <= MAX_BATCH, "train.batch_size", self.batch_size, f"1..{MAX_BATCH}")
        check_range(
            0 < self.lr <= MAX_OPTIMIZER_VALUE,
            "train.lr",
            self.lr,
            f"a positive learning rate up to {MAX_OPTIMIZER_VALUE:.0e}, e.g. 1e-3",
        )
        check_finite(
            0 <= self.weight_decay <= MAX_OPTIMIZER_VALUE,
            "train.weight_decay",
            self.weight_decay,
            f"in [0, {MAX_OPTIMIZER_VALUE:.0e}]",
        )
        check_range(0 < self.adam_eps < 1, "train.adam_eps", self.adam_eps, "in (0, 1), e.g. 1e-8 or 1e-7 (Keras)")
        check_finite(self.charbonnier_eps > 0, "train.charbonnier_eps", self.charbonnier_eps, "> 0, e.g. 1e-3")
        # At 100 the Sobel term of white noise is 1,200x the MSE the score is: no use, and a step from divergence.
        check_finite(
            0 <= self.edge_weight <= MAX_EDGE_WEIGHT,
            "train.edge_weight",
            self.edge_weight,
            f"in [0, {MAX_EDGE_WEIGHT:g}], e.g. 0.1",
        )
        check_range(
            0 <= self.ema_decay < 1, "train.ema_decay", self.ema_decay, "in [0, 1): 0 = off, e.g. 0.999 or 0.9999"
        )
        check_range(0 < self.plateau_factor < 1, "train.plateau_factor", self.plateau_factor, "in (0, 1), e.g. 0.5")
        check_range(self.plateau_patience >= 0, "train.plateau_patience", self.plateau_patience, ">= 0")
        check_finite(self.plateau_threshold >= 0, "train.plateau_threshold", self.plateau_threshold, ">= 0, e.g. 1e-4")
        check_range(0 <= self.min_lr <= self.lr, "train.min_lr", self.min_lr, f"in [0, train.lr={self.lr}]")
        # Bounded like train.epochs: warmup_epochs x steps_per_epoch must stay an integer number of steps.
        check_finite(
            0 <= self.warmup_epochs <= MAX_EPOCHS, "train.warmup_epochs", self.warmup_epochs, f"in [0, {MAX_EPOCHS:,}]"
        )
        check_finite(self.grad_clip >= 0, "train.grad_clip", self.grad_clip, ">= 0 (0 disables clipping)")
        ok_device = self.device in ("auto", "cpu", "cuda") or (
            self.device.startswith("cuda:") and self.device[5:].isdigit()
        )
        check_range(ok_device, "train.device", self.device, "auto, cpu, cuda or cuda:N")
        check_range(0 <= self.threads <= MAX_THREADS, "train.threads", self.threads, f"0..{MAX_THREADS} (0 = torch's)")
        check_range(self.image_every >= 0, "train.image_every", self.image_every, ">= 0")
        check_range(self.log_every >= 0, "train.log_every", self.log_every, ">= 0")

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch, from the sample budget (see :func:`steps_per_epoch`); 0 = on time alone."""
        return steps_per_epoch(self)

    @property
    def epoch_samples(self) -> int:
        """Samples per epoch at most: steps x batch_size (may differ slightly from samples_per_epoch). A run with
        a time limit may end an epoch sooner: its metrics count the samples it actually saw."""
        return self.steps_per_epoch * self.batch_size


@dataclass
class EvalConfig:
    # The reference protocol: 10 draws of 20,000 pairs, uniform with replacement from the
    # 10k x 10k MNIST-test x Fashion-test pairs, seeded.
    draws: int = 10
    pairs: int = 20000
    seed: int = 0
    batch_size: int = 1000  # inference batch; never materialise a whole draw on the device

    def validate(self) -> None:
        check_range(1 <= self.draws <= MAX_DRAWS, "eval.draws", self.draws, f"1..{MAX_DRAWS}")
        check_range(1 <= self.pairs <= MAX_PAIRS, "eval.pairs", self.pairs, f"1..{MAX_PAIRS:,}")
        # The protocol draws every draw's indices up front (16 bytes a pair).
        if self.draws * self.pairs > MAX_PROTOCOL_PAIRS:
            raise ConfigError(
                f"eval.draws={self.draws} x eval.pairs={self.pairs} = {self.draws * self.pairs:,} pairs is more than "
                f"the protocol holds in memory ({MAX_PROTOCOL_PAIRS:,}): lower eval.draws or eval.pairs"
            )
        check_seed("eval.seed", self.seed)
        check_range(1 <= self.batch_size <= MAX_BATCH, "eval.batch_size", self.batch_size, f"1..{MAX_BATCH}")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> None:
        for section in (self.data, self.model, self.train, self.eval):
            section.validate()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------
# Sample budgets
#
# Comparing a batch-32 trial with a batch-128 trial at the same number of *steps* gives the
# latter 4x the data at every ASHA rung. Budgets are therefore samples; steps follow.


def steps_per_epoch(t: TrainConfig) -> int:
    """round(samples_per_epoch / batch_size), at least 1; ties round half up (exact integer maths). 0 when
    samples_per_epoch is 0 (a time-limited run whose epochs end on time alone)."""
    if t.samples_per_epoch == 0:
        return 0
    return max(1, (2 * t.samples_per_epoch + t.batch_size) // (2 * t.batch_size))


def check_fair_budget(samples_per_epoch: int, batch_sizes: list[int] | tuple[int, ...], key: str = "train") -> None:
    """Refuse a sample budget that some batch size does not divide.

    Otherwise rounding to whole steps gives that batch size a slightly different number of
    samples per epoch (and per rung) than the others. The fix names the nearest fair budgets:
    multiples of the least common multiple of all the batch sizes.
    """
    lcm = math.lcm(*batch_sizes) if batch_sizes else 1
    for b in batch_sizes:
        if samples_per_epoch % b:
            lower = max(lcm, samples_per_epoch // lcm * lcm)
            upper = (samples_per_epoch // lcm + 1) * lcm
            raise ConfigError(
                f"{key}.samples_per_epoch={samples_per_epoch} is not a multiple of {key}.batch_size={b}, so batch "
                f"sizes {sorted(set(batch_sizes))} would see different samples per epoch: use a multiple of {lcm}, "
                f"e.g. {lower} or {upper}"
            )


# Keys that were removed, with the one-line migration hint build() gives instead of "unknown key".
def _replaced_key(cls: type, key: str, data: dict[str, Any], prefix: str) -> ConfigError | None:
    if cls is TrainConfig and key == "steps_per_epoch":
        steps, batch = data[key], data.get("batch_size", TrainConfig.batch_size)
        example = "steps x batch_size, e.g. 5062 x 32 = 161984"
        if isinstance(steps, int) and isinstance(batch, int) and not isinstance(steps, bool):
            example = f"{steps} x {batch} = {steps * batch}"
        return ConfigError(
            f"{prefix}steps_per_epoch was replaced by {prefix}samples_per_epoch (= steps x batch_size, so trials "
            f"with different batch sizes see the same data): use {prefix}samples_per_epoch={example.split()[-1]} "
            f"({example})"
        )
    return None


# --------------------------------------------------------------------------------------
# Generic machinery


def shown(value: Any, limit: int = 120) -> str:
    """``repr(value)`` for an error line, cut to about ``limit`` characters (a value can be a long list)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 20]}... ({len(text):,} characters)"


def check_range(ok: bool, key: str, value: Any, expected: str) -> None:
    """Raise the standard one-line out-of-range ConfigError unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key}={shown(value)} is out of range: expected {expected}")


def check_finite(ok: bool, key: str, value: Any, expected: str) -> None:
    """:func:`check_range` that also refuses inf (nan already fails every comparison)."""
    check_range(ok and math.isfinite(value), key, value, f"a finite value {expected}")


def check_seed(key: str, value: int) -> None:
    check_range(0 <= value <= MAX_SEED, key, value, f"a seed in 0..{MAX_SEED} (2**32 - 1), e.g. 0")


def approx_weights(m: ModelConfig) -> int:
    """The U-Net's conv weights (biases and norms aside: a fraction of a percent), without building it."""
    widths = [m.filters * 2**i for i in range(m.depth)]
    residual = m.block == "residual"  # + a 1x1 projection per level (every level changes width)
    total, c = 0, 1
    for w in widths:
        total += 9 * (c * w + (m.encoder_convs - 1) * w * w) + residual * c * w
        c = w
    if m.bottleneck_convs:
        bottom = m.filters * 2**m.depth
        total += 9 * (c * bottom + (m.bottleneck_convs - 1) * bottom * bottom) + residual * c * bottom
        c = bottom
    up_kernel = 9 if m.upsample == "bilinear" else 4
    for w in reversed(widths):
        out = m.decoder_mult * w
        total += up_kernel * c * out + 9 * ((out + w) * out + (m.decoder_convs - 1) * out * out)
        if m.attention == "gate":
            total += (w + out) * max(1, w // 2)
        if residual:
            total += (out + w) * out
        c = out
    return total


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert only where lossless."""
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        if isinstance(value, bool) and "on" in choices and "off" in choices:
            # YAML 1.1 (PyYAML) reads a bare on/off (and yes/no) as a boolean: `compile: off`
            # and `--set train.compile=off` mean the string choice.
            value = "on" if value else "off"
        if value not in choices:
            raise ConfigError(f"{key}={shown(value)} is not allowed: use one of {', '.join(map(repr, choices))}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in get_args(tp):
            if option is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {shown(value)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # PyYAML (YAML 1.1) reads "1e-3" as a string; accept any float literal.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin is list and get_args(tp) == (int,):
        return _int_list(value, key)
    elif origin in (list, dict) or tp in (list, dict):
        if isinstance(value, origin or tp):
            return value
    else:  # pragma: no cover - a new annotation kind in the dataclasses
        raise TypeError(f"unsupported config annotation {tp!r} for {key}")
    raise ConfigError(f"{key}={shown(value)} has the wrong type: expected {_type_name(tp)}, got {type(value).__name__}")


def _int_list(value: Any, key: str) -> list[int]:
    """A list of integers (``model.dilation``): ``[1, 2, 4]``, one integer for all (``2``), or the comma form
    ``"1,2,4"`` (what a search space offers Optuna, whose categorical choices cannot be lists)."""
    items = value
    if isinstance(value, str):
        try:
            items = [int(part) for part in value.split(",")]
        except ValueError:
            items = None
    elif isinstance(value, int) and not isinstance(value, bool):
        items = [value]
    ok = isinstance(items, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in items)
    if not ok:
        raise ConfigError(
            f"{key}={shown(value)} has the wrong type: expected a list of integers, e.g. [1, 2, 4] (or 2, or '1,2,4')"
        )
    return list(items)


def _unknown_key(key: str, valid: list[str], prefix: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"did you mean '{prefix}{close[0]}'?" if close else f"valid keys here: {', '.join(valid)}"
    return ConfigError(f"unknown config key '{prefix}{key}': {hint}")


def build(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested mapping, rejecting unknown keys and bad types."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        where = prefix.rstrip(".") or "the config file"
        raise ConfigError(f"{where} must be a mapping of keys to values, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise _replaced_key(cls, key, data, prefix) or _unknown_key(str(key), list(fields), prefix)
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, f"{prefix}{name}")
    return cls(**kwargs)


def parse_set(item: str) -> tuple[list[str], Any]:
    """Parse one ``--set a.b.c=value``; the value is read as YAML (``true``, ``3``, ``[1, 2]``)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r} is malformed: write --set section.key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item!r} is malformed: write --set section.key=value")
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except YamlLimitError as exc:
        raise ConfigError(f"--set {key}: the value {exc.problem}: {exc.fix}") from None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def section_paths(cls: type, prefix: str = "") -> set[str]:
    """The dotted paths of the nested dataclass *sections* of ``cls`` (``train``; ``base.train`` in a search)."""
    hints = typing.get_type_hints(cls)
    out: set[str] = set()
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out |= {f"{prefix}{f.name}", *section_paths(hints[f.name], f"{prefix}{f.name}.")}
    return out


def expand_sections(params: dict[str, Any], schema: type | None = None) -> dict[str, Any]:
    """``params`` with every mapping given to a *section* of ``schema`` (default :class:`Config`) spread into
    its dotted keys, in place of the mapping: ``train={lr: 2e-3}`` is ``train.lr=2e-3``.

    Set as a value, the mapping would replace the whole section, and the keys it does not name would fall
    back to the code's defaults, not the file's (``--set 'base.train={lr: 2e-3}'`` trained 120 epochs of
    161,984 samples). A mapping-valued key that is not a section (``space``, ``retrain.overrides``) stays a
    value. A later key wins over an earlier one, as with repeated ``--set``.
    """
    sections = section_paths(schema or Config)
    out: dict[str, Any] = {}

    def put(key: str, value: Any) -> None:
        if isinstance(value, dict) and key in sections:
            for sub, v in value.items():
                put(f"{key}.{sub}", v)
        else:
            out.pop(key, None)
            out[key] = value

    for key, value in params.items():
        put(str(key), value)
    return out


def apply_params(
    data: dict[str, Any],
    params: dict[str, Any],
    where: str = "",
    flat_sections: tuple[str, ...] = (),
    schema: type | None = None,
) -> dict[str, Any]:
    """The one override function: dotted ``params`` onto a raw nested config dict, in order, in place.

    ``--set``, the search's trials and starting points, the retrain's best config and
    ``retrain.overrides`` all go through here, so a key means the same wherever it is set.
    A ``model.variant`` among the params selects that preset's shape: its keys replace the
    model keys already there (a trial's base is fully resolved, so "only unset keys" would make
    the variant a no-op), and the params' own model keys then override the preset, as
    ``--set model.variant=tiny --set model.filters=12`` does. Sections named in ``flat_sections``
    hold *dotted* keys themselves (the search space's ``train.lr``). A mapping given to a section of
    ``schema`` (default :class:`Config`) merges into it key by key (:func:`expand_sections`). Validation
    is :func:`build`'s.
    """
    params = expand_sections(params, schema)
    paths = {}
    for key in params:
        path = str(key).split(".")
        paths[key] = [path[0], ".".join(path[1:])] if len(path) > 2 and path[0] in flat_sections else path
    for key, path in paths.items():  # model.variant, or base.model.variant in a search config
        variant = params[key]
        if (
            path in (["model", "variant"], ["base", "model", "variant"])
            and isinstance(variant, str)
            and variant in VARIANTS
        ):
            for name, preset in VARIANTS[variant].items():
                _set_key(data, [*path[:-1], name], preset, where, str(key))
    for key, path in paths.items():
        _set_key(data, path, params[key], where, str(key))
    return data


def _set_key(data: dict[str, Any], path: list[str], value: Any, where: str, key: str) -> None:
    if not all(path):
        raise ConfigError(f"{where}'{key}' is malformed: write section.key, e.g. train.lr")
    node = data
    for i, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            above = ".".join(path[: i + 1])
            raise ConfigError(f"{where}'{key}': '{above}' is a value, not a section: set {above} itself")
        node = child
    node[path[-1]] = value


def set_string(key: str, value: str) -> str:
    """A ``--set`` item that gives ``key`` the string ``value`` exactly, whatever it looks like to YAML.

    For flags whose value is a name or a path (``--name``, ``--storage-path``, ``--data-dir``): read as
    YAML, ``2026-12-01`` is a date, ``~`` is null and ``exp #2`` is ``exp`` followed by a comment.
    """
    quoted = yaml.safe_dump(value, default_style='"', width=math.inf)  # a double-quoted scalar: escapes all
    return f"{key}={quoted.rstrip(chr(10))}"


def apply_overrides(
    data: dict[str, Any], sets: list[str] | None, flat_sections: tuple[str, ...] = (), schema: type | None = None
) -> dict[str, Any]:
    """Apply ``--set`` items onto a raw nested dict (see :func:`apply_params`; validation happens in :func:`build`)."""
    params: dict[str, Any] = {}
    for item in sets or []:
        path, value = parse_set(item)
        key = ".".join(path)
        params.pop(key, None)  # the last --set of a key wins, in its own place in the order
        params[key] = value
    return apply_params(data, params, "--set ", flat_sections, schema)


def with_overrides(base: dict[str, Any], params: dict[str, Any], where: str = "") -> Config:
    """A validated Config: ``base`` (a raw or resolved nested dict, not modified) with dotted ``params`` applied."""
    data = apply_params(copy.deepcopy(base), params, where)
    try:
        return config_from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{where}{exc}") from None


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{dotted key: value}`` of a nested config dict's leaves."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_diff(old: Any, new: Any) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (old value, new value)}`` for every leaf two configs (or config dicts) disagree on."""
    a = flatten(old.to_dict() if hasattr(old, "to_dict") else old)
    b = flatten(new.to_dict() if hasattr(new, "to_dict") else new)
    keys = list(a) + [k for k in b if k not in a]
    return {k: (a.get(k), b.get(k)) for k in keys if a.get(k) != b.get(k)}


def describe_diff(diff: dict[str, tuple[Any, Any]], old: str = "run", new: str = "asked") -> str:
    """``model.filters: run 32, asked 8; train.epochs: ...``: the differing keys with both values, never a repr."""
    return "; ".join(f"{key}: {old} {a!r}, {new} {b!r}" for key, (a, b) in diff.items())


def _not_a_regular_file(mode: int) -> str:
    """What a file of ``mode`` is, if it is neither a regular file nor a directory (whose error is read_text's)."""
    import stat

    kinds = {stat.S_ISFIFO: "a FIFO (named pipe)", stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device",
             stat.S_ISSOCK: "a socket"}  # fmt: skip
    return next((name for test, name in kinds.items() if test(mode)), "")


def read_text(path: Path, what: str, fix: str) -> str:
    """A UTF-8 text file's contents, or one ConfigError saying why it cannot be read: ``what`` names the
    file's role (``config file``), ``fix`` the remedy when it is missing or not a file."""
    try:
        # Before opening: reading a FIFO blocks until a writer comes (forever, for a config), and a device
        # file (/dev/zero, /dev/tty) never ends or waits for input. Only a regular file is a config.
        kind = _not_a_regular_file(path.stat().st_mode)
        if kind:
            raise ConfigError(f"{what} {path} is {kind}, not a regular file: {fix}")
        raw = path.read_bytes()
    except FileNotFoundError:
        dangling = f" (a symlink to {os.readlink(path)}, which does not exist)" if path.is_symlink() else ""
        raise ConfigError(f"{what} {path} does not exist{dangling}: {fix}") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {path} is a directory, not a file: {fix}") from None
    except PermissionError:
        raise ConfigError(f"{what} {path} cannot be read (permission denied): make it readable") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ConfigError(f"{what} {path} is a symlink loop: point the link at a real file, or {fix}") from None
        raise ConfigError(f"{what} {path} cannot be read ({exc.strerror or exc}): {fix}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"{what} {path} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at line {line}): save it as UTF-8"
        ) from None


class YamlLimitError(yaml.YAMLError):
    """YAML that parses but that no config can mean: a repeated key, nesting or aliases beyond the limits.

    ``problem`` completes "<the file / the value> ..."; ``fix`` is the remedy."""

    def __init__(self, problem: str, fix: str) -> None:
        super().__init__(problem)
        self.problem, self.fix = problem, fix


def _line(node_or_mark: Any) -> int:
    mark = getattr(node_or_mark, "start_mark", node_or_mark)
    return mark.line + 1 if mark is not None else 0


class _ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a repeated key, and bounds nesting depth and alias expansion.

    PyYAML keeps the last of two equal keys without a word (a second ``space:`` silently replaces the
    first). Aliases share one node, so a 1.5 KB "billion laughs" file loads as a small graph but expands
    to millions of values in whatever walks it (flatten, deepcopy, the repr of an error); a 5,000-deep
    nesting exhausts the recursion of the composer itself. Both are bounded here, as the nodes are composed.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._alias_values = 0
        self._open: set[str] = set()  # anchors whose node is still being composed
        self._sizes: dict[int, tuple[int, int]] = {}  # id(node) -> (values, depth), once composed

    def _measure(self, node: yaml.Node) -> tuple[int, int]:
        """(values, depth) of a node as expanded (memoised: an anchored node is measured once)."""
        if id(node) not in self._sizes:
            children: list[yaml.Node] = []
            if isinstance(node, yaml.MappingNode):
                children = [n for pair in node.value for n in pair]
            elif isinstance(node, yaml.SequenceNode):
                children = list(node.value)
            sizes = [self._measure(c) for c in children]  # bounded: nesting was checked as it was composed
            self._sizes[id(node)] = (1 + sum(v for v, _ in sizes), 1 + max((d for _, d in sizes), default=0))
        return self._sizes[id(node)]

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            node = self.anchors.get(event.anchor)
            if node is not None:
                if event.anchor in self._open:
                    raise YamlLimitError(
                        f"uses the alias *{event.anchor} inside its own anchor &{event.anchor} (line "
                        f"{_line(event)}), a value that never ends",
                        "remove that alias",
                    )
                values, depth = self._measure(node)
                self._alias_values += values
                if self._alias_values > MAX_YAML_ALIAS_VALUES:
                    raise YamlLimitError(
                        f"has aliases (*name) that expand to more than {MAX_YAML_ALIAS_VALUES:,} values (line "
                        f"{_line(event)}: *{event.anchor})",
                        "write the values out, or use fewer aliases",
                    )
                if self._depth + depth > MAX_YAML_DEPTH:
                    raise YamlLimitError(
                        f"nests more than {MAX_YAML_DEPTH} levels deep through the alias *{event.anchor} (line "
                        f"{_line(event)})",
                        "a config needs a few levels: flatten it",
                    )
            return super().compose_node(parent, index)
        event = self.peek_event()
        if self._depth >= MAX_YAML_DEPTH:
            raise YamlLimitError(
                f"nests more than {MAX_YAML_DEPTH} levels deep (line {_line(event)})",
                "a config needs a few levels: flatten it",
            )
        anchor = getattr(event, "anchor", None)
        self._depth += 1
        if anchor:
            self._open.add(anchor)
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1
            self._open.discard(anchor)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Node] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *defaults`: keys written beside a merge override it, by design
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:
                    continue  # an unhashable key: SafeConstructor refuses it with its own message
                if first is not key_node:
                    raise YamlLimitError(
                        f"repeats the key {shown(key)} (lines {_line(first)} and {_line(key_node)}; YAML would keep "
                        "only the last, silently)",
                        "keep one of them",
                    )
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    """The one YAML loader for configs and ``--set`` values: ``yaml.safe_load`` (no Python tags), refusing
    repeated keys and bounding depth and aliases (:class:`_ConfigLoader`; raises :class:`YamlLimitError`)."""
    loader = _ConfigLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping safely; every failure is a one-line ConfigError."""
    path = Path(path)
    text = read_text(path, "config file", "pass an existing YAML file to --config")
    try:
        data = load_yaml(text)
    except YamlLimitError as exc:
        raise ConfigError(f"config file {path} {exc.problem}: {exc.fix}") from None
    except yaml.constructor.ConstructorError as exc:
        # e.g. !!python/object: safe_load refuses to build arbitrary objects.
        mark = f" at line {exc.problem_mark.line + 1}" if exc.problem_mark else ""
        raise ConfigError(
            f"config file {path}{mark} uses a YAML tag that is not allowed ({exc.problem}): use plain values"
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or getattr(exc, "reason", None) or "invalid YAML"
        raise ConfigError(f"config file {path} is not valid YAML ({problem}{where}): fix the syntax there") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def resolve_variant(model: dict[str, Any] | None) -> dict[str, Any]:
    """Expand ``variant`` into its preset; keys set beside it win."""
    model = dict(model or {})
    variant = model.get("variant", ModelConfig.variant)
    if not isinstance(variant, str) or variant not in VARIANTS:
        raise ConfigError(f"model.variant={variant!r} is unknown: use one of {', '.join(sorted(VARIANTS))}")
    return {**VARIANTS[variant], **model}


def config_from_dict(data: dict[str, Any] | None, prefix: str = "") -> Config:
    """Build and validate a :class:`Config` from a raw nested dict (e.g. a saved config)."""
    data = dict(data or {})
    if isinstance(data.get("model", {}), dict):
        data["model"] = resolve_variant(data.get("model"))
    cfg = build(Config, data, prefix)
    cfg.validate()
    return cfg


def load_config(path: str | Path | None = None, sets: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- ``--set`` overrides, validated."""
    data = read_yaml(path) if path else {}
    return config_from_dict(apply_overrides(data, sets))


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    from bss_model.io import atomic_write_text

    data = cfg.to_dict() if hasattr(cfg, "to_dict") else dataclasses.asdict(cfg)
    atomic_write_text(Path(path), yaml.safe_dump(data, sort_keys=False))
