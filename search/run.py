"""The main job: search the U-Net family with Ray Tune + Optuna, retrain the best over seeds, report.

    python search/run.py --config configs/smoke.yaml            # local Ray, this machine's CPUs/GPUs
    python search/run.py --config configs/search.yaml --address ray://head:10001
    python search/run.py --config configs/smoke.yaml --resume   # continue after a crash or Ctrl-C
    bss-search --config configs/smoke.yaml                      # the same, as the installed console script

Trials optimise validation MSE on a held-out split of the *training* sets; only the
final retrain touches the test sets. Everything lands in ``<storage_path>/<name>/``.
(``search`` is imported as the installed package -- ``make setup`` installs it editable --
so this file needs no sys.path lines.)
"""

from __future__ import annotations

import argparse
import shlex
import sys

from bss_model.errors import ConfigError, cli_entry
from search import lock
from search.config import load_search_config
from search.console import command_name, entry_point
from search.pipeline import search_retrain_report
from search.storage import experiment_root


def main(argv: list[str] | None = None) -> int:
    @cli_entry
    def _main() -> int:
        prog = command_name("bss-search", "python search/run.py")
        p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
        p.add_argument("--config", required=True, help="search config, e.g. configs/smoke.yaml")
        p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                       help="override a key, e.g. --set tune.num_samples=16 --set base.train.epochs=10")  # fmt: skip
        p.add_argument("--name", default=None, help="experiment name (sets tune.name)")
        p.add_argument("--storage-path", default=None, help="local folder, NFS path or s3:// / gs:// URI")
        p.add_argument("--resume", action="store_true", help="continue the named experiment (losing no trial)")
        p.add_argument("--verbose", action="store_true", help="Ray Tune's own trial tables too (tune.verbose=2)")
        p.add_argument("--address", default=None, help="Ray cluster address (else $RAY_ADDRESS, else local Ray)")
        p.add_argument("--data-dir", default=None, help="folder with mnist/ and fashion-mnist/ (sets base.data.dir)")
        args = p.parse_args(argv)
        sets = list(args.sets)
        if args.name:
            sets.append(f"tune.name={args.name}")
        if args.storage_path:
            sets.append(f"tune.storage_path={args.storage_path}")
        if args.verbose:
            sets.append("tune.verbose=2")
        try:
            cfg = load_search_config(args.config, sets)
        except ConfigError as exc:
            # In the words the user typed: --name x/y, not tune.name='x/y'.
            if args.name and str(exc).startswith("tune.name="):
                raise ConfigError(f"--name {args.name!r} " + str(exc).split(" ", 1)[1]) from None
            raise
        raw = argv if argv is not None else sys.argv[1:]
        # Shell-quoted: pasted back, an argument with a space or a quote is the same argument.
        resume_cmd = shlex.join([*prog.split(), *raw] + ([] if args.resume else ["--resume"]))
        # One driver per experiment, for the whole run: a second is refused in one line naming this one.
        with entry_point(cfg.tune.verbose), lock.hold(experiment_root(cfg)):
            search_retrain_report(cfg, args.resume, args.address, args.data_dir, resume_cmd)
        return 0

    return _main()


if __name__ == "__main__":
    raise SystemExit(main())
