"""Carry out a LaunchPlan: start the daemons, run QEMU, clean up.

The runner runs QEMU as a child and waits for it instead of exec'ing it,
because three things must happen after QEMU has started: the boot deadline
(a guest that never reports ``ready`` is stopped), reading the agent's exit
status from the status port, and removing what the launch created (units,
child daemons, sockets, credentials, the runtime dir).  QEMU gets a
parent-death signal, so even a SIGKILLed runner leaves no VM running.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import functools
import os
import selectors
import shutil
import signal
import socket
import stat
import sys
import termios
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from microvm_run import (
    daemons,
    denials,
    evalguard,
    host,
    instancelog,
    localdirs,
    notify,
    process,
    safefs,
    shareroots,
    state,
)
from microvm_run.atomic import make_private_dir
from microvm_run.contract import (
    EXIT_BOOT_DEADLINE,
    EXIT_NO_STATUS,
    GuestStatus,
)
from microvm_run.daemons import Daemon, DaemonError, VirtiofsdSupervisor
from microvm_run.netpolicy import Refusal
from microvm_run.plan import LaunchPlan

DAEMON_DEATH_GRACE_S = 1.0
POWEROFF_GRACE_S = 30.0
# A guest that writes without newlines must not grow the runner's memory.
MAX_STATUS_LINE = 4096
MAX_LOGGED_NOTIFICATIONS = 100
_POLL_S = 0.01


class LaunchError(RuntimeError):
    """The launch failed before or around the guest; one line for the user."""


class Interrupted(Exception):
    """A signal arrived before QEMU started: abort the start-up."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass
class Instance:
    """What this launch created, so cleanup removes exactly that."""

    plan: LaunchPlan
    virtiofsd: VirtiofsdSupervisor
    listener: socket.socket | None = None
    status_conn: socket.socket | None = None  # to send the guest terminal sizes
    guest_ready: bool = False
    egress: Any = None  # the EgressProxy, when the plan has a network
    qemu: process.Child | None = None
    runtime_dir_created: bool = False
    started: str = ""  # ISO 8601 UTC, for ps
    signum: int | None = None
    # After the first signal QEMU was sent SIGTERM; it is killed if it still
    # runs at this time.monotonic() (a wedged QEMU must not keep Ctrl-C waiting).
    stop_deadline: float | None = None
    cleaning: bool = False
    work_mode: int | None = None  # the project dir's mode before the guest ran
    # Refusals from the egress thread, handled on the main thread: the
    # thread appends and writes a byte to wake_w, which wakes the watcher.
    # A signal handler wakes it the same way.
    refusals: collections.deque[Refusal] = field(default_factory=collections.deque)
    wake_r: int = -1
    wake_w: int = -1
    denials: denials.Denials | None = None
    to_guest: list[str] = field(default_factory=list)  # status lines waiting for `ready`
    notifier: notify.Notifier | None = None  # the guest's `notify TEXT` lines
    log: instancelog.InstanceLog | None = None  # `microvm-run logs`

    def event(self, kind: str, **fields: Any) -> None:
        if self.log is not None:
            self.log.event(kind, **fields)


def launch(
    plan: LaunchPlan, environ: Mapping[str, str], log: instancelog.InstanceLog | None = None
) -> int:
    # The keys go to the guest through credential files or stay with the
    # key proxy: no child (QEMU, virtiofsd, systemctl) gets them in its
    # environment.
    child_env = process.without(environ, plan.secret_vars)
    instance = Instance(plan, daemons.supervisor_for(plan.supervisor, child_env), log=log)
    instance.notifier = notify.Notifier(plan.agent, plan.instance_id, environ)
    instance.event("start", **instancelog.plan_summary(plan))
    instance.work_mode = _work_mode(plan)
    with _terminal_restored(), _signals_forwarded(instance):
        try:
            try:
                create_private_dirs(plan.dirs_to_create)
                if plan.local_image is not None:
                    # The runner's own file in its state dir; the guest formats it.
                    localdirs.ensure_image(plan.local_image, plan.local_size_bytes)
                roots = shareroots.identities(plan, os.getuid())
                _prepare_runtime_dir(plan, instance)
                _record(instance)
                # After the record, so an evaluation that starts now sees this VM.
                evalguard.wait_for_evaluations(plan.runtime_dir.parent, plan.work_dir, process.log)
                _write_launch_files(plan, environ)
                instance.listener = _listen(plan.status_socket)
                instance.wake_r, instance.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
                _start_egress(plan, instance, environ)
                instance.virtiofsd.start(plan.virtiofsd)
                _record(instance)
                daemons.wait_for_sockets(instance.virtiofsd.daemons)
                _confirm_roots(instance, roots)
                instance.qemu = process.spawn(plan.qemu_argv, env=child_env)
                _record(instance)
            except (OSError, process.ProcessError, DaemonError) as err:
                raise LaunchError(str(err)) from None
            return _supervise(instance)
        except Interrupted as stop:
            process.log(f"interrupted by {stop}; cleaning up")
            return 128 + stop.signum
        except LaunchError:
            daemons.show_logs(instance.virtiofsd.daemons)
            raise
        finally:
            _cleanup(instance)


