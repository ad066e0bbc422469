"""One style for what every subcommand tells a user who typed something wrong
or pressed Ctrl-C: one line on stderr, exit 2 (bad input) or 130 (SIGINT),
never argparse's usage block or a traceback."""

from __future__ import annotations

import argparse
import signal
import sys
from typing import NoReturn

from microvm_run.contract import EXIT_BAD_INPUT

EXIT_INTERRUPTED = 128 + signal.SIGINT


class UsageError(Exception):
    """Bad command-line input; the message is one line."""


class Parser(argparse.ArgumentParser):
    """argparse, with its errors raised as UsageError instead of printed."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def bad_input(message: str) -> int:
    print(f"microvm-run: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def interrupted() -> int:
    print("microvm-run: interrupted", file=sys.stderr)
    return EXIT_INTERRUPTED
