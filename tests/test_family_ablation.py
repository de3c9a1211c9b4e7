"""benchmarks/family_ablation.py on a tiny budget: the table it writes, its summary, and a rerun that resumes."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = ["--seeds", "2", "--options", "baseline,edge", "--workers", "0", "--epochs", "2", "--samples-per-epoch", "128",
        "--draws", "2", "--pairs", "100", "--val-pairs", "50", "--cost-steps", "2", "--cost-rounds", "2"]  # fmt: skip


def load_script():
    spec = importlib.util.spec_from_file_location("family_ablation", REPO / "benchmarks" / "family_ablation.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_the_ablation_writes_its_table_and_a_rerun_trains_only_what_is_missing(
    tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BSS_DATA_DIR", str(data_dir))
    fa = load_script()
    out = tmp_path / "ablation.json"
    assert fa.main(["--out", str(out), *TINY]) == 0
    table = json.loads(out.read_text())
    runs = {(r["option"], r["seed"]): r for r in table["runs"]}
    assert set(runs) == {("baseline", 0), ("baseline", 1), ("edge", 0), ("edge", 1), ("reference", 0)}
    assert all(r["status"] == "completed" and r["draws"] == 2 and r["pairs"] == 100 for r in runs.values())
    assert all(len(r["val_mse"]) == 2 and r["samples"] == [128, 256] for r in runs.values())
    # The configs trained are the project's, resolved: the edge option differs from the baseline in its loss only.
    diff = {k for k, v in table["resolved"]["edge"]["train"].items() if table["resolved"]["baseline"]["train"][k] != v}
    assert diff == {"loss"} and table["resolved"]["edge"]["model"] == table["resolved"]["baseline"]["model"]
    assert table["resolved"]["reference"]["model"]["filters"] == 4
    assert table["meta"]["machine"]["torch"] and "cpu_native_bf16" in table["meta"]["machine"]
    # Cost: measured side by side, the baseline is 1x by construction.
    cost = table["cost"]["options"]
    assert cost["baseline"]["samples_per_s_ratio"] == 1.0 and cost["edge"]["n_params"] == cost["baseline"]["n_params"]
    summary = table["summary"]["options"]
    base = [runs[("baseline", s)]["test_mse"] for s in (0, 1)]
    assert summary["baseline"]["test_mse_mean"] == pytest.approx(sum(base) / 2)
    assert summary["edge"]["verdict"] in ("helps", "hurts", "no measurable difference")
    assert isinstance(table["summary"]["reference_budget_check"]["still_improving"], bool)
    # The same seed's runs share their training pairs: the per-seed differences, beside the unpaired verdict.
    d = [runs[("edge", s)]["test_mse"] - runs[("baseline", s)]["test_mse"] for s in (0, 1)]
    paired_t = (sum(d) / 2) / (abs(d[0] - d[1]) / math.sqrt(2) / math.sqrt(2))
    assert summary["edge"]["paired_seeds"] == 2
    assert summary["edge"]["paired_diff_over_se"] == pytest.approx(paired_t, abs=0.01)
    text = fa.markdown(table)
    assert "| `train.loss: edge`" in text and "Runs finished: 5 of 5 (2 options x 2 seeds" in text
    assert "Reference-shaped network on the same budget, test MSE" in text

    # A kill loses only the runs in flight: the file has every finished one, and a rerun trains just the rest.
    table["runs"] = [r for r in table["runs"] if (r["option"], r["seed"]) != ("edge", 1)]
    out.write_text(json.dumps(table))
    capsys.readouterr()
    assert load_script().main(["--out", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    assert "cost:" not in printed and "training: 1 runs to go (4 done)" in printed
    again = json.loads(out.read_text())
    assert {(r["option"], r["seed"]): r for r in again["runs"] if (r["option"], r["seed"]) != ("edge", 1)} == {
        k: v for k, v in runs.items() if k != ("edge", 1)
    }
    assert math.isfinite(next(r for r in again["runs"] if (r["option"], r["seed"]) == ("edge", 1))["test_mse"])
    # Another option list is another table: refused, the file left as it is.
    with pytest.raises(SystemExit, match="another base, budget, options or seeds"):
        load_script().main(["--out", str(out), *[a if a != "baseline,edge" else "baseline,gate" for a in TINY]])
    assert json.loads(out.read_text()) == again
