"""Several trials sharing one GPU, as a fractional ``tune.gpus_per_trial`` runs them.

    python benchmarks/gpu_sharing.py [--trials 4] [--variant seed] [--batch 64] [--epochs 6]
                                     [--samples-per-epoch 64000] [--json PATH]       # needs BSS_DATA_DIR

Starts ``--trials`` processes at once. Each caps its CUDA memory at 1/trials of the card with
``bss_model.runtime.cap_gpu_memory`` (what the search trainable does for a fractional GPU) and runs
the real ``bss_model.train.train``. Prints each trial's median training samples/s over epochs
2..N (epoch 1 holds compilation and graph capture) and their sum. Ray itself is not involved:
this measures the GPU's sharing, not Ray's scheduling.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def child(args: argparse.Namespace) -> int:
    import torch

    from bss_model.config import load_config
    from bss_model.runtime import cap_gpu_memory
    from bss_model.train import train

    cap_gpu_memory(1 / args.trials, torch.device("cuda"))
    cfg = load_config(
        None,
        [
            f"model.variant={args.variant}",
            f"train.batch_size={args.batch}",
            f"train.epochs={args.epochs}",
            f"train.samples_per_epoch={args.samples_per_epoch}",
            f"train.seed={args.seed}",
            "train.tensorboard=false",
            "data.download=false",
        ],
    )
    result = train(cfg, out_dir=args.out)
    peak = torch.cuda.max_memory_reserved() / 2**30
    rates = [h["samples_per_s"] for h in result.history]
    summary = {"rates": rates, "peak_reserved_gib": peak, "status": result.status}
    Path(args.out, "share.json").write_text(json.dumps(summary))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--variant", default="seed")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--samples-per-epoch", type=int, default=64_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    with tempfile.TemporaryDirectory(prefix="bss-share-") as tmp:
        procs = []
        for i in range(args.trials):
            out = Path(tmp) / f"trial{i}"
            cmd = [sys.executable, __file__, "--child", "--out", str(out), "--seed", str(i)]
            for key in ("trials", "variant", "batch", "epochs", "samples_per_epoch"):
                cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
            procs.append((out, subprocess.Popen(cmd)))
        rows = []
        for out, proc in procs:
            if proc.wait() != 0:
                print(f"{out.name}: failed with exit status {proc.returncode}")
                return 1
            rows.append(json.loads((out / "share.json").read_text()))
    medians = [statistics.median(r["rates"][1:] or r["rates"]) for r in rows]
    for i, (row, med) in enumerate(zip(rows, medians, strict=True)):
        print(f"trial {i}: median {med:.0f} samples/s (epochs 2..{len(row['rates'])}), "
              f"peak reserved {row['peak_reserved_gib']:.2f} GiB, {row['status']}")  # fmt: skip
    print(f"{args.trials} trials x batch {args.batch} ({args.variant}), 1/{args.trials} GPU each: "
          f"{sum(medians):.0f} samples/s together")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "trials": rows,
                                         "total_samples_per_s": sum(medians)}, indent=2, default=str))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
