"""The virtiofsd daemons of one launch: two supervisors behind one interface.

``UnitSupervisor`` starts each daemon as a transient systemd user unit (the
user manager keeps it; cleanup stops the unit), ``ChildSupervisor`` as a
child of the runner (with a parent-death signal, like QEMU).  The launch
sees only ``VirtiofsdSupervisor``: ``start``, the started ``daemons`` (each
with a pidfd to watch), ``units`` for the state file, and ``stop_steps``
for cleanup.  Both stop through process.stop, the one stop ladder.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from microvm_run import process
from microvm_run.egresslog import printable
from microvm_run.plan import VirtiofsdPlan
from microvm_run.virtiofsd import Supervisor

SOCKET_DEADLINE_S = 10.0
UNIT_START_TIMEOUT_S = 30.0
# virtiofsd exits by itself once QEMU disconnects: how long to let it.
SELF_EXIT_GRACE_S = 1.0
_POLL_S = 0.01


class DaemonError(RuntimeError):
    """A daemon did not start; one line for the user."""


@dataclass
class Daemon:
    """A started virtiofsd: its plan, its pid and a pidfd to watch it."""

    plan: VirtiofsdPlan
    pid: int
    pidfd: int


class VirtiofsdSupervisor(Protocol):
    daemons: list[Daemon]
    # Every unit this launch asked for, recorded before systemd-run: a unit
    # whose start was interrupted is still stopped by cleanup.
    units: list[str]

    def start(self, plans: Sequence[VirtiofsdPlan]) -> None: ...

    def stop_steps(self, *, qemu_ran: bool) -> list[Callable[[], None]]:
        """One cleanup step per daemon (and per unit without one)."""
        ...


def supervisor_for(kind: Supervisor, environ: Mapping[str, str]) -> VirtiofsdSupervisor:
    if kind is Supervisor.SYSTEMD:
        return UnitSupervisor(environ)
    return ChildSupervisor(environ)


class ChildSupervisor:
    """virtiofsd as children of the runner: they die with it."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.environ = environ
        self.daemons: list[Daemon] = []
        self.units: list[str] = []
        self._children: dict[int, process.Child] = {}

    def start(self, plans: Sequence[VirtiofsdPlan]) -> None:
        for plan in plans:
            with plan.log.open("ab") as log:
                child = process.spawn(
                    plan.argv, env=self.environ, stdin=process.DEVNULL, stdout=log, stderr=log
                )
            self._children[child.pidfd] = child
            self.daemons.append(Daemon(plan=plan, pid=child.pid, pidfd=child.pidfd))

    def stop_steps(self, *, qemu_ran: bool) -> list[Callable[[], None]]:
        return [
            functools.partial(self._stop, self._children[daemon.pidfd], qemu_ran=qemu_ran)
            for daemon in self.daemons
        ]

    def _stop(self, child: process.Child, *, qemu_ran: bool) -> None:
        # Without QEMU (an aborted start-up) nothing will disconnect: don't wait.
        settle = SELF_EXIT_GRACE_S if qemu_ran else 0.0
        process.stop([child.pidfd], settle=settle)
        child.close()


