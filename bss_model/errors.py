"""User-facing errors.

Anything the *user* can fix (a bad config, a missing data file, an unknown
checkpoint) raises a subclass of :class:`BssError`. Command-line entry points
catch it and print one line -- what is wrong and how to fix it -- with exit
status 2 and no traceback. Programming errors stay ordinary exceptions so they
keep their tracebacks.
"""

from __future__ import annotations

import errno
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


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C (``search.guard``); exits 143 (128 + SIGTERM), as a shell reports it."""

    exit_code = 143


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

    KeyboardInterrupt exits 130 quietly (the conventional status for SIGINT), SIGTERM (:class:`Terminated`) 143;
    a full disk (ENOSPC, EDQUOT) is one line too, exit 75 (EX_TEMPFAIL).
    """

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return main(*args, **kwargs)
        except BssError as exc:
            print(f"error: {error_line(exc)}", file=sys.stderr)
            raise SystemExit(exc.exit_code) from None
        except KeyboardInterrupt as exc:
            print("interrupted" + (" (SIGTERM)" if isinstance(exc, Terminated) else ""), file=sys.stderr)
            raise SystemExit(getattr(exc, "exit_code", 130)) from None
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            # A full disk is the machine's state, not a bug: one line, like the user errors.
            where = f" writing {exc.filename}" if exc.filename else ""
            print(f"error: no space left on the device{where} ({exc.strerror}): free some space, then run the "
                  "command again (with --resume where it has one, to continue)", file=sys.stderr)  # fmt: skip
            raise SystemExit(75) from None

    return wrapper
