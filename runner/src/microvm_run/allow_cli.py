"""``microvm-run allow ID HOST[:PORT] [--once | --project] [--private]``.

Adds a rule to a running instance's policy: a line in its runtime dir's live
file (live.py), which the egress proxy reads before its next decision.
``--project`` also appends the entry to the per-project allowlist (in the
user's config, outside the project), so later launches have it.  Nothing in
a share is read or written.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from microvm_run import host, live, netpolicy, ops, usage
from microvm_run.atomic import make_private_dir


def _parser() -> argparse.ArgumentParser:
    parser = usage.Parser(
        prog="microvm-run allow",
        description="Let a running instance reach HOST[:PORT] from its next connection on.",
    )
    parser.add_argument("id", metavar="ID", help="instance id or unique prefix (microvm-run ps)")
    parser.add_argument(
        "entry", metavar="HOST[:PORT]", help="a host, *.suffix, either with :port (else 80/443)"
    )
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("--once", action="store_true", help="for one connection only")
    scope.add_argument(
        "--project",
        action="store_true",
        help="also for later launches on this project (the per-project allow file)",
    )
    parser.add_argument(
        "--private",
        action="store_true",
        help="even where HOST resolves to loopback, the LAN or this host (as --allow-private)",
    )
    return parser


def main(argv: Sequence[str], environ: Mapping[str, str]) -> int:
    try:
        args = _parser().parse_args(list(argv[1:]))
        rule = netpolicy.parse_allow(args.entry, private=args.private)
        entry = ops.running(host.runtime_base(environ, os.getuid()), args.id, uid=os.getuid())
    except SystemExit as done:  # --help
        return done.code if isinstance(done.code, int) else 0
    except (usage.UsageError, netpolicy.PolicyError, ops.OpsError) as err:
        return usage.bad_input(f"allow: {err}")
    st = entry.state
    assert st is not None  # ops.running
    if st.net == "none":
        return usage.bad_input(
            f"allow: instance {entry.id} runs with --net none: it has no network"
        )
    if st.net == "open" and not rule.private:
        return usage.bad_input(
            f"allow: instance {entry.id} runs with --net open, which admits every public host "
            "already; --private admits one that resolves inwards"
        )
    if args.project and rule.private:
        return usage.bad_input(
            "allow: --project keeps allowlist entries; --private is for this run"
        )
    try:
        live.append(entry.path, rule, once=args.once)
        saved = _add_to_project(st.agent, st.project, environ, args.entry) if args.project else None
    except (OSError, UnicodeDecodeError, host.HostError) as err:
        print(f"microvm-run: allow: {err}", file=sys.stderr)
        return 1
    scope = "for one connection" if args.once else "while it runs"
    print(f"{entry.id}: allowed {live.render(rule, once=False).strip()} {scope}")
    if saved is not None:
        print(f"  and for later launches: added to {saved}")
    return 0


def _add_to_project(agent: str, project: Path, environ: Mapping[str, str], entry: str) -> Path:
    """Append ``entry`` to the per-project allow file unless it has it already."""
    path = host.project_allow_file(agent, project, environ)
    make_private_dir(path.parent)
    try:
        text = path.read_text()
    except FileNotFoundError:
        text = ""
    wanted = netpolicy.normalise_host(entry)
    if wanted in (netpolicy.normalise_host(e) for e in host.read_project_allow(path)):
        return path
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        prefix = "\n" if text and not text.endswith("\n") else ""
        os.write(fd, f"{prefix}{wanted}\n".encode())
    finally:
        os.close(fd)
    return path
