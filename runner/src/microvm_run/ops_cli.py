"""The operations subcommands: ``microvm-run ps | stop | gc | doctor``.

cli.main hands argv here when its first word is one of SUBCOMMANDS.  This
module parses and prints; ops.py and doctor.py decide and act.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from microvm_run import host, hostvms, ops, usage
from microvm_run.qemu import Accel

TYPE_CHECKING = False  # typing's, without importing typing (3 ms): see tests/unit/test_startup.py
if TYPE_CHECKING:
    from datetime import tzinfo

    from microvm_run import doctor

# doctor and git_cli (and the spec parser they bring) are imported by the
# subcommands that use them: `ps` and `stop` stay quick.

SUBCOMMANDS = ("ps", "stop", "gc", "doctor")
_STOPPED = (
    ops.StopOutcome.POWERED_OFF,
    ops.StopOutcome.TERMINATED,
    ops.StopOutcome.KILLED,
    ops.StopOutcome.NOT_RUNNING,
)


def main(
    argv: Sequence[str],
    environ: Mapping[str, str],
    *,
    boot: doctor.BootFn | None = None,
    ask: Callable[[str], str] | None = None,
) -> int:
    """Run one subcommand; returns the exit status.

    ``boot`` backs ``doctor --boot`` (see doctor.BootFn); ``ask`` replaces
    input() for gc's questions (tests; None: input() on a terminal).
    """
    try:
        args = _parser(environ).parse_args(list(argv))
    except usage.UsageError as err:
        return usage.bad_input(str(err))
    except SystemExit as done:  # --help
        return done.code if isinstance(done.code, int) else 0
    uid = os.getuid()
    base = host.runtime_base(environ, uid)
    try:
        if args.command == "ps":
            return _ps(base, environ, as_json=args.json)
        if args.command == "stop":
            return _stop(args, base, environ, uid)
        if args.command == "gc":
            return _gc(args, base, environ, uid, ask)
        return _doctor(args, environ, boot)
    except ops.OpsError as err:
        return usage.bad_input(str(err))


def _parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = usage.Parser(prog="microvm-run", description="Manage running microVM instances.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    ps = commands.add_parser("ps", help="list running instances")
    ps.add_argument("--json", action="store_true", help="print a JSON list")
    stop = commands.add_parser("stop", help="power off instances (then SIGTERM, SIGKILL)")
    stop.add_argument("ids", nargs="*", metavar="ID", help="instance id or unique prefix")
    stop.add_argument("--all", action="store_true", help="every running instance")
    stop.add_argument(
        "--timeout",
        metavar="SECONDS",
        default="10",
        help="how long the guest gets to power off before SIGTERM (default 10)",
    )
    gc = commands.add_parser("gc", help="remove what dead instances left behind")
    gc.add_argument(
        "--prune", action="store_true", help="also delete agent homes whose project is gone"
    )
    gc.add_argument("--yes", action="store_true", help="with --prune: do not ask")
    gc.add_argument(
        "--worktree",
        metavar="NAME",
        action="append",
        default=[],
        help="with --prune: also remove this agent run (worktree) though it is not landed",
    )
    check = commands.add_parser("doctor", help="check this host's prerequisites")
    check.add_argument("--spec", default=environ.get("MICROVM_RUN_SPEC"), help="the guest spec")
    check.add_argument("--boot", action="store_true", help="also boot the flavor and run `true`")
    check.add_argument(
        "--accel", default=environ.get("MICROVM_ACCEL", "kvm"), choices=[a.value for a in Accel]
    )
    return parser


# -- ps ----------------------------------------------------------------------------------


def _ps(base: Path, environ: Mapping[str, str], *, as_json: bool) -> int:
    result = ops.ps(base)
    if as_json:
        import json  # noqa: PLC0415 - only --json needs it

        print(json.dumps([row.to_dict() for row in result.rows], indent=2))
    elif not result.rows:
        print("no running instances")
    else:
        print(format_table(result.rows, environ.get("HOME")))
    if not as_json:
        _ps_host_vms(environ)
    if result.stale:
        plural = "s" if result.stale != 1 else ""
        print(
            f"microvm-run: {result.stale} stale instance{plural}: run microvm-run gc",
            file=sys.stderr,
        )
    return 0


def _ps_host_vms(environ: Mapping[str, str]) -> None:
    """The VMs declared on this NixOS host (services.agent-microvm), when there are any."""
    try:
        vms = hostvms.load(hostvms.registry_path(environ))
    except hostvms.RegistryError as err:
        print(f"microvm-run: {err}", file=sys.stderr)
        return
    if not vms:
        return
    rows = [("VM", "STATE", "ADDRESS")]
    rows += [(vm.name, hostvms.state(vm, environ), vm.address) for vm in vms]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    print()
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )


def format_table(rows: Sequence[ops.PsRow], user_home: str | None, tz: tzinfo | None = None) -> str:
    header = ("ID", "AGENT", "PROJECT", "STARTED", "PID", "MEM", "NET", "PORTS", "BRANCH")
    table = [header] + [
        (
            row.id,
            row.agent,
            _tilde(row.project, user_home),
            format_started(row.started, tz),
            str(row.runner_pid),
            human_kib(row.memory_kib),
            row.net,
            ",".join(row.ports) or "-",
            row.branch or "-",
        )
        for row in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in table
    )


def human_kib(kib: int | None) -> str:
    if kib is None:
        return "-"
    if kib < 1024:
        return f"{kib}K"
    if kib < 1024 * 1024:
        return f"{round(kib / 1024)}M"
    return f"{kib / (1024 * 1024):.1f}G"


def format_started(started: str, tz: tzinfo | None = None) -> str:
    """Local time to the minute (tz: for tests)."""
    from datetime import datetime  # noqa: PLC0415 - only instances that run have a time

    try:
        moment = datetime.fromisoformat(started)
    except ValueError:
        return started
    return moment.astimezone(tz).strftime("%Y-%m-%d %H:%M")


def _tilde(path: Path, user_home: str | None) -> str:
    if user_home and user_home != "/":
        home = Path(user_home)
        if path == home or home in path.parents:
            return "~" + str(path)[len(str(home)) :]
    return str(path)


# -- stop --------------------------------------------------------------------------------


def _stop(args: argparse.Namespace, base: Path, environ: Mapping[str, str], uid: int) -> int:
    if args.ids and args.all:
        return usage.bad_input("stop: name instances or pass --all, not both")
    if not args.ids and not args.all:
        return usage.bad_input(
            "stop: name the instances to stop (IDs from microvm-run ps) or --all"
        )
    try:
        timeout = float(args.timeout)
    except ValueError:
        return usage.bad_input(f"stop: --timeout must be a number of seconds, not {args.timeout!r}")
    if not 0 <= timeout < math.inf:  # also refuses nan
        return usage.bad_input(f"stop: --timeout must be 0 or more seconds, not {args.timeout}")
    results = ops.stop(base, None if args.all else args.ids, timeout, environ, uid=uid)
    if not results:
        print("microvm-run: no running instances", file=sys.stderr)
    failed = False
    for result in results:
        detail = f" ({result.detail})" if result.detail else ""
        print(f"{result.id}  {result.outcome}{detail}")
        for action in result.cleaned:
            print(f"  {action.what}")
        failed |= result.outcome not in _STOPPED or not all(a.ok for a in result.cleaned)
    return 1 if failed else 0


# -- gc ----------------------------------------------------------------------------------


def _gc(
    args: argparse.Namespace,
    base: Path,
    environ: Mapping[str, str],
    uid: int,
    ask: Callable[[str], str] | None,
) -> int:
    if args.prune and not args.yes and ask is None:
        if not sys.stdin.isatty():
            return usage.bad_input(
                "gc --prune asks before deleting each home and needs a terminal; "
                "pass --yes to delete without asking"
            )
        ask = input
    asker = ask

    def confirm(question: str) -> bool:
        if args.yes:
            return True
        assert asker is not None
        try:
            answer = asker(f"{question} [y/N] ")
        except EOFError:
            return False
        return answer.strip().lower() in ("y", "yes")

    report = ops.gc(base, environ, prune=args.prune, confirm=confirm, uid=uid)
    for action in report.actions:
        print(f"{action.id}: {action.what}")
    running = [v for v in report.live if v.entry.state is not None]
    for verdict in report.live:
        if verdict.entry.state is None:
            print(f"{verdict.entry.id}: left alone ({verdict.reason})")
    if running:
        plural = "s" if len(running) != 1 else ""
        print(f"{len(running)} running instance{plural} left alone")
    for outcome in report.homes:
        print(f"home {outcome.record.path}: {outcome.what}")
    # Agent runs (git_cli.py): landed worktrees go; unlanded ones only by name.
    from microvm_run import git_cli  # noqa: PLC0415 - see the note at the imports

    pruned = git_cli.prune(environ, explicit=args.worktree) if args.prune else []
    for line in pruned:
        print(line)
    if not report.actions and not report.homes and not report.live and not pruned:
        print("nothing to clean up")
    return 0 if report.ok else 1


# -- doctor ------------------------------------------------------------------------------


def _doctor(
    args: argparse.Namespace, environ: Mapping[str, str], boot: doctor.BootFn | None
) -> int:
    if args.boot and boot is None:
        return usage.bad_input("doctor --boot is not available in this build")
    from microvm_run import doctor  # noqa: PLC0415 - see the note at the imports

    checks = []
    for check in doctor.iter_checks(
        environ, spec_path=args.spec, accel=Accel(args.accel), boot=boot if args.boot else None
    ):
        print(check.line(), flush=True)
        checks.append(check)
    return doctor.exit_status(checks)
