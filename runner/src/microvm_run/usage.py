"""One style for what every subcommand tells a user who typed something wrong
or pressed Ctrl-C: one line on stderr, exit 2 (bad input) or 130 (SIGINT),
never argparse's usage block or a traceback."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable

from microvm_run.contract import EXIT_BAD_INPUT

TYPE_CHECKING = False  # typing's, without importing typing (3 ms): see tests/unit/test_startup.py
if TYPE_CHECKING:
    from typing import Any, NoReturn

EXIT_INTERRUPTED = 128 + signal.SIGINT


class UsageError(Exception):
    """Bad command-line input; the message is one line."""


def quick_formatter(
    base: type[argparse.HelpFormatter] = argparse.HelpFormatter,
) -> Callable[[str], argparse.HelpFormatter]:
    """argparse's help formatter at the width argparse itself would pick
    ($COLUMNS, else the terminal's, else 80), without the import of shutil
    that argparse does for it (about 2 ms, in every run: argparse makes a
    formatter for each add_argument, help or not)."""
    columns = os.environ.get("COLUMNS", "")
    if not columns.isdigit():
        try:
            columns = str(os.get_terminal_size(sys.__stdout__.fileno()).columns)  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = "80"
    width = max(int(columns), 20) - 2
    return lambda prog: base(prog, width=width)


class Parser(argparse.ArgumentParser):
    """argparse, with its errors raised as UsageError instead of printed, and
    the quick help formatter unless told otherwise (subparsers, made with this
    class, get it too)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", quick_formatter())
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def bad_input(message: str) -> int:
    print(f"microvm-run: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def interrupted() -> int:
    print("microvm-run: interrupted", file=sys.stderr)
    return EXIT_INTERRUPTED
