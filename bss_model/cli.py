"""What every command line shares, in one place.

- ``--version`` on every command (the one version: ``bss_model.__version__``, which pyproject.toml reads);
- ``--config`` takes a YAML path or the name of a shipped config (``--config smoke``: ``bss_model.configs``),
  so an installed package works without a checkout; ``--list-configs`` names them;
- ``--print-config``: the resolved config as YAML, then exit (what the run would save beside its results);
- overrides as ``--set a.b=v`` or bare ``a.b=v`` arguments, the form W&B sweeps (``${args_no_hyphens}``) and
  Hydra-style sweepers pass. Bare ones apply after the ``--set`` ones; the last value of a key wins;
- the extras: a command whose optional dependencies are missing says which ``pip install`` brings them.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from bss_model import __version__
from bss_model.errors import BssError, ConfigError

# The optional dependencies of each extra (pyproject.toml), by import name.
EXTRAS = {
    "search": ("ray", "optuna", "tensorboard", "matplotlib"),
    "mlflow": ("mlflow",),
    "wandb": ("wandb",),
    "postgresql": ("psycopg",),
}


class MissingExtra(BssError):
    """An optional dependency the command needs is not installed; the message names the pip command."""


def require_extra(extra: str, what: str, modules: tuple[str, ...] | None = None) -> None:
    """Raise :class:`MissingExtra` unless every module of ``extra`` is importable; ``what`` needs them."""
    missing = [m for m in (modules or EXTRAS[extra]) if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtra(
            f"{what} needs the '{extra}' extra ({', '.join(missing)} not installed): pip install 'bss-search[{extra}]'"
        )


def shipped_configs() -> ModuleType:
    """``bss_model.configs``, imported when a command needs it (never by a trial: the modules Ray ships to a
    cluster's nodes are bss_model/ and search/ alone). In a checkout that is on ``sys.path`` but not installed,
    it is ``configs/`` beside ``bss_model/``, loaded by path."""
    try:
        from bss_model import configs

        return configs
    except ImportError:
        init = Path(__file__).resolve().parent.parent / "configs" / "__init__.py"
        spec = importlib.util.spec_from_file_location("bss_model.configs", init)
        if spec is None or spec.loader is None or not init.exists():
            raise
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules["bss_model.configs"] = module
        return module


def command_name(script: str, by_path: str) -> str:
    """How the user ran the command, for its usage line and the ``--resume`` command it prints: the console
    script (``bss-search``) or the file run by path (``python search/run.py``)."""
    return script if Path(sys.argv[0]).name == script else by_path


def config_list() -> str:
    """The shipped configs, one a line: name, kind, what it is for; then which commands take each kind."""
    shipped = shipped_configs()
    names = shipped.names()
    width = max(map(len, names))
    lines = [f"{name:<{width}}  {shipped.kind(name):<6}  {shipped.summary(name)}" for name in names]
    lines.append("")
    lines += [f"{kind} configs are for {cmd}" for kind, cmd in shipped.COMMANDS.items()]
    return "\n".join(lines)


class _ListConfigs(argparse.Action):
    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        print(config_list())
        parser.exit()


def add_common_flags(parser: argparse.ArgumentParser, script: str, config_kind: str | None = None) -> None:
    """``--version``; with ``config_kind`` (the kind ``--config`` takes) also ``--list-configs``,
    ``--print-config`` and bare ``KEY=VALUE`` overrides (read them with :func:`overrides`)."""
    parser.add_argument("--version", action="version", version=f"{script} (bss-search) {__version__}")
    if config_kind is None:
        return
    parser.add_argument("--list-configs", action=_ListConfigs, help="name the configs shipped with bss-search; exit")
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config as YAML and exit (nothing is run)"
    )
    parser.add_argument(
        "overrides", nargs="*", default=[], metavar="KEY=VALUE",
        help="overrides like --set, bare (as W&B sweeps and Hydra-style sweepers pass them); applied after --set",
    )  # fmt: skip
    shipped = shipped_configs()
    kinds = {kind: [n for n in shipped.names() if shipped.kind(n) == kind] for kind in (shipped.SEARCH, shipped.MODEL)}
    parser.epilog = (
        f"--config takes a YAML file or a shipped config's name: {', '.join(kinds[config_kind])} "
        f"({config_kind} configs; --list-configs says what each is for)"
    )


def overrides(args: argparse.Namespace) -> list[str]:
    """``--set`` items then bare ``KEY=VALUE`` arguments, each bare one checked to be an override."""
    bare = list(getattr(args, "overrides", []) or [])
    for item in bare:
        key = item.split("=", 1)[0].strip()
        if "=" not in item or not key or any(not part for part in key.split(".")):
            raise ConfigError(
                f"argument {item!r} is not an override: write KEY=VALUE, e.g. train.lr=3e-4 (or --set KEY=VALUE)"
            )
    return [*getattr(args, "sets", []), *bare]


def resolve_config(value: str, kind: str, flag: str = "--config") -> str:
    """The YAML file ``--config value`` means: a file that exists, else the shipped config of that name.

    A shipped config of the other kind, or a name nothing answers to, is one line naming the configs
    this command takes.
    """
    if Path(value).expanduser().exists():
        return value
    shipped = shipped_configs()
    names = shipped.names()
    fitting = [n for n in names if shipped.kind(n) == kind]
    stem = Path(value).stem
    if value in names:
        if shipped.kind(value) != kind:
            takes = shipped.COMMANDS[shipped.kind(value)]
            raise ConfigError(
                f"{flag} {value} is a {shipped.kind(value)} config (for {takes}), but this command takes {kind} "
                f"configs: use one of {', '.join(fitting)}, or a YAML file"
            )
        return str(shipped.path(value))
    if "/" not in value and not value.endswith((".yaml", ".yml")):
        raise ConfigError(
            f"{flag} {value}: no such file, and no shipped config of that name: pass a YAML file, or one of "
            f"{', '.join(fitting)} (--list-configs)"
        )
    if stem in names and shipped.kind(stem) == kind:
        raise ConfigError(
            f"config file {value} does not exist (this is not a checkout?): the shipped one is {flag} {stem}"
        )
    return value  # the loader's own line: does not exist, is a directory, ...


def print_config(data: dict[str, Any]) -> None:
    """The resolved config, as YAML on stdout (for ``--print-config``)."""
    import yaml

    sys.stdout.write(yaml.safe_dump(data, sort_keys=False))
    sys.stdout.flush()