class UnitSupervisor:
    """virtiofsd as transient systemd user units."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.environ = environ
        self.daemons: list[Daemon] = []
        self.units: list[str] = []

    def start(self, plans: Sequence[VirtiofsdPlan]) -> None:
        """One transient unit per share, all started at once.

        Each systemd-run waits for the user manager to start its unit; run
        side by side they cost about one round trip instead of one per share.
        """
        starting = []
        for plan in plans:
            self.units.append(plan.unit)
            starting.append(
                process.spawn(
                    [
                        "systemd-run", "--user", "--quiet", "--collect",
                        f"--unit={plan.unit}",
                        f"--property=StandardOutput=append:{plan.log}",
                        f"--property=StandardError=append:{plan.log}",
                        "--", *plan.argv,
                    ],
                    env=self.environ,
                    stdin=process.DEVNULL,
                    stdout=process.DEVNULL,
                    stderr=process.PIPE,
                )
            )  # fmt: skip
        failures = []
        deadline = time.monotonic() + UNIT_START_TIMEOUT_S
        for plan, start in zip(plans, starting, strict=True):
            try:
                _, err = start.communicate(timeout=max(deadline - time.monotonic(), 0.1))
            except process.TimeoutExpired:
                start.stop()
                failures.append(f"systemd-run for {plan.unit} did not finish in time")
                continue
            finally:
                start.close()
            if start.returncode != 0:
                failures.append(f"systemd-run could not start {plan.unit}: {last_line(err)}")
        if failures:
            raise DaemonError(failures[0])
        pids = main_pids([plan.unit for plan in plans], self.environ)
        for plan in plans:
            pid, reason = pids.get(plan.unit, (0, "the user manager does not know it"))
            if pid <= 0:
                raise DaemonError(f"virtiofsd for share {plan.tag}: no main process ({reason})")
            self.daemons.append(Daemon(plan=plan, pid=pid, pidfd=_pidfd(pid, plan)))

    def stop_steps(self, *, qemu_ran: bool) -> list[Callable[[], None]]:
        steps: list[Callable[[], None]] = [
            functools.partial(self._stop, daemon, qemu_ran=qemu_ran) for daemon in self.daemons
        ]
        watched = {daemon.plan.unit for daemon in self.daemons}
        steps += [
            functools.partial(stop_unit, unit, self.environ)
            for unit in self.units
            if unit not in watched
        ]
        return steps

    def _stop(self, daemon: Daemon, *, qemu_ran: bool) -> None:
        settle = SELF_EXIT_GRACE_S if qemu_ran else 0.0
        term = functools.partial(_stop_unit_of, daemon.plan.unit, self.environ)
        process.stop([daemon.pidfd], settle=settle, term=term)
        os.close(daemon.pidfd)


def _stop_unit_of(unit: str, environ: Mapping[str, str], _pidfd: int) -> None:
    stop_unit(unit, environ)


def stop_unit(unit: str, environ: Mapping[str, str]) -> None:
    # Harmless when the unit is already gone.
    process.run(["systemctl", "--user", "stop", unit], env=environ, timeout=30)


def main_pids(units: Sequence[str], environ: Mapping[str, str]) -> dict[str, tuple[int, str]]:
    """Each unit's main pid (0 and why, if none), from one systemctl call."""
    shown = process.run(
        ["systemctl", "--user", "show", "--property=Id", "--property=MainPID", *units],
        env=environ,
        timeout=UNIT_START_TIMEOUT_S,
    )
    if shown.returncode != 0:
        reason = last_line(shown.stderr)
        return dict.fromkeys(units, (0, reason))
    pids = {}
    # One block of KEY=VALUE lines per unit, blocks separated by empty lines.
    for block in shown.stdout.split("\n\n"):
        fields = dict(line.partition("=")[::2] for line in block.splitlines() if "=" in line)
        pid = fields.get("MainPID", "0")
        # Id is the full name; the units were named without ".service".
        unit = fields.get("Id", "").removesuffix(".service")
        pids[unit] = (int(pid) if pid.isdigit() else 0, "it exited at once")
    return pids


def _pidfd(pid: int, plan: VirtiofsdPlan) -> int:
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        raise DaemonError(f"virtiofsd for share {plan.tag} exited at once") from None


def wait_for_sockets(daemons: Sequence[Daemon]) -> None:
    deadline = time.monotonic() + SOCKET_DEADLINE_S
    for daemon in daemons:
        while not daemon.plan.socket.exists():
            if process.exited(daemon.pidfd):
                raise DaemonError(
                    f"virtiofsd for share {daemon.plan.tag} ({daemon.plan.shared_dir}) "
                    "exited before its socket appeared"
                )
            if time.monotonic() > deadline:
                raise DaemonError(
                    f"virtiofsd for share {daemon.plan.tag} did not create "
                    f"{daemon.plan.socket} within {SOCKET_DEADLINE_S:.0f} s"
                )
            time.sleep(_POLL_S)


def show_logs(daemons: Sequence[Daemon], *, problems_only: bool = False) -> None:
    """The last lines of each virtiofsd's log; with ``problems_only``, only its
    errors (a guest that powered off on its own left the daemons healthy: their
    start-up lines and routine warnings, such as the open-file limit, would
    bury the guest's own reason)."""
    for daemon in daemons:
        with contextlib.suppress(OSError):
            lines = daemon.plan.log.read_text(errors="replace").strip().splitlines()
            if problems_only:
                lines = [line for line in lines if " ERROR " in line]
            if lines:
                # A path the guest named can be in a line: nothing of it may
                # reach the user's terminal as a control sequence.
                tail = "\n  ".join(printable(line, spaces=True, limit=500) for line in lines[-5:])
                process.log(f"virtiofsd {daemon.plan.tag} log:\n  {tail}")


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no output"
