"""User-facing errors.

Anything the *user* can fix (a bad config, a missing data file, an unknown
checkpoint) raises a subclass of :class:`BssError`. Command-line entry points
catch it and print one line -- what is wrong and how to fix it -- with exit
status 2 and no traceback. Programming errors stay ordinary exceptions so they
keep their tracebacks.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any


class BssError(Exception):
    """A problem with the user's input; the message names the problem and the fix."""

    exit_code = 2


class ConfigError(BssError):
    """Malformed config file, unknown key, wrong type or out-of-range value."""


class DataError(BssError):
    """Missing, truncated or corrupt dataset file."""


class CheckpointError(BssError):
    """A checkpoint that is missing, not a checkpoint, or from an incompatible config."""


# A line a person reads: a message that quotes a huge value (a list of millions) is cut to this length.
MAX_LINE = 2000


def one_line(message: str) -> str:
    """Collapse a message onto one line so the CLI contract ("one line") holds."""
    return " ".join(str(message).split())


def error_line(message: str) -> str:
    """:func:`one_line`, cut to about MAX_LINE characters."""
    line = one_line(message)
    if len(line) <= MAX_LINE:
        return line
    return f"{line[: MAX_LINE - 40]} ... [{len(line) - MAX_LINE + 40:,} more characters]"


def cli_entry(main: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a CLI ``main`` so user errors print one line and exit 2.

    KeyboardInterrupt exits 130 quietly (the conventional status for SIGINT).
    """

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return main(*args, **kwargs)
        except BssError as exc:
            print(f"error: {error_line(exc)}", file=sys.stderr)
            raise SystemExit(exc.exit_code) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(130) from None

    return wrapper
