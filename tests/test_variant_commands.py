"""Every variant issue 22 added trains one step and is evaluated and used through the public commands
(bss-train, bss-evaluate, bss-separate: their ``main``, in-process), on a tiny budget."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bss_model import checkpoint as ckpt
from bss_model.evaluate import main as evaluate_main
from bss_model.separate import main as separate_main
from bss_model.train import main as train_main

# The sizes of the variants as stated in bss_model/variants.py (and counted by hand in tests/test_model.py).
NEW_VARIANTS = {"attention-unet": 3_699_096, "residual-unet": 3_798_806, "published-wide": 7_445_270}


def run(main, argv: list[str], capsys: pytest.CaptureFixture) -> str:
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    assert code == 0, out.err[-2000:]
    return out.out


@pytest.mark.parametrize("variant", sorted(NEW_VARIANTS))
def test_a_new_variant_trains_evaluates_and_separates(
    variant: str, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    sets = [f"model.variant={variant}", "train.epochs=1", "train.samples_per_epoch=4", "train.batch_size=4",
            "data.val_pairs=8", "eval.batch_size=8", "train.device=cpu", "train.threads=1", "train.tensorboard=false",
            "data.download=false"]  # fmt: skip
    argv = ["--out", str(tmp_path / "runs"), "--data-dir", str(data_dir)]
    for item in sets:
        argv += ["--set", item]
    summary = json.loads(run(train_main, argv, capsys).strip().splitlines()[-1])
    assert summary["status"] == "completed" and summary["step"] == 1 and math.isfinite(summary["val_mse"])
    run_dir = Path(summary["run_dir"])
    state = ckpt.load(run_dir)
    assert state["n_params"] == NEW_VARIANTS[variant] and state["config"]["model"]["variant"] == variant

    evaluated = json.loads(
        run(evaluate_main, ["--checkpoint", str(run_dir), "--draws", "1", "--pairs", "8", "--device", "cpu"], capsys)
    )
    assert evaluated["draws"] == 1 and math.isfinite(evaluated["test_mse_mean"])

    out = tmp_path / "separated"
    argv = ["--checkpoint", str(run_dir), "--demo", "1", "--data-dir", str(data_dir), "--out", str(out), "--json",
            "--threads", "1", "--device", "cpu"]  # fmt: skip
    doc = json.loads(run(separate_main, argv, capsys))
    assert math.isfinite(doc["demo"]["mse"]) and (out / "demo-000.digit.png").is_file()
