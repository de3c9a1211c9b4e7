"""Evidence for two recipe options at equal samples: EMA of the weights, and seed ensembles.

Trains ``--seeds`` models of a small variant with the EMA on and scores, on the same pairs:

- each seed's raw weights (= the EMA-off run) and its EMA weights;
- the ensemble (average prediction) of the seeds' raw weights, and of their EMA weights.

Then prints the ratios EMA / raw (per seed and of the means) and ensemble / single-seed mean.
Ratios below 1 mean the option helps. Scores are validation MSE (the held-out 10% of the
training sets, one fixed list of pairs) and, unless ``--test-draws 0``, the test protocol
with small draws; every line says which.

Why one run serves both "EMA off" and "EMA on": the EMA only watches. It draws no random
numbers and does not touch the raw weights, and with a schedule that ignores validation
(cosine, the default here) the raw weights of an EMA-on run are bit-for-bit those of the
EMA-off run (``tests/test_train.py::test_ema_is_what_validation_and_the_checkpoint_score``).
With ``--schedule plateau`` the validation score drives the learning rate, so the script then
trains the EMA-off runs separately (``--separate`` forces that for cosine too).

    python benchmarks/recipe_evidence.py                      # tiny, 3 seeds x 96,000 samples: 5.4 min on 1 busy core
    python benchmarks/recipe_evidence.py --seeds 1 --min-lr 1e-3          # EMA at a constant lr (no decay)
    python benchmarks/recipe_evidence.py --samples 192000 --ema-decay 0.998 --json out.json
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bss_model import checkpoint as ckpt
from bss_model.config import load_config
from bss_model.data import draw_pairs, load_splits, load_test
from bss_model.errors import ConfigError, cli_entry
from bss_model.evaluate import batched_mse, ensemble_predictor, run_protocol
from bss_model.io import atomic_write_json
from bss_model.model import build_model
from bss_model.runtime import cpu_has_native_bf16, resolve_runtime
from bss_model.train import train


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", default="tiny")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--samples", type=int, default=96_000, help="training samples per seed (all epochs)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--schedule", choices=["cosine", "plateau"], default="cosine")
    p.add_argument("--min-lr", type=float, default=1e-5, help="cosine's floor; = --lr gives a constant lr after warmup")
    p.add_argument("--ema-decay", type=float, default=0.995)
    p.add_argument("--separate", action="store_true", help="train the EMA-off runs separately even with cosine")
    p.add_argument("--val-pairs", type=int, default=10_000)
    p.add_argument("--test-draws", type=int, default=3, help="test protocol draws (0 = validation only)")
    p.add_argument("--test-pairs", type=int, default=5_000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


def run_config(args: argparse.Namespace, seed: int, ema: bool) -> Any:
    return load_config(
        None,
        [
            f"model.variant={args.variant}",
            "data.download=false",
            f"data.val_pairs={args.val_pairs}",
            f"train.epochs={args.epochs}",
            f"train.samples_per_epoch={args.samples // args.epochs}",
            f"train.batch_size={args.batch}",
            f"train.lr={args.lr}",
            f"train.schedule={args.schedule}",
            "train.warmup_epochs=0.5",
            f"train.min_lr={min(args.min_lr, args.lr)}",
            f"train.ema_decay={args.ema_decay if ema else 0.0}",
            f"train.seed={seed}",
            "train.device=cpu",
            f"train.threads={args.threads}",
            f"train.precision={args.precision}",
            "train.tensorboard=false",
        ],
    )


def model_from(state: dict[str, Any], key: str, cfg: Any, rt: Any) -> torch.nn.Module:
    model = build_model(cfg.model)
    model.load_state_dict(state[key])
    return rt.prepare_model(model).eval()


@cli_entry  # a user error (no data, bad flag value) prints one line and exits 2
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.seeds < 1 or args.epochs < 1 or args.samples < args.epochs:
        raise ConfigError("--seeds and --epochs must be >= 1 and --samples >= --epochs: e.g. --seeds 3 --epochs 4")
    separate = args.separate or args.schedule == "plateau"
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    cfg0 = run_config(args, seeds[0], ema=True)
    rt = resolve_runtime(cfg0.train)
    splits = load_splits(cfg0.data)
    print(
        f"{args.variant}: {len(seeds)} seeds x {args.epochs} epochs x {cfg0.train.epoch_samples} samples "
        f"({cfg0.train.steps_per_epoch} steps x batch {args.batch}), lr {args.lr:g} {args.schedule} "
        f"(floor {cfg0.train.min_lr:g}), "
        f"EMA decay {args.ema_decay}; {rt.describe()}, {torch.get_num_threads()} thread(s), "
        f"CPU native bf16: {cpu_has_native_bf16()}",
        flush=True,
    )
    raw, ema, wall = [], [], []
    with tempfile.TemporaryDirectory(prefix="bss-recipe-") as tmp:
        for seed in seeds:
            t0 = time.perf_counter()
            cfg = run_config(args, seed, ema=True)
            result = train(cfg, out_dir=Path(tmp) / f"ema-{seed}", splits=splits)
            state = ckpt.load(Path(tmp) / f"ema-{seed}")
            ema.append(model_from(state, "model", cfg, rt))
            if separate:
                off_cfg = run_config(args, seed, ema=False)
                train(off_cfg, out_dir=Path(tmp) / f"off-{seed}", splits=splits)
                raw.append(model_from(ckpt.load(Path(tmp) / f"off-{seed}"), "model", off_cfg, rt))
            else:
                raw.append(model_from(state, "train_model", cfg, rt))
            wall.append(time.perf_counter() - t0)
            print(f"  seed {seed}: {result.status}, EMA val MSE {result.metrics['val_mse']:.4e}, "
                  f"{wall[-1]:.0f} s", flush=True)  # fmt: skip

    scores: dict[str, Any] = {}
    val_digit = torch.as_tensor(splits.val_digit)
    val_fashion = torch.as_tensor(splits.val_fashion)
    val_idx = draw_pairs(len(splits.val_digit), len(splits.val_fashion), args.val_pairs, cfg0.data.val_seed)

    def val(models: list[torch.nn.Module]) -> float:
        return batched_mse(ensemble_predictor(models, rt), val_digit, val_fashion, *val_idx, 1000)["mse"]

    sets = {f"validation ({args.val_pairs} fixed pairs)": val}
    if args.test_draws:
        test_digit, test_fashion = (torch.as_tensor(t) for t in load_test(cfg0.data))
        eval_cfg = cfg0.eval
        eval_cfg.draws, eval_cfg.pairs = args.test_draws, args.test_pairs

        def test(models: list[torch.nn.Module]) -> float:
            return run_protocol(ensemble_predictor(models, rt), test_digit, test_fashion, eval_cfg)["mse_mean"]

        sets[f"test protocol ({args.test_draws} draws x {args.test_pairs} pairs)"] = test

    for label, score in sets.items():
        single_raw = [score([m]) for m in raw]
        single_ema = [score([m]) for m in ema]
        ens_raw, ens_ema = score(raw), score(ema)
        s = {
            "single_raw": single_raw,
            "single_ema": single_ema,
            "single_raw_mean": float(np.mean(single_raw)),
            "single_ema_mean": float(np.mean(single_ema)),
            "ensemble_raw": ens_raw,
            "ensemble_ema": ens_ema,
        }
        s["ratio_ema_vs_raw_per_seed"] = [e / r for e, r in zip(single_ema, single_raw, strict=True)]
        s["ratio_ema_vs_raw_mean"] = s["single_ema_mean"] / s["single_raw_mean"]
        s["ratio_ensemble_vs_single_mean_raw"] = ens_raw / s["single_raw_mean"]
        s["ratio_ensemble_vs_single_mean_ema"] = ens_ema / s["single_ema_mean"]
        s["ratio_ensemble_ema_vs_single_mean_raw"] = ens_ema / s["single_raw_mean"]
        scores[label] = s
        print(f"\n{label}: MSE (lower is better)")
        print(f"  single seeds, EMA off: {' '.join(f'{v:.4e}' for v in single_raw)}  mean {s['single_raw_mean']:.4e}")
        print(f"  single seeds, EMA on:  {' '.join(f'{v:.4e}' for v in single_ema)}  mean {s['single_ema_mean']:.4e}")
        print(f"  {len(seeds)}-seed ensemble, EMA off: {ens_raw:.4e}   EMA on: {ens_ema:.4e}")
        print(f"  ratio EMA on / off, per seed: {' '.join(f'{r:.3f}' for r in s['ratio_ema_vs_raw_per_seed'])}; "
              f"of the means: {s['ratio_ema_vs_raw_mean']:.3f}")  # fmt: skip
        print(f"  ratio ensemble / single-seed mean: EMA off {s['ratio_ensemble_vs_single_mean_raw']:.3f}, "
              f"EMA on {s['ratio_ensemble_vs_single_mean_ema']:.3f}; "
              f"EMA ensemble / plain single mean {s['ratio_ensemble_ema_vs_single_mean_raw']:.3f}")  # fmt: skip

    if args.json:
        atomic_write_json(
            Path(args.json),
            {"args": vars(args), "runtime": rt.describe(), "threads": torch.get_num_threads(),
             "samples_per_seed": args.epochs * cfg0.train.epoch_samples, "separate_off_runs": separate,
             "wall_s_per_seed": wall, "scores": scores},
        )  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