# -- preparing ---------------------------------------------------------------


def create_private_dirs(dirs: Sequence[Path]) -> None:
    """The share roots the runner owns (agent home, container storage), 0700.

    Each is checked to be a real directory of this user, not a symlink the
    guest left, and its mode is re-applied on every launch: a guest's
    ``chmod 0777 ~`` must not leave the home open to other local users.
    """
    for directory in dirs:
        try:
            make_private_dir(directory)
            os.close(safefs.check_share_root(directory, os.getuid(), 0o700))
        except OSError as err:
            raise LaunchError(f"cannot use {directory}: {err.strerror or err}") from None
        if not os.access(directory, os.W_OK | os.X_OK):
            raise LaunchError(f"{directory} is not writable")


def _work_mode(plan: LaunchPlan) -> int | None:
    """The project dir's mode to restore after the guest, never writable by all.

    A world-writable project root is what a guest's ``chmod 0777 /work``
    leaves when its runner was killed before restoring it: closed here.
    """
    try:
        fd = safefs.check_share_root(plan.work_dir, os.getuid(), resolved=True)
    except OSError:
        return None
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        if mode & stat.S_IWOTH:
            os.fchmod(fd, mode & ~stat.S_IWOTH)
            process.log(f"{plan.work_dir} was writable by everyone; it is not any more")
        return mode & ~stat.S_IWOTH
    finally:
        os.close(fd)


def restore_shares(plan: LaunchPlan, work_mode: int | None) -> None:
    """After the guest: share roots get their modes back, set-id bits go.

    The guest can chmod its share roots (``chmod 0777 /work``) and make
    set-uid files (``chmod 4755``); virtiofsd stores both on the host.
    """
    uid = os.getuid()
    roots: list[tuple[Path, int | None]] = [(plan.work_dir, work_mode)]
    roots += [(directory, 0o700) for directory in plan.dirs_to_create]
    # What the guest saw of git: the runner's worktree (/work with
    # --worktree) and the agent's git directory (/work/.git).
    walked = [plan.work_dir, plan.agent_home]
    if plan.git is not None and plan.git.mode != "gitfile":
        if plan.git.share_root != plan.work_dir:
            roots.append((plan.git.share_root, 0o700))
            walked.append(plan.git.share_root)
        walked.append(plan.git.agent_git)
    fixed: list[str] = []
    # Resolved when planned: a symlink on their way now is an outer agent's.
    resolved = (plan.work_dir, plan.agent_home)
    for root, mode in roots:
        with contextlib.suppress(OSError):
            os.close(safefs.check_share_root(root, uid, mode, resolved=root in resolved))
    # Container storage keeps its images' set-uid files (su, ping): its root
    # is 0700 again, so no other user can reach them.  Each tree on its own:
    # trouble in /work must not spare the home.
    for root in walked:
        repair = safefs.strip_unsafe_modes(root, uid, resolved=root in resolved)
        fixed += [safefs.shown(root / name) for name in repair.setid]
        if repair.failed:
            more = f" and {len(repair.failed) - 1} more" if len(repair.failed) > 1 else ""
            process.log(
                f"could not check the modes of {safefs.shown(repair.failed[0])}{more} "
                f"in {safefs.shown(root)}: look for set-uid files there yourself"
            )
    if fixed:
        shown = ", ".join(fixed[:3]) + (f" and {len(fixed) - 3} more" if len(fixed) > 3 else "")
        process.log(f"removed set-uid/set-gid bits the guest set on {shown}")


