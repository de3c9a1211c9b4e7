"""Samples/s per epoch of a real ``train()`` run: does the training loop hold its pace?

    python benchmarks/epoch_stability.py [--variant seed-bn-consistent] [--batch 256] [--epochs 20]
                                         [--samples-per-epoch 102400] [--json PATH]      # needs BSS_DATA_DIR

Runs ``bss_model.train.train`` (validation, checkpoints and TensorBoard images included, as in a
trial) and prints each epoch's training samples/s, then the largest deviation of epochs 2..N
from epoch 2 (epoch 1 carries compilation and graph capture).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from bss_model.config import load_config
from bss_model.errors import cli_entry
from bss_model.train import train


@cli_entry
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", default="seed-bn-consistent")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--samples-per-epoch", type=int, default=102_400)
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    cfg = load_config(
        None,
        [
            f"model.variant={args.variant}",
            f"train.batch_size={args.batch}",
            f"train.epochs={args.epochs}",
            f"train.samples_per_epoch={args.samples_per_epoch}",
            "train.schedule=cosine",
            "train.lr=2e-3",
            "data.download=false",
            *args.sets,
        ],
    )
    with tempfile.TemporaryDirectory(prefix="bss-stability-") as tmp:
        result = train(cfg, out_dir=tmp)
    rates = [h["samples_per_s"] for h in result.history]
    for h in result.history:
        print(f"epoch {h['epoch']:>3} train {h['samples_per_s']:>9.0f} samples/s  epoch {h['epoch_time_s']:.2f} s"
              f"  val {h['val_mse']:.3e}")  # fmt: skip
    ref = rates[1] if len(rates) > 1 else rates[0]
    worst = max(abs(r / ref - 1) for r in rates[1:]) if len(rates) > 1 else 0.0
    print(f"epochs 2..{len(rates)}: {min(rates[1:] or rates):.0f}..{max(rates[1:] or rates):.0f} samples/s, "
          f"largest deviation from epoch 2: {worst:.1%} ({result.status})")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"config": cfg.to_dict(), "samples_per_s": rates, "max_dev": worst}, indent=2))
    return 0 if result.status == "completed" else 1


if __name__ == "__main__":
    raise SystemExit(main())
