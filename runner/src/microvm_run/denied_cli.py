"""``microvm-run denied ID``: what the egress proxy refused a running instance.

One line per refused destination a rule could lift, with the command that
lifts it: the runtime dir's ``denied`` file (denials.py), which the runner
writes, never the guest.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from typing import NoReturn

from microvm_run import denials, host, ops
from microvm_run.contract import EXIT_BAD_INPUT


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _UsageError(message)


def main(argv: Sequence[str], environ: Mapping[str, str]) -> int:
    parser = _Parser(
        prog="microvm-run denied",
        description="List what a running instance was refused, with the command to allow each.",
    )
    parser.add_argument("id", metavar="ID", help="instance id or unique prefix (microvm-run ps)")
    try:
        args = parser.parse_args(list(argv[1:]))
        entry = ops.running(host.runtime_base(environ, os.getuid()), args.id, uid=os.getuid())
    except SystemExit as done:  # --help
        return done.code if isinstance(done.code, int) else 0
    except (_UsageError, ops.OpsError) as err:
        print(f"microvm-run: denied: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    lines = denials.read(entry.path)
    for line in lines:
        print(line)
    if not lines:
        print(f"{entry.id}: nothing refused so far")
    return 0
