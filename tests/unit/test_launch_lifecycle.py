"""The launch lifecycle with fake QEMU and virtiofsd programs, in seconds.

The fakes speak the runner's side of the real protocols: the fake
virtiofsd creates its vhost-user socket and exits when its client (QEMU)
disconnects, as the Rust virtiofsd does; the fake QEMU connects to every
``-chardev socket`` of its argv and writes the guest's status lines.  What
each one does is the scenario word after the script's path.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import signal
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from microvm_run import launch, process
from microvm_run.contract import EXIT_BOOT_DEADLINE, EXIT_NO_STATUS
from microvm_run.plan import LaunchPlan, RunOptions, build_plan
from microvm_run.spec import Spec

from .conftest import make_facts
from .test_process import alive

FAKE_VIRTIOFSD = textwrap.dedent(
    """
    import ctypes, os, socket, sys, time
    path, shared, scenario, pidfile = sys.argv[1:5]
    with open(pidfile, "a") as f:
        f.write(f"{os.getpid()}\\n")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(1)
    # Like --sandbox=namespace: the shared directory becomes its root, which
    # the runner checks (shareroots.py).  Unprivileged: in a user namespace.
    try:
        os.chroot(shared)
    except PermissionError:
        uid, gid = os.getuid(), os.getgid()
        if ctypes.CDLL(None, use_errno=True).unshare(0x10000000 | 0x00020000) != 0:
            sys.exit(f"unshare: {os.strerror(ctypes.get_errno())}")
        for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"),
                           ("gid_map", f"0 {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
        os.chroot(shared)
    os.chdir("/")
    conn, _ = server.accept()
    # A start-up line as the real one logs, to the log the runner keeps.
    print("[0Z INFO  virtiofsd] Client connected, servicing requests", file=sys.stderr, flush=True)
    if scenario == "die":
        time.sleep(0.3)
        sys.exit(1)
    while conn.recv(4096):
        pass
    """
)

FAKE_QEMU = textwrap.dedent(
    """
    import os, re, signal, socket, sys, time
    scenario, pidfile, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
    # Longer than any deadline under test, short enough that a regression
    # fails the `< 20 s` check within a minute instead of hanging the suite.
    HANG_S = 40
    with open(pidfile, "a") as f:
        f.write(f"{os.getpid()}\\n")
    if scenario in ("ignore-term", "ready-ignore-term"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    conns = {}
    for arg in argv:
        found = re.fullmatch(r"socket,id=([a-z0-9]+),path=(.*)", arg)
        if found:
            conn = socket.socket(socket.AF_UNIX)
            conn.connect(found.group(2))
            conns[found.group(1)] = conn
    status = conns["status"]
    if scenario in ("hang", "ignore-term"):
        time.sleep(HANG_S)
    if scenario == "poweroff-early":  # a guest that powers off before `ready`
        sys.exit(0)
    if scenario == "crash":
        os._exit(1)
    status.sendall(b"ready\\n")
    if scenario == "hostile":  # status lines no real guest sends, then its status
        status.sendall(b"exit " + b"9" * 5000 + b"\\n" + b"exit \\xd9\\xa3\\n")
    if scenario in ("ready-then-hang", "ready-ignore-term"):
        time.sleep(HANG_S)
    status.sendall(b"exit 7\\n")
    if scenario == "no-poweroff":
        time.sleep(HANG_S)
    """
)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    # Unix socket paths must stay under 108 bytes: pytest's tmp_path may not.
    path = Path(tempfile.mkdtemp(prefix="amvm-lc-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _plan(spec: Spec, tmp: Path, qemu: str, virtiofsd: str, boot_timeout_s: float) -> LaunchPlan:
    (tmp / "work").mkdir(mode=0o700)
    facts = make_facts(
        uid=os.getuid(),
        gid=os.getgid(),
        work_dir=tmp / "work",
        agent_home=tmp / "home",
        runtime_base=tmp / "run",
        environ={"PATH": os.environ.get("PATH", os.defpath)},
        user_manager=False,
    )
    options = RunOptions(
        accel="tcg", net="none", inject_keys=False, supervisor="child",
        boot_timeout_s=boot_timeout_s,
    )  # fmt: skip
    plan = build_plan(spec, options, facts)
    (tmp / "qemu.py").write_text(FAKE_QEMU)
    (tmp / "virtiofsd.py").write_text(FAKE_VIRTIOFSD)
    fake = (sys.executable, str(tmp / "virtiofsd.py"))
    daemons = tuple(
        replace(
            daemon,
            argv=(*fake, str(daemon.socket), str(daemon.shared_dir), virtiofsd, str(tmp / "pids")),
        )
        for daemon in plan.virtiofsd
    )
    qemu_argv = (sys.executable, str(tmp / "qemu.py"), qemu, str(tmp / "pids"), *plan.qemu_argv)
    return replace(plan, virtiofsd=daemons, qemu_argv=qemu_argv)


def _run(spec: Spec, tmp: Path, qemu: str, virtiofsd: str = "serve", boot: float = 30.0) -> int:
    plan = _plan(spec, tmp, qemu, virtiofsd, boot)
    started = time.monotonic()
    code = launch.launch(plan, {"PATH": os.environ.get("PATH", os.defpath)})
    assert time.monotonic() - started < 20
    # Cleanup: nothing of the launch runs or stays behind.
    pids = [int(line) for line in (tmp / "pids").read_text().split()]
    assert len(pids) == len(plan.virtiofsd) + 1
    for pid in pids:
        assert not alive(pid), f"pid {pid} outlived the launch"
    assert not plan.runtime_dir.exists()
    return code


def test_the_guests_exit_status_is_the_launchs_and_daemons_exit_with_qemu(
    spec: Spec, short_tmp: Path
) -> None:
    assert _run(spec, short_tmp, "exit") == 7


def test_a_guest_that_never_reports_ready_is_stopped_at_the_boot_deadline(
    spec: Spec, short_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run(spec, short_tmp, "hang", boot=1.0) == EXIT_BOOT_DEADLINE
    assert "did not come up within 1 s" in capsys.readouterr().err


def test_a_qemu_that_ignores_sigterm_is_killed_after_the_grace(
    spec: Spec, short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(process, "STOP_GRACE_S", 0.5)
    assert _run(spec, short_tmp, "ignore-term", boot=1.0) == EXIT_BOOT_DEADLINE


def test_a_guest_whose_power_off_hangs_keeps_its_exit_status(
    spec: Spec, short_tmp: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(launch, "POWEROFF_GRACE_S", 0.5)
    assert _run(spec, short_tmp, "no-poweroff") == 7
    assert "did not power off" in capsys.readouterr().err


def test_a_virtiofsd_dying_under_a_running_vm_stops_the_vm(
    spec: Spec, short_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run(spec, short_tmp, "ready-then-hang", virtiofsd="die") == EXIT_NO_STATUS
    assert "died while the VM ran" in capsys.readouterr().err


def test_a_guest_that_powers_off_without_a_status_points_at_its_console(
    spec: Spec, short_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run(spec, short_tmp, "poweroff-early") == EXIT_NO_STATUS
    err = capsys.readouterr().err
    assert "its last console lines above say why" in err
    # The daemons were healthy: their start-up lines are not the reason.
    assert "Client connected" not in err


def test_a_qemu_that_crashes_shows_the_daemons_logs(
    spec: Spec, short_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run(spec, short_tmp, "crash") == EXIT_NO_STATUS
    err = capsys.readouterr().err
    assert "QEMU crashed or was killed" in err
    assert "Client connected" in err


def _signals_at(*delays: float) -> list[threading.Timer]:
    """SIGINT to this process (the runner's main thread handles it) after each delay."""
    timers = [threading.Timer(d, os.kill, (os.getpid(), signal.SIGINT)) for d in delays]
    for timer in timers:
        timer.start()
    return timers


def test_ctrl_c_under_a_qemu_that_ignores_sigterm_kills_it_after_the_grace(
    spec: Spec, short_tmp: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(process, "STOP_GRACE_S", 0.5)
    timers = _signals_at(2.0)
    try:
        assert _run(spec, short_tmp, "ready-ignore-term") == 128 + signal.SIGINT
    finally:
        for timer in timers:
            timer.cancel()
    assert "QEMU did not stop within 0.5 s; killed it" in capsys.readouterr().err


def test_a_second_ctrl_c_kills_qemu_at_once(
    spec: Spec, short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(process, "STOP_GRACE_S", 30.0)  # the grace is not what ends it
    timers = _signals_at(2.0, 2.5)
    try:
        started = time.monotonic()
        assert _run(spec, short_tmp, "ready-ignore-term") == 128 + signal.SIGINT
        assert time.monotonic() - started < 10
    finally:
        for timer in timers:
            timer.cancel()


def test_a_signal_during_cleanup_does_not_abandon_the_share_repair(
    spec: Spec, short_tmp: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Ctrl-C or a closed terminal while the runner repairs the shares (set-id
    # bits the guest planted): the repair still runs to its end.
    real = launch.restore_shares
    finished = []

    def interrupted_repair(*args: object) -> None:
        os.kill(os.getpid(), signal.SIGHUP)
        real(*args)  # type: ignore[arg-type]
        finished.append(True)

    monkeypatch.setattr(launch, "restore_shares", interrupted_repair)
    _run(spec, short_tmp, "exit")
    assert finished == [True]
    assert "cleanup:" not in capsys.readouterr().err


class _HungUpTerminal(io.TextIOBase):
    """stderr once the terminal is gone: every write fails with EIO."""

    def write(self, text: str) -> int:
        raise OSError(errno.EIO, os.strerror(errno.EIO))


def test_a_closed_terminal_still_gets_everything_cleaned_up(
    spec: Spec, short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A closed window or `tmux kill-session`: SIGHUP, and the cleanup's
    # messages (here the set-id repair's, for a file the guest planted; in
    # CI the egress summary) cannot be written.  Each later step, the
    # runtime dir's removal last, must still run (_run checks).
    real = launch.restore_shares

    def after_a_guest_planted_a_set_id_file(plan: LaunchPlan, work_mode: int | None) -> None:
        planted = plan.work_dir / "planted"
        planted.write_text("")
        planted.chmod(0o4755)
        real(plan, work_mode)

    monkeypatch.setattr(launch, "restore_shares", after_a_guest_planted_a_set_id_file)
    monkeypatch.setattr(sys, "stderr", _HungUpTerminal())
    timer = threading.Timer(2.0, os.kill, (os.getpid(), signal.SIGHUP))
    timer.start()
    try:
        assert _run(spec, short_tmp, "ready-then-hang") == 128 + signal.SIGHUP
    finally:
        timer.cancel()
    assert (short_tmp / "work" / "planted").stat().st_mode & 0o7777 == 0o755


def test_a_guest_that_sends_a_huge_exit_number_does_not_crash_the_runner(
    spec: Spec, short_tmp: Path
) -> None:
    # Over Python's 4300-digit int() limit: a ValueError once.
    assert _run(spec, short_tmp, "hostile") == 7