def _prepare_runtime_dir(plan: LaunchPlan, instance: Instance) -> None:
    base = plan.runtime_dir.parent
    try:
        make_private_dir(base)
        info = base.lstat()
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            raise LaunchError(f"{base} is not a directory owned by you; remove it")
        if info.st_mode & 0o077:
            base.chmod(0o700)
        plan.runtime_dir.mkdir(mode=0o700)
    except FileExistsError:
        raise LaunchError(f"runtime dir {plan.runtime_dir} already exists") from None
    except OSError as err:
        raise LaunchError(f"cannot create runtime dir {plan.runtime_dir}: {err.strerror}") from None
    instance.runtime_dir_created = True


def _write_launch_files(plan: LaunchPlan, environ: Mapping[str, str]) -> None:
    _write_private(plan.launch_file, plan.launch_data.encode())
    if plan.credentials:
        plan.credentials[0][1].parent.mkdir(mode=0o700)
    for var, path in plan.credentials:
        _write_private(path, environ[var].encode())


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
    except OSError as err:
        raise LaunchError(f"cannot write {path}: {err.strerror}") from None
    finally:
        os.close(fd)


def _listen(path: Path) -> socket.socket:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    listener.setblocking(False)
    return listener


# -- the instance's state file (read by ps, stop and gc) ---------------------------


def _record(instance: Instance) -> None:
    """Write what this launch runs to state.toml, atomically.

    Written after each step that starts something, so a runner killed at any
    point leaves gc a record of what to clean up.
    """
    plan = instance.plan
    if not instance.started:
        instance.started = state.now_utc()
        with contextlib.suppress(OSError, ValueError):
            # Lets gc find homes whose project is gone; never worth a failed launch.
            state.write_home_record(plan.agent_home, plan.work_dir, plan.agent)
    qemu_pid = instance.qemu.pid if instance.qemu is not None else 0
    started = instance.virtiofsd.daemons
    record = state.InstanceState(
        id=plan.instance_id,
        agent=plan.agent,
        project=plan.work_dir,
        agent_home=plan.agent_home,
        spec=plan.spec,
        started=instance.started,
        runner_pid=os.getpid(),
        runner_start=state.process_start_time(os.getpid()) or 0,
        qmp_socket=plan.qmp_socket,
        qemu_pid=qemu_pid,
        qemu_start=(state.process_start_time(qemu_pid) or 0) if qemu_pid else 0,
        virtiofsd_pids=tuple(d.pid for d in started),
        virtiofsd_starts=tuple(state.process_start_time(d.pid) or 0 for d in started),
        supervisor=plan.supervisor,
        units=tuple(instance.virtiofsd.units),
        memory_mib=plan.memory_mib,
        vcpus=plan.vcpus,
        net=plan.net,
        ports=plan.port_forwards,
        branch=plan.git.branch if plan.git is not None and plan.git.mode != "gitfile" else "",
    )
    try:
        state.write_state(plan.runtime_dir, record)
    except (OSError, ValueError) as err:
        raise LaunchError(f"cannot write the instance state: {err}") from None


def _stop_requested(plan: LaunchPlan) -> bool:
    return (plan.runtime_dir / state.STOP_REQUESTED).exists()


# -- the egress proxy ------------------------------------------------------------


def _start_egress(plan: LaunchPlan, instance: Instance, environ: Mapping[str, str]) -> None:
    """Bound before QEMU starts: no proxy, no VM (the policy fails closed)."""
    if plan.egress is None:
        return
    from microvm_run.egress import EgressError, EgressProxy  # noqa: PLC0415 - not for --net none

    keys = {route.var: environ.get(route.var, "") for route in plan.egress.key_routes}
    instance.denials = denials.Denials(plan.runtime_dir)

    def refused(refusal: Refusal) -> None:  # on the egress thread
        instance.refusals.append(refusal)
        with contextlib.suppress(OSError):
            os.write(instance.wake_w, b"!")

    instance.egress = EgressProxy(plan.egress, keys, on_refusal=refused)
    try:
        instance.egress.start()
    except EgressError as err:
        raise LaunchError(str(err)) from None


def _stop_egress(instance: Instance) -> None:
    egress = instance.egress
    egress.stop()
    summary = egress.summary()
    if summary:
        process.log(summary)
    top = instancelog.MAX_HOSTS
    instance.event(
        "egress",
        allowed=dict(egress.allowed_hosts.most_common(top)),
        allowed_total=egress.allowed,
        denied=dict(egress.denied.most_common(top)),
        denied_total=sum(egress.denied.values()),
        key_proxy={
            var: {"requests": use[0], "bytes_up": use[1], "bytes_down": use[2]}
            for var, use in egress.key_use.items()
        },
    )


