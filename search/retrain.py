"""Retrain one configuration over seeds, evaluate each with the reference protocol, report.

    python search/retrain.py --experiment results/smoke          # the best config of a finished search
    python search/retrain.py --experiment results/pareto --pick params<=50000   # another point of its front
    python search/retrain.py --config configs/seed.yaml --seeds 5  # a configuration named directly
    bss-retrain --experiment results/smoke                         # the installed console script

The seeds run as parallel Ray trials (a grid over ``train.seed``), checkpointed and
resumable like the search: rerunning on the same experiment continues the retrain
without retraining seeds that had finished.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any

from bss_model.cli import add_common_flags, command_name, overrides, print_config, require_extra, resolve_config
from bss_model.errors import ConfigError, cli_entry


def main(argv: list[str] | None = None) -> int:
    @cli_entry
    def _main() -> int:
        prog = command_name("bss-retrain", "python search/retrain.py")
        p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
        src = p.add_mutually_exclusive_group(required=True)
        src.add_argument("--experiment", help="a finished search's folder (results/<name>)")
        src.add_argument("--config", help="a bss_model config to retrain directly: a YAML file or a shipped name")
        p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                       help="with --config: override a config key (repeatable)")  # fmt: skip
        p.add_argument("--pick", default=None, metavar="RULE",
                       help="with --experiment: the trial to retrain -- best, knee, or a limit such as params<=50000 "
                       "(a search with tune.objectives [val_mse, <cost>]); a pick other than the experiment's own "
                       "retrains into <experiment>/picks/<pick>/, leaving the first retrain as it is")  # fmt: skip
        p.add_argument("--seeds", type=int, default=None, help="number of seeds (default: the config's, else 5)")
        p.add_argument("--name", default=None, help="with --config: experiment name (default: the config's stem)")
        p.add_argument("--storage-path", default=None,
                       help="with --config: where the experiment folder goes (default: results)")  # fmt: skip
        p.add_argument("--max-concurrent", type=int, default=None, help="seeds trained at once")
        p.add_argument("--cpus-per-trial", type=float, default=None)
        p.add_argument("--gpus-per-trial", type=float, default=None)
        p.add_argument("--resume", action="store_true", help="with --config: continue an existing retrain")
        p.add_argument("--verbose", action="store_true", help="Ray Tune's own trial tables too (tune.verbose=2)")
        p.add_argument("--address", default=None, help="Ray cluster address (else $RAY_ADDRESS, else local Ray)")
        p.add_argument("--data-dir", default=None, help="folder with mnist/ and fashion-mnist/")
        add_common_flags(p, "bss-retrain", "model")
        args = p.parse_args(argv)
        require_extra("search", prog)
        from search import guard, lock
        from search.console import entry_point
        from search.pipeline import finished_search, named_config, pick_retrain_report, retrain_report
        from search.storage import experiment_root, root_of

        args.sets = overrides(args)  # bare KEY=VALUE arguments are --set items
        given = {"--experiment": (args.experiment, "a finished search's folder (results/<name>)"),
                 "--config": (args.config, "a bss_model config file"), "--name": (args.name, "a name"),
                 "--storage-path": (args.storage_path, "a folder"),
                 "--pick": (args.pick, "best, knee or a limit such as params<=50000")}  # fmt: skip
        for flag, (value, what) in given.items():
            if value is not None and not value.strip():
                raise ConfigError(f"{flag} {value!r} is empty: pass {what}")
        if args.experiment is not None:
            # These shape a new experiment from --config; a finished search's retrain has its own (never ignore them).
            given = [flag for flag, value in (("--set", args.sets), ("--name", args.name),
                     ("--storage-path", args.storage_path), ("--resume", args.resume)) if value]  # fmt: skip
            if given:
                flags, verb = ", ".join(given), "applies" if len(given) == 1 else "apply"
                raise ConfigError(
                    f"{flags} {verb} only with --config: --experiment retrains the search's best config with the "
                    "experiment's own settings, in its own folder, continuing whatever retrain it has; drop "
                    f"{flags} (to change settings, use `search/run.py --resume` or a new search)"
                )
            target = root_of(args.experiment)
        elif args.pick:
            raise ConfigError(
                "--pick applies only with --experiment: it chooses a point of a finished search's front; a config "
                "retrained with --config has no search to pick from"
            )
        else:
            storage_path = args.storage_path or "results"
            config = resolve_config(args.config, "model")
            named = named_config(config, args.sets, args.name, storage_path)
            target = experiment_root(named)

        def with_flags(cfg: Any) -> Any:
            for flag, section, key in (("seeds", cfg.retrain, "seeds"),
                                       ("max_concurrent", cfg.retrain, "max_concurrent"),
                                       ("cpus_per_trial", cfg.tune, "cpus_per_trial"),
                                       ("gpus_per_trial", cfg.tune, "gpus_per_trial")):  # fmt: skip
                if getattr(args, flag) is not None:
                    setattr(section, key, getattr(args, flag))
            if args.verbose:
                cfg.tune.verbose = 2
            return cfg

        if args.print_config:  # reads and writes nothing: no lock (which would make the folder)
            print_config(with_flags(finished_search(args.experiment)[1] if args.experiment else named).to_dict())
            return 0
        # One driver per experiment, held before its files are read: a search still running there is named.
        with lock.hold(target):
            if args.experiment:
                root, cfg, summary = finished_search(args.experiment)
            else:
                root, cfg, summary = None, named, None
            cfg = with_flags(cfg)
            raw = list(argv if argv is not None else sys.argv[1:])
            again = "--resume" in raw or args.experiment  # --experiment continues its retrain without the flag
            resume_cmd = shlex.join([*prog.split(), *raw] + ([] if again else ["--resume"]))  # pasted back as typed
            with entry_point(cfg.tune.verbose), guard.resume_said(target, resume_cmd):
                if args.pick:
                    pick_retrain_report(cfg, summary, root, args.pick, args.address, args.data_dir, resume_cmd)
                else:
                    retrain_report(cfg, summary, root, args.resume, args.address, args.data_dir, resume_cmd)
        return 0

    return _main()


if __name__ == "__main__":
    raise SystemExit(main())
