"""``microvm-run logs [ID] [--follow] [--json]``: an instance's log (instancelog.py).

Without an ID: one line per kept log (id, start, agent, project, exit).
With one: its events, one line each (``--json``: the JSON lines as stored);
``--follow`` keeps printing new events until the instance stops.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from microvm_run import host, instancelog, state, usage
from microvm_run.contract import EXIT_BAD_INPUT


def _parser() -> argparse.ArgumentParser:
    parser = usage.Parser(
        prog="microvm-run logs",
        description="Show an instance's log: start, refusals, notifications, egress, git, stop.",
    )
    parser.add_argument("id", nargs="?", metavar="ID", help="instance id or unique prefix")
    parser.add_argument("--follow", "-f", action="store_true", help="print new events as they come")
    parser.add_argument("--json", action="store_true", help="the JSON lines as stored")
    return parser


def main(argv: Sequence[str], environ: Mapping[str, str]) -> int:
    try:
        args = _parser().parse_args(list(argv[1:]))
        if args.id is None and args.follow:
            raise usage.UsageError("--follow needs an instance ID")
        path = instancelog.find(environ, args.id) if args.id is not None else None
    except SystemExit as done:  # --help
        return done.code if isinstance(done.code, int) else 0
    except (usage.UsageError, ValueError) as err:
        print(f"microvm-run: logs: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if path is None:
        return _list(environ, as_json=args.json)
    instance_id = path.name.removesuffix(instancelog.SUFFIX)
    if args.follow:
        base = host.runtime_base(environ, os.getuid())
        lines = instancelog.follow(path, lambda: _running(base, instance_id))
    else:
        lines = iter(instancelog.read_lines(path)[0])
    for line in lines:
        record = instancelog.parse(line)
        if record is None:
            continue
        print(json.dumps(record) if args.json else instancelog.describe(record), flush=True)
    return 0


def _running(base: Path, instance_id: str) -> bool:
    st = state.read_state(base / instance_id).state
    return st is not None and state.is_alive(st.runner_pid, st.runner_start)


def _list(environ: Mapping[str, str], *, as_json: bool) -> int:
    rows = []
    for path in instancelog.listing(environ):
        start: dict[str, Any] = {}
        stop: dict[str, Any] = {}
        for line in instancelog.read_lines(path)[0]:
            record = instancelog.parse(line) or {}
            if record.get("event") == "start":
                start = record
            elif record.get("event") == "stop":
                stop = record
        rows.append(
            {
                "id": path.name.removesuffix(instancelog.SUFFIX),
                "started": start.get("time", "?"),
                "agent": start.get("agent", "?"),
                "project": start.get("project", "?"),
                "exit": stop.get("exit", "running" if not stop else "?"),
            }
        )
    if as_json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print("no instance logs")
    for row in [] if as_json else rows:
        print(
            f"{row['id']}  {row['started']}  {row['agent']}  exit {row['exit']}  {row['project']}"
        )
    return 0