def _confirm_roots(instance: Instance, roots: Mapping[Path, shareroots.Identity]) -> None:
    served = [(d.plan.tag, d.plan.shared_dir, d.pid) for d in instance.virtiofsd.daemons]
    try:
        shareroots.confirm(served, roots, daemons.SOCKET_DEADLINE_S)
    except shareroots.ShareSwapped as err:
        raise LaunchError(str(err)) from None


# -- supervising --------------------------------------------------------------


def _supervise(instance: Instance) -> int:
    watcher = _Watcher(instance)
    try:
        return watcher.run()
    finally:
        watcher.close()


class _Watcher:
    """Follows QEMU, the status port and the daemons until QEMU ends."""

    def __init__(self, instance: Instance) -> None:
        assert instance.listener is not None  # created before QEMU starts
        assert instance.qemu is not None
        self.instance = instance
        self.qemu = instance.qemu
        self.listener = instance.listener
        self.qemu_pidfd = instance.qemu.pidfd
        self.poller = selectors.DefaultSelector()
        self.poller.register(self.qemu_pidfd, selectors.EVENT_READ, "qemu")
        self.poller.register(self.listener, selectors.EVENT_READ, "listener")
        for daemon in instance.virtiofsd.daemons:
            self.poller.register(daemon.pidfd, selectors.EVENT_READ, daemon)
        self.poller.register(instance.wake_r, selectors.EVENT_READ, "wake")
        _handle_refusals(instance)  # any from before QEMU started
        self.conn: socket.socket | None = None
        self.status = GuestStatus()
        self.buffer = b""
        self.failure: str | None = None
        self.code = EXIT_NO_STATUS
        self.poweroff_deadline: float | None = None
        self.notified = 0

    def run(self) -> int:
        plan = self.instance.plan
        boot_deadline = time.monotonic() + plan.boot_timeout_s
        while True:
            events = self.poller.select(self._timeout(boot_deadline))
            # On every pass: a stream of status or wake events must not
            # postpone the kill of a QEMU that ignored SIGTERM.
            if self._kill_if_stop_overdue() and not events:
                continue
            if not events and self.poweroff_deadline is not None:
                # The agent has reported; a guest whose power-off hangs does
                # not keep the user waiting.
                process.log(
                    f"the guest did not power off within {POWEROFF_GRACE_S:g} s; stopped it"
                )
                _stop_qemu(self.instance)
                continue
            if not events and not self.status.ready:
                self._fail(
                    f"the guest did not come up within {plan.boot_timeout_s:g} s "
                    "(--boot-timeout); stopped it. If this host's KVM cannot run the "
                    "guest kernel, try --accel tcg",
                    EXIT_BOOT_DEADLINE,
                )
            for key, _ in events:
                if key.data == "qemu":
                    self.qemu.wait()
                    self._read_status(until_eof=True)
                    return self._result()
                if key.data == "listener":
                    self._accept()
                elif key.data == "status":
                    self._read_status(until_eof=False)
                elif key.data == "wake":
                    with contextlib.suppress(OSError):
                        os.read(self.instance.wake_r, 4096)
                    _handle_refusals(self.instance)
                elif isinstance(key.data, Daemon):
                    self.poller.unregister(key.fileobj)
                    # QEMU ending disconnects virtiofsd, which then exits; its
                    # death may be seen first.  Only a daemon that dies under a
                    # QEMU that stays up is a fault.
                    if self.status.exit_code is None and not self.qemu.exited(DAEMON_DEATH_GRACE_S):
                        self._fail(
                            f"virtiofsd for share {key.data.plan.tag} died while the VM ran; "
                            "stopped the VM",
                            EXIT_NO_STATUS,
                        )

    def _timeout(self, boot_deadline: float) -> float | None:
        """Until ready: the boot deadline; after exit N: the power-off grace;
        after a signal, no later than the time QEMU has to stop."""
        timeout = self._deadline_timeout(boot_deadline)
        if self.instance.stop_deadline is not None:
            left = max(0.0, self.instance.stop_deadline - time.monotonic())
            timeout = left if timeout is None else min(timeout, left)
        return timeout

    def _deadline_timeout(self, boot_deadline: float) -> float | None:
        if self.status.exit_code is not None and self.poweroff_deadline is None:
            self.poweroff_deadline = time.monotonic() + POWEROFF_GRACE_S
        if self.poweroff_deadline is not None:
            return max(0.0, self.poweroff_deadline - time.monotonic())
        if self.status.ready:
            return None
        return max(0.0, boot_deadline - time.monotonic())

    def _kill_if_stop_overdue(self) -> bool:
        """QEMU was sent SIGTERM on a signal and still runs past its grace: kill it."""
        deadline = self.instance.stop_deadline
        if deadline is None or time.monotonic() < deadline:
            return False
        self.instance.stop_deadline = None
        if not self.qemu.exited():
            process.log(f"QEMU did not stop within {process.STOP_GRACE_S:g} s; killed it")
            self.qemu.send_signal(signal.SIGKILL)
        return True

    def _accept(self) -> None:
        self.conn, _ = self.listener.accept()
        self.conn.setblocking(False)
        self.instance.status_conn = self.conn
        self.poller.unregister(self.listener)
        self.poller.register(self.conn, selectors.EVENT_READ, "status")

    def _notify(self, text: str) -> None:
        if self.instance.notifier is None:
            return
        shown = self.instance.notifier(text)
        if shown is not None:
            self.notified += 1
            # The log keeps the first ones; a guest that loops does not grow
            # it without bound (the count is kept).
            if self.notified <= MAX_LOGGED_NOTIFICATIONS:
                self.instance.event("notify", text=shown, count=self.notified)

    def _read_status(self, until_eof: bool) -> None:
        if self.conn is None:
            return
        while True:
            try:
                chunk = self.conn.recv(4096)
            except (BlockingIOError, ConnectionResetError):
                break
            if not chunk:
                self.poller.unregister(self.conn)
                self.conn.close()
                self.conn = None
                self.instance.status_conn = None
                break
            self.buffer += chunk
            if len(self.buffer) > MAX_STATUS_LINE and b"\n" not in self.buffer:
                self.buffer = b""
            if not until_eof:
                break
        *lines, self.buffer = self.buffer.split(b"\n")
        if until_eof:
            lines.append(self.buffer)
        was_ready = self.status.ready
        for line in lines:
            text = line.decode(errors="replace")
            word, _, rest = text.partition(" ")
            if word == "notify":
                self._notify(rest)
            self.status = self.status.feed(text)
        if self.status.ready and not was_ready:
            _remove_credentials(self.instance.plan)
            self.instance.guest_ready = True
            # The size may have changed while the guest booted.
            send_terminal_size(self.instance)
            waiting, self.instance.to_guest = self.instance.to_guest, []
            for held in waiting:
                send_to_guest(self.instance, held)

    def _fail(self, message: str, code: int) -> None:
        if self.failure is None:
            self.failure, self.code = message, code
        _stop_qemu(self.instance)

    def _result(self) -> int:
        instance = self.instance
        if self.status.exit_code is not None:
            return self.status.exit_code
        if instance.signum is not None:
            by = " (microvm-run stop)" if _stop_requested(instance.plan) else ""
            process.log(f"stopped by {signal.Signals(instance.signum).name}{by}")
            return 128 + instance.signum
        if _stop_requested(instance.plan):
            # A clean ACPI power-off asked for by `microvm-run stop`.
            process.log("powered off by microvm-run stop")
            return 128 + signal.SIGTERM
        if self.failure is not None:
            process.log(self.failure)
            daemons.show_logs(instance.virtiofsd.daemons)
            return self.code
        # QEMU runs with -no-reboot: a guest that powers off or panics
        # (panic=-1 reboots) ends it with status 0, and the reason is in the
        # guest's last console lines, just above.
        why = (
            "its last console lines above say why (a refused local-directory setup, "
            "a failed unit, a kernel panic)"
            if self.qemu.returncode == 0
            else "QEMU crashed or was killed"
        )
        process.log(
            "the guest ended without reporting an exit status "
            f"(QEMU exit status {self.qemu.returncode}): {why}"
        )
        daemons.show_logs(instance.virtiofsd.daemons, problems_only=self.qemu.returncode == 0)
        return EXIT_NO_STATUS

    def close(self) -> None:
        self.poller.close()
        if self.conn is not None:
            self.conn.close()


