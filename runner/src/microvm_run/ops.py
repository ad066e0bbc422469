"""ps, stop and gc over the instances' state files (printing is ops_cli's).

Decisions (is this instance running? which homes may go?) are plain
functions of the scanned entries, with the /proc lookups passed in, so tests
check them without processes.  Anything that signals goes through a pidfd
opened and then checked against the recorded start time (state.open_verified):
a reused pid is never signalled.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from microvm_run import host, qmp, state
from microvm_run.state import Entry, HomeRecord, InstanceState

TYPE_CHECKING = False  # typing's, without importing typing (3 ms): see tests/unit/test_startup.py
if TYPE_CHECKING:
    from typing import Any

    from microvm_run import process

# A runtime dir without a readable state this young may be a launch that has
# only just run mkdir: gc leaves it alone.
YOUNG_S = 60.0
TERM_GRACE_S = 10.0
KILL_GRACE_S = 5.0
SYSTEMCTL_TIMEOUT_S = 30.0


class StopOutcome(StrEnum):
    """What `stop` did to one instance (printed as is; --json carries the value)."""

    POWERED_OFF = "powered off"
    TERMINATED = "terminated"
    KILLED = "killed"
    NOT_RUNNING = "not running"
    UNREADABLE = "cannot stop"
    FAILED = "still running"


# What gc says of a home it may delete.
PRUNABLE = "project is gone"
# What systemctl and its user manager need, and nothing else: the runner's
# environment may hold API keys.
_SYSTEMCTL_ENV = ("PATH", "HOME", "USER", "LOGNAME", "XDG_RUNTIME_DIR", "DBUS_SESSION_BUS_ADDRESS")
# Safe inside a systemctl glob pattern.
_PLAIN_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_ACTIVE = ("active", "activating", "deactivating", "reloading", "refreshing")

Alive = Callable[[int, int], bool]
Probe = Callable[[Path], bool]


class OpsError(ValueError):
    """Bad input to an operation (an unknown id); one line for the user."""


@dataclass(frozen=True)
class Action:
    """One thing gc did (or failed to do) for an instance."""

    id: str
    what: str
    ok: bool = True


# -- is it running? ------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    entry: Entry
    live: bool  # leave it alone
    reason: str


def judge(entry: Entry, *, now: float, alive: Alive, qmp_answers: Probe) -> Verdict:
    """Whether an instance dir belongs to something that may still be running."""
    st = entry.state
    if st is not None:
        if alive(st.runner_pid, st.runner_start):
            return Verdict(entry, True, f"runner {st.runner_pid} is running")
        return Verdict(entry, False, f"runner {st.runner_pid} has exited")
    if now - entry.mtime < YOUNG_S:
        return Verdict(entry, True, f"{entry.problem}, but created under {YOUNG_S:g} s ago")
    # A runner from before state files, or one whose state got lost: its
    # QEMU still answering is proof enough that it is in use.
    if qmp_answers(entry.path / "qmp.sock"):
        return Verdict(entry, True, f"{entry.problem}, but its QEMU answers on qmp.sock")
    return Verdict(entry, False, entry.problem or "unreadable state")


# -- ps --------------------------------------------------------------------------------


@dataclass(frozen=True)
class PsRow:
    id: str
    agent: str
    project: Path
    started: str
    runner_pid: int
    qemu_pid: int
    memory_kib: int | None  # QEMU + virtiofsd RSS; None: nothing measurable
    net: str
    ports: tuple[str, ...]
    branch: str = ""  # the agent's git branch, "" without git

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "agent": self.agent,
            "project": str(self.project),
            "started": self.started,
            "runner_pid": self.runner_pid,
            "qemu_pid": self.qemu_pid,
            "memory_kib": self.memory_kib,
            "net": self.net,
            "ports": list(self.ports),
            "branch": self.branch,
        }


@dataclass(frozen=True)
class PsResult:
    rows: list[PsRow]
    stale: int  # dirs of instances that are gone (gc's business)


def ps(
    base: Path,
    *,
    alive: Alive = state.is_alive,
    rss: Callable[[int], int | None] = state.rss_kib,
    qmp_answers: Probe = qmp.probe,
    now: float | None = None,
) -> PsResult:
    rows = []
    stale = 0
    clock = time.time() if now is None else now
    for entry in state.scan(base):
        verdict = judge(entry, now=clock, alive=alive, qmp_answers=qmp_answers)
        if not verdict.live:
            stale += 1
        elif entry.state is not None:
            rows.append(_row(entry.state, alive, rss))
    return PsResult(rows, stale)


def _row(st: InstanceState, alive: Alive, rss: Callable[[int], int | None]) -> PsRow:
    sizes = [
        rss(pid)
        for pid, start in [(st.qemu_pid, st.qemu_start), *st.virtiofsd()]
        if alive(pid, start)
    ]
    measured = [size for size in sizes if size is not None]
    return PsRow(
        id=st.id,
        agent=st.agent,
        project=st.project,
        started=st.started,
        runner_pid=st.runner_pid,
        qemu_pid=st.qemu_pid,
        memory_kib=sum(measured) if measured else None,
        net=st.net,
        ports=st.ports,
        branch=st.branch,
    )


# -- stop ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StopResult:
    id: str
    outcome: StopOutcome
    detail: str = ""
    cleaned: tuple[Action, ...] = ()


@dataclass
class _Stopping:
    entry: Entry
    st: InstanceState
    pidfd: int
    outcome: StopOutcome | None = None
    detail: str = ""


def select(entries: Sequence[Entry], wanted: Sequence[str] | None, alive: Alive) -> list[Entry]:
    """The entries named by id or unique id prefix; None: every running one."""
    if wanted is None:
        return [e for e in entries if e.state and alive(e.state.runner_pid, e.state.runner_start)]
    chosen: list[Entry] = []
    for token in wanted:
        exact = [e for e in entries if e.id == token]
        matches = exact or [e for e in entries if token and e.id.startswith(token)]
        if not matches:
            raise OpsError(f"no instance {token!r} (microvm-run ps lists them)")
        if len(matches) > 1:
            ids = ", ".join(e.id for e in matches)
            raise OpsError(f"instance id {token!r} is ambiguous: {ids}")
        if matches[0] not in chosen:
            chosen.append(matches[0])
    return chosen


def running(base: Path, token: str, *, uid: int, alive: Alive = state.is_alive) -> Entry:
    """The running instance ``token`` names (an id or a unique prefix), or OpsError."""
    problem = state.base_problem(base, uid)
    if problem:
        raise OpsError(problem)
    (entry,) = select(state.scan(base), [token], alive)
    if entry.state is None:
        raise OpsError(f"instance {entry.id}: {entry.problem}")
    if not alive(entry.state.runner_pid, entry.state.runner_start):
        raise OpsError(f"instance {entry.id} is not running (microvm-run ps lists those that are)")
    return entry


def stop(
    base: Path,
    wanted: Sequence[str] | None,
    timeout_s: float,
    environ: Mapping[str, str],
    *,
    uid: int,
    term_grace_s: float = TERM_GRACE_S,
    kill_grace_s: float = KILL_GRACE_S,
) -> list[StopResult]:
    """Power off, else SIGTERM, else SIGKILL each chosen instance's runner.

    All instances go through each step together, so stopping several takes
    no longer than stopping one.  The runner does its own cleanup on the
    first two; after SIGKILL (QEMU and child daemons die with it through
    their parent-death signal) this cleans up like gc.
    """
    problem = state.base_problem(base, uid)
    if problem:
        raise OpsError(problem)
    chosen = select(state.scan(base), wanted, state.is_alive)
    results: dict[str, StopResult] = {}
    stopping: list[_Stopping] = []
    for entry in chosen:
        st = entry.state
        if st is None:
            results[entry.id] = StopResult(entry.id, StopOutcome.UNREADABLE, entry.problem or "")
            continue
        pidfd = state.open_verified(st.runner_pid, st.runner_start)
        if pidfd is None:
            detail = "its runner has exited; microvm-run gc removes what is left"
            results[entry.id] = StopResult(entry.id, StopOutcome.NOT_RUNNING, detail)
            continue
        stopping.append(_Stopping(entry, st, pidfd))
    try:
        _stop_all(stopping, timeout_s, term_grace_s, kill_grace_s)
    finally:
        for item in stopping:
            os.close(item.pidfd)
    manager: tuple[bool, str] | None = None
    for item in stopping:
        cleaned: list[Action] = []
        if item.outcome != StopOutcome.FAILED and item.entry.path.exists():
            # The runner did not get to clean up (or was killed): its QEMU,
            # units and runtime dir may still be there.
            if manager is None:
                manager = host.user_manager(environ)
            cleaned = collect(item.entry, environ, manager)
        assert item.outcome is not None
        results[item.entry.id] = StopResult(
            item.entry.id, item.outcome, item.detail, tuple(cleaned)
        )
    return [results[entry.id] for entry in chosen]


def _stop_all(
    stopping: list[_Stopping], timeout_s: float, term_grace_s: float, kill_grace_s: float
) -> None:
    from microvm_run import process  # noqa: PLC0415 - subprocess and ctypes: keeps `ps` quick

    asked: list[_Stopping] = []
    for item in stopping:
        # Tells the runner (and so the user at its terminal) who stopped it.
        with contextlib.suppress(OSError):
            fd = os.open(
                item.entry.path / state.STOP_REQUESTED,
                os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
            )
            os.close(fd)
        why_not = qmp.powerdown(item.st.qmp_socket) if item.st.qemu_pid else "QEMU not started"
        if why_not is None:
            asked.append(item)
        else:
            item.detail = f"no clean power-off: {why_not}"
    powered_off = process.wait_exits([item.pidfd for item in asked], timeout_s)
    left = [item for item in stopping if item.pidfd not in powered_off]
    stopped = process.stop(
        [item.pidfd for item in left], grace=term_grace_s, kill_grace=kill_grace_s
    )
    for item in stopping:
        outcome = stopped.get(item.pidfd, process.Stopped.BY_ITSELF)
        if item.pidfd in powered_off or (outcome is process.Stopped.BY_ITSELF and item in asked):
            item.outcome = StopOutcome.POWERED_OFF
        elif outcome is process.Stopped.SURVIVED:
            item.outcome = StopOutcome.FAILED
            item.detail = f"runner {item.st.runner_pid} survived SIGKILL"
        elif outcome is process.Stopped.KILLED:
            item.outcome = StopOutcome.KILLED
        else:
            item.outcome = StopOutcome.TERMINATED


# -- gc ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HomeAction:
    record: HomeRecord
    what: str
    ok: bool = True


@dataclass
class GcReport:
    actions: list[Action] = field(default_factory=list)
    live: list[Verdict] = field(default_factory=list)  # left alone
    homes: list[HomeAction] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(a.ok for a in self.actions) and all(h.ok for h in self.homes)


def gc(
    base: Path,
    environ: Mapping[str, str],
    *,
    prune: bool,
    confirm: Callable[[str], bool],
    uid: int,
    now: float | None = None,
    alive: Alive = state.is_alive,
    qmp_answers: Probe = qmp.probe,
    project_exists: Callable[[Path], bool | None] | None = None,
) -> GcReport:
    """Remove what dead instances left; list (and with prune delete) orphaned homes."""
    report = GcReport()
    problem = state.base_problem(base, uid)
    entries = [] if problem else state.scan(base)
    if problem:
        report.actions.append(Action("-", f"runtime dirs left alone: {problem}", ok=False))
    clock = time.time() if now is None else now
    verdicts = [judge(e, now=clock, alive=alive, qmp_answers=qmp_answers) for e in entries]
    report.live = [v for v in verdicts if v.live]
    dead = [v for v in verdicts if not v.live]
    manager = host.user_manager(environ) if dead else (False, "")
    for verdict in dead:
        report.actions.append(Action(verdict.entry.id, f"stale: {verdict.reason}"))
        report.actions += collect(verdict.entry, environ, manager)

    from microvm_run import instancelog  # noqa: PLC0415 - only gc reads them: keeps `ps` quick

    # Logs of instances that no longer run (instancelog.py): kept until now.
    # A young one may belong to a launch that has not made its runtime dir yet.
    live_ids = {v.entry.id for v in report.live}
    for path in instancelog.listing(environ):
        instance_id = path.name.removesuffix(instancelog.SUFFIX)
        with contextlib.suppress(OSError):
            if clock - path.stat().st_mtime < YOUNG_S and not instancelog.stopped(path):
                continue
        if instance_id not in live_ids:
            try:
                path.unlink()
                report.actions.append(Action(instance_id, f"removed log {path}"))
            except OSError as err:
                report.actions.append(
                    Action(instance_id, f"could not remove {path}: {err}", ok=False)
                )

    # Resolved on both sides: a launch plans its home through the resolved
    # data home, this scan goes through the configured one.
    in_use = {_resolved(v.entry.state.agent_home) for v in report.live if v.entry.state is not None}
    records = state.scan_homes(host.data_home(environ), project_exists)
    for record, said in home_verdicts(records, in_use):
        gone = f"project {record.project} is gone"
        if said != PRUNABLE:
            report.homes.append(HomeAction(record, said))
        elif not prune:
            report.homes.append(HomeAction(record, f"{gone} (microvm-run gc --prune deletes it)"))
        elif not confirm(f"delete {record.path} ({gone})?"):
            report.homes.append(HomeAction(record, f"kept ({gone})"))
        else:
            report.homes.append(_delete_home(record, environ))
    return report


def home_verdicts(
    records: Sequence[HomeRecord], in_use: Collection[Path]
) -> list[tuple[HomeRecord, str]]:
    """What gc says about each home worth mentioning; PRUNABLE ones may be deleted.

    Homes whose project exists are not mentioned.  Only a home whose own
    record names a project that hashes to this very home, and whose project
    is certainly gone, is ever PRUNABLE.
    """
    said = []
    projects = {r.project for r in records if r.matches and r.project is not None}
    for record in records:
        if not record.matches or record.project is None:
            why = f" ({record.problem})" if record.problem else ""
            said.append((record, f"unknown project, left alone{why}"))
        elif record.project_exists is True:
            continue
        elif record.project_exists is None:
            said.append((record, f"cannot tell whether {record.project} exists, left alone"))
        elif _resolved(record.path) in in_use or record.path in in_use:
            why = f"project {record.project} is gone but a running instance uses it"
            said.append((record, f"{why}, left alone"))
        elif outer := _containing_project(record.project, projects):
            # An agent on the outer project could have moved this one away
            # (or renamed it): gone from its path is not gone.
            why = f"project {record.project} is gone from its path, but it lay inside {outer}"
            said.append((record, f"{why}, where an agent could have moved it; left alone"))
        else:
            said.append((record, PRUNABLE))
    return said


def _resolved(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError):
        return path


def _containing_project(project: Path, projects: Collection[Path]) -> Path | None:
    """The nearest other project with a home that contains ``project``."""
    outer = [p for p in projects if p != project and project.is_relative_to(p)]
    return max(outer, key=lambda p: len(p.parts)) if outer else None


def _delete_home(record: HomeRecord, environ: Mapping[str, str]) -> HomeAction:
    error = remove_tree(record.path)
    if error:
        # The record stays, so the next gc still finds the rest.
        return HomeAction(record, f"could not delete: {error}", ok=False)
    with contextlib.suppress(FileNotFoundError):
        record.record_path.unlink()
    if record.project is not None:
        # The runner's own files for that project go with it (dev-shell
        # cache and consent, container storage); failing here loses nothing.
        remove_tree(host.cri_storage_dir(record.agent, record.project, environ))
        remove_tree(host.project_state_dir(record.project, environ))
    return HomeAction(record, f"deleted (project {record.project} was gone)")


def collect(entry: Entry, environ: Mapping[str, str], manager: tuple[bool, str]) -> list[Action]:
    """Remove what one dead instance left: its units, processes and runtime dir."""
    actions = []
    st = entry.state
    if st is not None:
        actions += _stop_units(entry.id, list(st.units), environ, manager)
        leftovers = [("qemu", st.qemu_pid, st.qemu_start)]
        leftovers += [("virtiofsd", pid, start) for pid, start in st.virtiofsd()]
        actions += _kill_leftovers(entry.id, leftovers)
    elif manager[0] and _PLAIN_ID.fullmatch(entry.id):
        # No state to name its units: find them by the instance id they end in.
        pattern = f"*-vm-virtiofsd-*-{entry.id}.service"
        actions += _stop_units(entry.id, _list_units(pattern, environ), environ, manager)
    if st is not None:
        actions += _close_shares(entry.id, st)
    error = remove_tree(entry.path)
    if error:
        actions.append(Action(entry.id, f"could not remove {entry.path}: {error}", ok=False))
    else:
        actions.append(Action(entry.id, f"removed {entry.path}"))
    return actions


def _close_shares(instance_id: str, st: InstanceState) -> list[Action]:
    """What a killed runner could not undo after its guest: share root modes,
    set-uid/set-gid bits and write for group and others in the project and
    the home."""
    from microvm_run import safefs  # noqa: PLC0415 - only cleaning up needs it: keeps `ps` quick

    uid = os.getuid()
    fixed: list[str] = []
    failed: list[str] = []
    for root, is_home in ((st.project, False), (st.agent_home, True)):
        # Both were resolved when the launch was planned: a symlink on the
        # way now is an outer agent's, never followed.
        with contextlib.suppress(OSError):
            fd = safefs.check_share_root(root, uid, resolved=True)
            try:
                mode = os.fstat(fd).st_mode & 0o7777
                wanted = 0o700 if is_home else mode & ~0o022
                if mode != wanted:
                    os.fchmod(fd, wanted)
            finally:
                os.close(fd)
        repair = safefs.strip_unsafe_modes(root, uid, resolved=True)
        fixed += repair.setid
        if repair.failed:
            more = f" and {len(repair.failed) - 1} more" if len(repair.failed) > 1 else ""
            failed.append(
                f"could not check the modes of {safefs.shown(repair.failed[0])}{more} "
                f"in {safefs.shown(root)}"
            )
    actions = [Action(instance_id, what, ok=False) for what in failed]
    if fixed:
        what = f"removed set-uid/set-gid bits the guest set on {len(fixed)} file(s)"
        actions.append(Action(instance_id, what))
    return actions


def _kill_leftovers(instance_id: str, leftovers: Sequence[tuple[str, int, int]]) -> list[Action]:
    """The processes of a runner that died (checked by start time, so never a
    later process with a reused pid), ended through the one stop ladder with
    no grace: nothing is left to shut down cleanly once the runner is gone."""
    named: dict[int, tuple[str, int]] = {}
    for what, pid, start in leftovers:
        pidfd = state.open_verified(pid, start)
        if pidfd is not None:
            named[pidfd] = (what, pid)
    if not named:
        return []
    from microvm_run import process  # noqa: PLC0415 - see _stop_all

    try:
        outcomes = process.stop(list(named), grace=0.0)
    finally:
        for pidfd in named:
            os.close(pidfd)
    actions = []
    for pidfd, (what, pid) in named.items():
        outcome = outcomes[pidfd]
        if outcome is process.Stopped.SURVIVED:
            actions.append(
                Action(instance_id, f"leftover {what} (pid {pid}) survived SIGKILL", ok=False)
            )
        elif outcome is not process.Stopped.BY_ITSELF:
            actions.append(Action(instance_id, f"killed leftover {what} (pid {pid})"))
    return actions


def _stop_units(
    instance_id: str, units: list[str], environ: Mapping[str, str], manager: tuple[bool, str]
) -> list[Action]:
    if not units:
        return []
    reachable, reason = manager
    if not reachable:
        return [Action(instance_id, f"cannot stop units {', '.join(units)}: {reason}", ok=False)]
    shown = _systemctl(["is-active", "--", *units], environ)
    states = shown.stdout.split() if shown is not None else []
    if len(states) != len(units):
        states = ["active"] * len(units)  # unknown: stopping an inactive unit is harmless
    actions = []
    for unit, unit_state in zip(units, states, strict=True):
        if unit_state not in _ACTIVE:
            continue
        result = _systemctl(["stop", "--", unit], environ)
        if result is not None and result.returncode == 0:
            actions.append(Action(instance_id, f"stopped unit {unit}"))
        else:
            why = result.stderr.strip().splitlines()[-1:] if result is not None else []
            detail = f": {why[0]}" if why else ""
            actions.append(Action(instance_id, f"could not stop unit {unit}{detail}", ok=False))
    # A unit that failed stays listed until reset; harmless when there is none.
    _systemctl(["reset-failed", "--", *units], environ)
    return actions


def _list_units(pattern: str, environ: Mapping[str, str]) -> list[str]:
    listed = _systemctl(
        ["list-units", "--all", "--plain", "--no-legend", "--full", "--", pattern], environ
    )
    if listed is None or listed.returncode != 0:
        return []
    return [line.split()[0] for line in listed.stdout.splitlines() if line.strip()]


def _systemctl(args: list[str], environ: Mapping[str, str]) -> process.Completed | None:
    from microvm_run import process  # noqa: PLC0415 - see _stop_all

    env = {name: environ[name] for name in _SYSTEMCTL_ENV if name in environ}
    try:
        return process.run(["systemctl", "--user", *args], env=env, timeout=SYSTEMCTL_TIMEOUT_S)
    except process.ProcessError:
        return None


def remove_tree(path: Path) -> str | None:
    """rm -rf that also empties read-only directories; None or why it failed.

    Homes hold read-only trees (Go's module cache, copied store paths) whose
    entries cannot be unlinked until the directory is writable again, and
    the guest can make them deeper than any recursion: the walk is
    iterative (safefs.walk_tree) and follows no symlink.
    """
    from microvm_run import safefs  # noqa: PLC0415 - see _close_shares

    try:
        with safefs.opened_dir(path) as top:
            if os.fstat(top).st_mode & stat.S_IRWXU != stat.S_IRWXU:
                os.fchmod(top, 0o700)
            for step in safefs.walk_tree(top, unlock=True):
                if step.leaving:
                    os.rmdir(step.name, dir_fd=step.fd)
                    continue
                for name in step.names:
                    info = os.stat(name, dir_fd=step.fd, follow_symlinks=False)
                    if not stat.S_ISDIR(info.st_mode):
                        os.unlink(name, dir_fd=step.fd)
        path.rmdir()
    except FileNotFoundError:
        return None
    except OSError as err:
        return f"{err.strerror or err} ({safefs.shown(err.filename or path)})"
    return None
