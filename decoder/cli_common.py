"""What every command-line entry point shares: its exit statuses and how it prints warnings.

Exit status 2 is a usage error: the command line itself is wrong (a malformed or out-of-range value,
flags that do not go together, a malformed profile reference), found from the arguments alone,
before any model loads. Exit status 1 is a runtime error: what the arguments name fails (a missing
or corrupt file, profile or cached model, a model that does not load, an unreachable server) or
does not fit the loaded model (a head outside it, a context longer than its own). Either way the
command prints one line on stderr, no traceback, and writes nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from collections.abc import Iterator
from decoder.loading import DTYPE_NAMES, check_device

__all__ = ["EXIT_RUNTIME", "EXIT_USAGE", "UsageError", "check_model_options", "examples", "one_line_warnings"]

EXIT_RUNTIME = 1
EXIT_USAGE = 2


class UsageError(ValueError):
    """The command line itself is wrong: printed as one line, exit status `EXIT_USAGE`."""


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


@contextlib.contextmanager
def one_line_warnings(prog: str) -> Iterator[None]:
    """While open, print each warning as `prog: warning: message` on one line (no file, line or source)."""
    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ARG001
        kind = "warning" if category is UserWarning else f"warning ({category.__name__})"
        stream = file if file is not None else sys.stderr
        try:
            stream.write(f"{prog}: {kind}: {_one_line(message)}\n")
        except (OSError, ValueError):  # stderr closed: a warning is not worth a crash
            pass

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous


def check_model_options(device: str | None, dtype: str | None) -> None:
    """`--device` and `--dtype` checked before the model loads (a UsageError naming what is accepted)."""
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise UsageError(f"--dtype {dtype!r} is not accepted; use one of {', '.join(DTYPE_NAMES)}")
    try:
        check_device(device)
    except ValueError as err:
        raise UsageError(f"--device: {err}") from None


class _ExamplesFormatter(argparse.HelpFormatter):
    """argparse's formatter, except that an "examples:" epilog keeps its lines (one command per line)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("examples:"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def examples(*commands: str) -> dict:
    """Keyword arguments for `add_parser` that end the sub-command's --help with these example commands."""
    return {"epilog": "examples:\n" + "\n".join(f"  {command}" for command in commands),
            "formatter_class": _ExamplesFormatter}