def _handle_refusals(instance: Instance) -> None:
    """Tell the guest (and the runtime dir's denied file) what was refused."""
    while instance.refusals:
        refusal = instance.refusals.popleft()
        line = instance.denials.add(refusal) if instance.denials is not None else None
        if line is not None:
            send_to_guest(instance, f"denied {line}")
            instance.event(
                "refused", host=refusal.host, port=refusal.port, why=refusal.why, fix=refusal.fix
            )


def send_to_guest(instance: Instance, line: str) -> None:
    """One status line to the guest; held back until it has reported ``ready``."""
    conn = instance.status_conn
    if conn is None or not instance.guest_ready:
        instance.to_guest.append(line)
        return
    with contextlib.suppress(OSError):
        conn.send(f"{line}\n".encode("ascii", "replace"))


def send_terminal_size(instance: Instance) -> None:
    """Tell the guest the terminal's size (contract: ``size ROWS COLS``)."""
    conn = instance.status_conn
    size = host.terminal_size()
    if conn is None or size is None or not instance.guest_ready:
        return
    with contextlib.suppress(OSError):
        conn.send(f"size {size[0]} {size[1]}\n".encode())


def _stop_qemu(instance: Instance) -> None:
    if instance.qemu is not None:
        instance.qemu.stop()


