"""The main job: search the U-Net family with Ray Tune + Optuna, retrain the best over seeds, report.

    python search/run.py --config configs/smoke.yaml            # local Ray, this machine's CPUs/GPUs
    python search/run.py --config configs/search.yaml --address ray://head:10001
    python search/run.py --config configs/smoke.yaml --resume   # continue after a crash or Ctrl-C
    bss-search --config laptop --budget 10m                    # the whole job planned to end within 10 minutes
    bss-search --config smoke tune.num_samples=16               # installed: a shipped config by name, bare overrides

Trials optimise validation MSE on a held-out split of the *training* sets; only the
final retrain touches the test sets. Everything lands in ``<storage_path>/<name>/``.
(``search`` is imported as the installed package -- ``make setup`` installs it editable --
so this file needs no sys.path lines.)
"""

from __future__ import annotations

import argparse
import sys

from bss_model.cli import add_common_flags, command_name, overrides, print_config, require_extra, resolve_config
from bss_model.config import set_string
from bss_model.errors import ConfigError, cli_entry
from search.budget import process_started_at


def main(argv: list[str] | None = None) -> int:
    @cli_entry
    def _main() -> int:
        prog = command_name("bss-search", "python search/run.py")
        p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
        p.add_argument("--config", required=True, help="search config: a YAML file or a shipped config's name (smoke)")
        p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                       help="override a key, e.g. --set tune.num_samples=16 --set base.train.epochs=10")  # fmt: skip
        p.add_argument("--name", default=None, help="experiment name (sets tune.name)")
        p.add_argument("--storage-path", default=None, help="local folder, NFS path or s3:// / gs:// URI")
        p.add_argument("--resume", action="store_true", help="continue the named experiment (losing no trial)")
        p.add_argument("--verbose", action="store_true", help="Ray Tune's own trial tables too (tune.verbose=2)")
        p.add_argument("--address", default=None, help="Ray cluster address (else $RAY_ADDRESS, else local Ray)")
        p.add_argument("--data-dir", default=None, help="folder with mnist/ and fashion-mnist/ (sets base.data.dir)")
        p.add_argument("--budget", default=None, metavar="DURATION",
                       help="the whole job's wall-clock budget, e.g. 10m, 90s, 1h30m (sets budget): search, retrain, "
                       "evaluation and report are planned from throughput measured here to end within it")  # fmt: skip
        add_common_flags(p, "bss-search", "search")
        args = p.parse_args(argv)
        started_at = process_started_at()
        # After --help, --version and --list-configs, which need none of it.
        require_extra("search", prog)
        from search.budget import format_duration, parse_duration
        from search.config import load_search_config

        sets = overrides(args)
        for flag, value in (("--name", args.name), ("--storage-path", args.storage_path)):
            if value is not None and not value.strip():
                raise ConfigError(f"{flag} {value!r} is empty: give it a value, or drop {flag} for the config's")
        if args.budget is not None:
            seconds = parse_duration(args.budget, "--budget")  # the flag's words in its error, before the config
            sets.append(set_string("budget", format_duration(seconds)))
        # Names and paths are strings as typed, never YAML (2026-12-01 is no date, `exp #2` no comment).
        if args.name:
            sets.append(set_string("tune.name", args.name))
        if args.storage_path:
            sets.append(set_string("tune.storage_path", args.storage_path))
        if args.verbose:
            sets.append("tune.verbose=2")
        try:
            cfg = load_search_config(resolve_config(args.config, "search"), sets)
        except ConfigError as exc:
            # In the words the user typed: --name x/y, not tune.name='x/y'.
            if args.name and str(exc).startswith("tune.name="):
                raise ConfigError(f"--name {args.name!r} " + str(exc).split(" ", 1)[1]) from None
            raise
        if args.print_config:
            print_config(cfg.to_dict())
            return 0
        from search.console import entry_point
        from search.pipeline import search_retrain_report

        raw = argv if argv is not None else sys.argv[1:]
        resume_cmd = " ".join([prog, *raw] + ([] if args.resume else ["--resume"]))
        with entry_point(cfg.tune.verbose):
            search_retrain_report(cfg, args.resume, args.address, args.data_dir, resume_cmd, started_at)
        return 0

    return _main()


if __name__ == "__main__":
    raise SystemExit(main())
