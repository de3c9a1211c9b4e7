"""The main job: search the U-Net family with Ray Tune + Optuna, retrain the best over seeds, report.

    python search/run.py --config configs/smoke.yaml            # local Ray, this machine's CPUs/GPUs
    python search/run.py --config configs/search.yaml --address ray://head:10001
    python search/run.py --config configs/smoke.yaml --resume   # continue after a crash or Ctrl-C

Trials optimise validation MSE on a held-out split of the *training* sets; only the
final retrain touches the test sets. Everything lands in ``<storage_path>/<name>/``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    # `python search/run.py` puts search/ itself first on sys.path, where our module names
    # could shadow others; put the repo root there instead so `import search` works uninstalled.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from bss_model.errors import cli_entry
from bss_model.io import atomic_write_json, setup_logging
from search import experiment as ex
from search.config import load_search_config, with_overrides
from search.retrain import check_data, resolve_data_dir, retrain_and_report


def main(argv: list[str] | None = None) -> int:
    @cli_entry
    def _main() -> int:
        p = argparse.ArgumentParser(prog="python search/run.py", description=__doc__.split("\n")[0])
        p.add_argument("--config", required=True, help="search config, e.g. configs/smoke.yaml")
        p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                       help="override a key, e.g. --set tune.num_samples=16 --set base.train.epochs=10")  # fmt: skip
        p.add_argument("--name", default=None, help="experiment name (sets tune.name)")
        p.add_argument("--storage-path", default=None, help="local folder, NFS path or s3:// / gs:// URI")
        p.add_argument("--resume", action="store_true", help="continue the named experiment (losing no trial)")
        p.add_argument("--address", default=None, help="Ray cluster address (else $RAY_ADDRESS, else local Ray)")
        p.add_argument("--data-dir", default=None, help="folder with mnist/ and fashion-mnist/ (sets base.data.dir)")
        args = p.parse_args(argv)
        t0 = time.time()
        sets = list(args.sets)
        if args.name:
            sets.append(f"tune.name={args.name}")
        if args.storage_path:
            sets.append(f"tune.storage_path={args.storage_path}")
        cfg = load_search_config(args.config, sets)
        resolve_data_dir(cfg.base, args.data_dir)
        check_data(cfg.base, args.address)
        root = ex.prepare_experiment(cfg, args.resume)
        out = ex.local_dir(root)
        logger = setup_logging(out / "search.log")
        ex.init_ray(args.address)
        if not args.resume or ex.load_saved_config(root) is None:
            ex.save_resolved_config(cfg, root)
        raw = argv if argv is not None else sys.argv[1:]
        resume_cmd = " ".join(["python search/run.py", *raw] + ([] if args.resume else ["--resume"]))
        summary_path = out / "search_summary.json"
        if summary_path.exists():
            summary = json.loads(summary_path.read_text())
            logger.info("search already finished (%d trials): going on to the retrain", summary["num_trials"])
        else:
            results = ex.run_search(cfg, root, args.resume, resume_cmd)
            rows = ex.summarize_trials(results, cfg.base.train.epochs)
            summary = ex.search_summary(cfg, rows, time.time() - t0)
            atomic_write_json(summary_path, summary)
            ex.upload(root, out, ["search_summary.json"])
            logger.info(
                "search done: %d trials, %d full budget, %d stopped early, %d errored; best val MSE %.3e (%s)",
                summary["num_trials"], summary["num_completed"], summary["num_stopped_early"],
                summary["num_errored"], summary["best_val_mse"], summary["best_params"],
            )  # fmt: skip
        best_cfg = with_overrides(cfg.base.to_dict(), {**summary["best_params"], **cfg.retrain.overrides})
        retrain_and_report(cfg, best_cfg, root, summary, resume_cmd, t0)
        return 0

    return _main()


if __name__ == "__main__":
    raise SystemExit(main())