def _remove_credentials(plan: LaunchPlan) -> None:
    # QEMU read them into fw_cfg at start-up; the guest has them now.
    for _, path in plan.credentials:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


# -- cleaning up ----------------------------------------------------------------


def _cleanup(instance: Instance) -> None:
    """Undo what the launch created; one failing step never skips the others."""
    instance.cleaning = True
    steps: list[Callable[[], None]] = [lambda: _stop_qemu(instance)]
    if instance.listener is not None:
        steps.append(instance.listener.close)
    if instance.egress is not None:
        steps.append(lambda: _stop_egress(instance))
    for fd in (instance.wake_r, instance.wake_w):
        if fd >= 0:
            steps.append(functools.partial(os.close, fd))
    steps += instance.virtiofsd.stop_steps(qemu_ran=instance.qemu is not None)
    if instance.qemu is not None:
        steps.append(instance.qemu.close)
    # Once nothing of the guest runs any more: it cannot undo this.
    steps.append(lambda: restore_shares(instance.plan, instance.work_mode))
    if instance.runtime_dir_created:
        steps.append(lambda: shutil.rmtree(instance.plan.runtime_dir, ignore_errors=True))
    for step in steps:
        try:
            step()
        except Exception as err:
            process.log(f"cleanup: {err}")


# -- process-wide state, restored on the way out ----------------------------------


@contextlib.contextmanager
def _terminal_restored() -> Iterator[None]:
    """QEMU puts the terminal in raw mode; put it back even if QEMU is killed."""
    saved = None
    flags = None
    with contextlib.suppress(termios.error, OSError, ValueError):
        if sys.stdin.isatty():
            saved = termios.tcgetattr(sys.stdin.fileno())
            # QEMU also sets O_NONBLOCK, and a killed QEMU never clears it.
            flags = fcntl.fcntl(sys.stdin.fileno(), fcntl.F_GETFL)
    try:
        yield
    finally:
        if saved is not None:
            with contextlib.suppress(termios.error, OSError):
                termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, saved)
        if flags is not None:
            with contextlib.suppress(OSError):
                fcntl.fcntl(sys.stdin.fileno(), fcntl.F_SETFL, flags)


@contextlib.contextmanager
def _signals_forwarded(instance: Instance) -> Iterator[None]:
    """SIGINT/SIGTERM/SIGHUP: stop QEMU if it runs, else abort the start-up."""

    def handle(signum: int, _frame: FrameType | None) -> None:
        first = instance.signum is None
        instance.signum = signum
        qemu = instance.qemu
        if qemu is None:
            # Only the first signal aborts the start-up: a second Ctrl-C
            # must not interrupt the abort itself or the cleanup.
            if first and not instance.cleaning:
                raise Interrupted(signum)
            return
        if instance.cleaning:
            # Cleanup stops QEMU through the full ladder itself, and may have
            # closed its pidfd and the wake pipe (whose fd numbers a later
            # open may reuse): a signal now must not abandon a step such as
            # the set-id repair of the shares.
            return
        if not qemu.exited():
            # The first signal asks QEMU to stop (the watcher kills it after
            # the grace); a second one, from a user who will not wait, kills.
            qemu.send_signal(signal.SIGTERM if first else signal.SIGKILL)
            if first:
                instance.stop_deadline = time.monotonic() + process.STOP_GRACE_S
            with contextlib.suppress(OSError):
                os.write(instance.wake_w, b"!")  # re-evaluate the watcher's timeout

    wanted = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {signum: signal.signal(signum, handle) for signum in wanted}
    # The host terminal was resized: pass it on, so the agent's TUI follows.
    previous[signal.SIGWINCH] = signal.signal(
        signal.SIGWINCH, lambda _signum, _frame: send_terminal_size(instance)
    )
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
