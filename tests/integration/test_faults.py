"""Faults mid-run: the runner cleans up, reports honestly, and loses nothing.

Each test starts a guest that writes a file and then waits, injects the
fault once the file is on the host, and checks the exit status, that the
file survived and the home is intact; the fixture then checks that no
process, unit or runtime dir is left.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import VM, HostUser, wait_until_clean

pytestmark = pytest.mark.integration

WAITING = 'echo kept > "$HOME/kept"; echo before > /work/before; sleep 60'


def _started(vm: VM, work: Path) -> subprocess.Popen[str]:
    running = vm.start(work, WAITING)
    deadline = time.monotonic() + 60
    # The whole line, not only the file: `echo before >` creates it before it
    # writes, and a runner killed in between would leave it empty.
    while not (work / "before").exists() or (work / "before").read_text() != "before\n":
        assert running.poll() is None, running.communicate()
        assert time.monotonic() < deadline, "the guest never wrote /work/before"
        time.sleep(0.1)
    return running


def _pids(user: HostUser, pattern: str) -> list[int]:
    out = subprocess.run(
        ["pgrep", "-u", str(user.uid), "-f", pattern], capture_output=True, text=True, check=False
    )
    return [int(pid) for pid in out.stdout.split()]


def _intact(vm: VM, work: Path) -> None:
    assert (work / "before").read_text() == "before\n"
    assert (vm.agent_home(work) / "kept").read_text() == "kept\n"


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_to_the_runner_stops_the_vm_and_cleans_up(
    vm: VM, signum: signal.Signals, code: int
) -> None:
    work = vm.project()
    running = _started(vm, work)
    running.send_signal(signum)
    _, err = running.communicate(timeout=60)
    assert running.returncode == code, err
    assert f"stopped by {signum.name}" in err
    _intact(vm, work)


def test_qemu_killed_is_a_failure_and_cleans_up(vm: VM) -> None:
    work = vm.project()
    running = _started(vm, work)
    (qemu,) = _pids(vm.user, "qemu-system")  # one VM at a time in these tests
    os.kill(qemu, signal.SIGKILL)
    _, err = running.communicate(timeout=60)
    assert running.returncode == 125, err
    assert "without reporting an exit status" in err
    assert "QEMU crashed or was killed" in err
    _intact(vm, work)


def test_a_virtiofsd_killed_stops_the_vm_with_a_clear_message(vm: VM) -> None:
    work = vm.project()
    running = _started(vm, work)
    daemons = _pids(vm.user, f"virtiofsd.*--shared-dir={work}")
    assert daemons, "no virtiofsd for the work share"
    os.kill(min(daemons), signal.SIGKILL)
    _, err = running.communicate(timeout=60)
    assert running.returncode == 125, err
    assert "virtiofsd for share work died while the VM ran" in err
    _intact(vm, work)


@pytest.mark.parametrize(("command", "code"), [("true", 0), ("exit 3", 3)])
def test_a_normal_exit_or_an_agent_failure_loses_nothing(vm: VM, command: str, code: int) -> None:
    work = vm.project()
    result = vm.run(work, f'echo kept > "$HOME/kept"; echo before > /work/before; {command}')
    assert result.returncode == code, result.stderr
    _intact(vm, work)


def test_the_runner_killed_takes_qemu_and_virtiofsd_with_it_and_gc_removes_the_rest(
    vm: VM,
) -> None:
    work = vm.project()
    running = _started(vm, work)
    running.kill()  # SIGKILL: no cleanup code runs in the runner
    running.communicate(timeout=60)
    # QEMU dies by its parent-death signal; virtiofsd exits when QEMU
    # disconnects, and its transient unit is collected.
    found = wait_until_clean(vm.user, [])
    assert found == []
    # The runtime dir is what a SIGKILLed runner cannot remove: gc does.
    assert vm.runtime_dir is not None
    base = vm.runtime_dir / "microvm-run"
    (leftover,) = list(base.iterdir())
    assert not any(p.suffix == ".sock" and _listening(p) for p in leftover.iterdir())
    assert vm.ops("ps").stdout.count("\n") <= 1, "a dead instance is listed as running"
    collected = vm.ops("gc")
    assert collected.returncode == 0, collected.stderr
    assert leftover.name in collected.stdout
    assert not leftover.exists()
    again = vm.ops("gc")
    assert again.returncode == 0 and leftover.name not in again.stdout
    _intact(vm, work)


def _listening(path: Path) -> bool:
    import socket  # noqa: PLC0415

    probe = socket.socket(socket.AF_UNIX)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True
