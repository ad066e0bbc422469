"""``microvm-run denied ID``: what the egress proxy refused an instance.

One line per refused destination a rule could lift, with the command that
lifts it: for a running instance the runtime dir's ``denied`` file
(denials.py), for a finished one its log's ``refused`` events
(instancelog.py); the runner writes both, never the guest.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence

from microvm_run import denials, host, instancelog, ops, usage
from microvm_run.contract import EXIT_BAD_INPUT
from microvm_run.netpolicy import Refusal


def main(argv: Sequence[str], environ: Mapping[str, str]) -> int:
    parser = usage.Parser(
        prog="microvm-run denied",
        description="List what a running instance was refused, with the command to allow each.",
    )
    parser.add_argument("id", metavar="ID", help="instance id or unique prefix (microvm-run ps)")
    try:
        args = parser.parse_args(list(argv[1:]))
    except SystemExit as done:  # --help
        return done.code if isinstance(done.code, int) else 0
    except usage.UsageError as err:
        print(f"microvm-run: denied: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        entry = ops.running(host.runtime_base(environ, os.getuid()), args.id, uid=os.getuid())
        instance_id, lines = entry.id, denials.read(entry.path)
    except ops.OpsError as err:
        # A finished instance: its log has what was refused.
        try:
            instance_id, lines = _from_log(environ, args.id)
        except ValueError:
            print(f"microvm-run: denied: {err}", file=sys.stderr)
            return EXIT_BAD_INPUT
    for line in lines:
        print(line)
    if not lines:
        print(f"{instance_id}: nothing refused")
    return 0


def _from_log(environ: Mapping[str, str], token: str) -> tuple[str, list[str]]:
    """The refusals a finished instance's log recorded, as the guest was told them."""
    path = instancelog.find(environ, token)
    instance_id = path.name.removesuffix(instancelog.SUFFIX)
    mode = "?"
    lines = []
    for raw in instancelog.read_lines(path)[0]:
        record = instancelog.parse(raw) or {}
        if record.get("event") == "start":
            mode = str(record.get("net", "?"))
        elif record.get("event") == "refused":
            refusal = Refusal(
                host=str(record.get("host", "?")),
                port=int(record.get("port", 0)),
                why=str(record.get("why", "")),
                fix=record.get("fix"),
                mode=mode,
                instance_id=instance_id,
            )
            lines.append(refusal.text())
    return instance_id, lines
