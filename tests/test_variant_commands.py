"""Every variant issue 22 added trains one step and is evaluated and used through the public commands
(bss-train --config, bss-evaluate, bss-separate: their ``main``, in-process), on a tiny budget; and its
best_model.pt (what a search hands over) describes the variant's parts and rebuilds the same network."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from bss_model import checkpoint as ckpt
from bss_model.evaluate import main as evaluate_main
from bss_model.separate import main as separate_main
from bss_model.train import main as train_main
from bss_model.variants import VARIANTS
from search.best_model import CONVENTIONS, export_best_model
from search.results import SeedResult

# The sizes of the variants as stated in bss_model/variants.py (and counted by hand in tests/test_model.py).
NEW_VARIANTS = {"attention-unet": 3_699_096, "residual-unet": 3_798_806, "published-wide": 7_445_270}
PARTS = ("block", "attention", "dilation", "upsample")


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
    # A config file as a user writes one: the variant by name, a tiny budget (one step), this machine.
    config = tmp_path / f"{variant}.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"variant": variant},
                "train": {"epochs": 1, "samples_per_epoch": 4, "batch_size": 4, "device": "cpu", "threads": 1,
                          "tensorboard": False},
                "data": {"val_pairs": 8, "download": False},
                "eval": {"batch_size": 8},
            }
        )
    )  # fmt: skip
    argv = ["--config", str(config), "--out", str(tmp_path / "runs"), "--data-dir", str(data_dir)]
    summary = json.loads(run(train_main, argv, capsys).strip().splitlines()[-1])
    assert summary["status"] == "completed" and summary["step"] == 1 and math.isfinite(summary["val_mse"])
    run_dir = Path(summary["run_dir"])
    assert run_dir.name.endswith(variant), run_dir  # the run folder is named after the config
    state = ckpt.load(run_dir)
    assert state["n_params"] == NEW_VARIANTS[variant] and state["config"]["model"]["variant"] == variant
    # The preset's whole shape, parts included, is what was trained.
    assert {k: state["config"]["model"][k] for k in VARIANTS[variant]} == VARIANTS[variant]

    # best_model.pt, as the search exports the winner: the variant's parts and their conventions are in it.
    best = tmp_path / "best_model.pt"
    seed = SeedResult(0, summary["val_mse"], None, {}, str(run_dir / "checkpoint"), "", str(run_dir))
    export_best_model(seed, best)
    exported = ckpt.load(best)
    model_cfg = exported["config"]["model"]
    assert {k: model_cfg[k] for k in PARTS} == {k: VARIANTS[variant][k] for k in PARTS}
    assert exported["n_params"] == NEW_VARIANTS[variant] and exported["config"]["data"]["dir"] == ""
    assert all(exported["conventions"][k] == CONVENTIONS[k] for k in PARTS)
    # ... and the file alone rebuilds the network that was trained: the same outputs.
    trained, _ = ckpt.load_model(run_dir)
    rebuilt, cfg = ckpt.load_model(best)
    assert cfg.model.variant == variant and sum(p.numel() for p in rebuilt.parameters()) == NEW_VARIANTS[variant]
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), trained.eval()(x), rtol=0, atol=0)

    evaluated = json.loads(
        run(
            evaluate_main,
            ["--checkpoint", str(best), "--draws", "1", "--pairs", "8", "--device", "cpu", "--data-dir", str(data_dir)],
            capsys,
        )  # fmt: skip
    )
    assert evaluated["draws"] == 1 and math.isfinite(evaluated["test_mse_mean"])

    out = tmp_path / "separated"
    argv = ["--checkpoint", str(best), "--demo", "1", "--data-dir", str(data_dir), "--out", str(out), "--json",
            "--threads", "1", "--device", "cpu"]  # fmt: skip
    doc = json.loads(run(separate_main, argv, capsys))
    assert math.isfinite(doc["demo"]["mse"]) and (out / "demo-000.digit.png").is_file()
