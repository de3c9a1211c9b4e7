"""Retrain one configuration over seeds, evaluate each with the reference protocol, report.

    python search/retrain.py --experiment results/smoke          # the best config of a finished search
    python search/retrain.py --config configs/seed.yaml --seeds 5  # a configuration named directly

The seeds run as parallel Ray trials (a grid over ``train.seed``), checkpointed and
resumable like the search: rerunning on the same experiment continues the retrain
without retraining seeds that had finished.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    # `python search/retrain.py` puts search/ itself first on sys.path, where our module names
    # could shadow others; put the repo root there instead so `import search` works uninstalled.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from bss_model.config import Config, load_config
from bss_model.errors import ConfigError, cli_entry
from bss_model.io import setup_logging
from search import experiment as ex
from search import report as rp
from search.config import SearchConfig, TuneSection, validate_space, with_overrides

log = logging.getLogger("bss")


def retrain_and_report(
    cfg: SearchConfig, best_cfg: Config, root: str, summary: dict[str, Any] | None, resume_cmd: str, t0: float
) -> dict[str, Any]:
    """Retrain ``best_cfg`` over the configured seeds, then write every output of the experiment."""
    out = ex.local_dir(root)
    results = ex.run_retrain(cfg, best_cfg, root, resume_cmd)
    rows = ex.summarize_retrain(results)
    best_seed = rp.save_best_model(rows, out)
    rp.plot_separations(out / "best_model.pt", cfg.retrain.images, out / rp.PICTURES["separations"])
    trials = (summary or {}).get("trials", [])
    parsed = validate_space(cfg.base.to_dict(), cfg.space) if cfg.space else {}
    rp.plot_history(trials, out / rp.PICTURES["history"])
    rp.plot_importances(trials, parsed, out / rp.PICTURES["importances"])
    report = rp.build_report(summary, rows, best_seed, best_cfg.to_dict(), out, time.time() - t0)
    ex.upload(root, out, ["report.json", "report.md", "best_model.pt", *rp.PICTURES.values()])
    n = len(report["test_mse_per_seed"])
    print(f"report: {out / 'report.md'}")
    print(f"test MSE {report['test_mse_mean']:.3e} ± {report['test_mse_std']:.1e} over {n} seeds")
    return report


def resolve_data_dir(cfg: Config, flag: str | None) -> None:
    """Make the data dir absolute before trials chdir into their own folders.

    $BSS_DATA_DIR itself is made absolute too: a local Ray's workers inherit this
    process's environment, and a relative value would point elsewhere from a trial folder.
    """
    if os.environ.get("BSS_DATA_DIR"):
        os.environ["BSS_DATA_DIR"] = str(Path(os.environ["BSS_DATA_DIR"]).expanduser().resolve())
    if flag:
        cfg.data.dir = str(Path(flag).expanduser().resolve())
    elif cfg.data.dir:
        cfg.data.dir = str(Path(cfg.data.dir).expanduser().resolve())
    elif os.environ.get("BSS_DATA_DIR"):
        cfg.data.dir = os.environ["BSS_DATA_DIR"]


def check_data(cfg: Config, address: str | None) -> None:
    """With a local Ray, verify every data file up front (seconds): a missing, truncated or corrupt
    file is then one clear error before Ray starts, not the same error in every trial. On a cluster
    the files live on the nodes, so the trials check them there."""
    if address or os.environ.get("RAY_ADDRESS"):
        return
    from bss_model.data import DATASETS, load_dataset

    for dataset in DATASETS:
        load_dataset(dataset, cfg.data.dir or None, cfg.data.download)


def main(argv: list[str] | None = None) -> int:
    @cli_entry
    def _main() -> int:
        p = argparse.ArgumentParser(prog="python search/retrain.py", description=__doc__.split("\n")[0])
        src = p.add_mutually_exclusive_group(required=True)
        src.add_argument("--experiment", help="a finished search's folder (results/<name>)")
        src.add_argument("--config", help="a bss_model config (e.g. configs/seed.yaml) to retrain directly")
        p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                       help="with --config: override a config key (repeatable)")  # fmt: skip
        p.add_argument("--seeds", type=int, default=None, help="number of seeds (default: the config's, else 5)")
        p.add_argument("--name", default=None, help="with --config: experiment name (default: the config's stem)")
        p.add_argument("--storage-path", default="results", help="with --config: where the experiment folder goes")
        p.add_argument("--max-concurrent", type=int, default=None, help="seeds trained at once")
        p.add_argument("--cpus-per-trial", type=float, default=None)
        p.add_argument("--gpus-per-trial", type=float, default=None)
        p.add_argument("--resume", action="store_true", help="with --config: continue an existing retrain")
        p.add_argument("--address", default=None, help="Ray cluster address (else $RAY_ADDRESS, else local Ray)")
        p.add_argument("--data-dir", default=None, help="folder with mnist/ and fashion-mnist/")
        args = p.parse_args(argv)
        t0 = time.time()
        if args.experiment:
            root = (
                str(Path(args.experiment).expanduser().resolve()) if "://" not in args.experiment else args.experiment
            )
            cfg = ex.load_saved_config(root)
            if cfg is None:
                raise ConfigError(
                    f"{root} has no search_config.yaml: pass the folder of an experiment made by search/run.py"
                )
            summary_path = ex.local_dir(root) / "search_summary.json"
            if not summary_path.exists():
                raise ConfigError(
                    f"the search in {root} has not finished (no search_summary.json): finish it with "
                    "`python search/run.py --config <its config> --resume`"
                )
            summary = json.loads(summary_path.read_text())
            best_cfg = with_overrides(cfg.base.to_dict(), {**summary["best_params"], **cfg.retrain.overrides})
        else:
            base = load_config(args.config, args.sets)
            name = args.name or Path(args.config).stem + "-retrain"
            cfg = SearchConfig(base=base, space={}, tune=TuneSection(name=name, storage_path=args.storage_path))
            summary = None
            best_cfg = base
        if args.seeds is not None:
            cfg.retrain.seeds = args.seeds
        for flag, section, key in (("max_concurrent", cfg.retrain, "max_concurrent"),
                                   ("cpus_per_trial", cfg.tune, "cpus_per_trial"),
                                   ("gpus_per_trial", cfg.tune, "gpus_per_trial")):  # fmt: skip
            if getattr(args, flag) is not None:
                setattr(section, key, getattr(args, flag))
        cfg.retrain.validate()
        cfg.tune.validate()
        resolve_data_dir(best_cfg, args.data_dir)
        check_data(best_cfg, args.address)
        if args.config:
            root = ex.prepare_experiment(cfg, args.resume)
            ex.save_resolved_config(cfg, root)
        setup_logging(ex.local_dir(root) / "retrain.log")
        ex.init_ray(args.address)
        cmd = " ".join(["python search/retrain.py", *(argv if argv is not None else sys.argv[1:])])
        resume_cmd = cmd if "--resume" in cmd or args.experiment else cmd + " --resume"
        retrain_and_report(cfg, best_cfg, root, summary, resume_cmd, t0)
        return 0

    return _main()


if __name__ == "__main__":
    raise SystemExit(main())
