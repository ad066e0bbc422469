"""Operating instances with real VMs: ps, stop, gc, doctor, terminal size."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.terminal import set_size, start_on_pty

from .conftest import VM, VM_TIMEOUT_S

pytestmark = pytest.mark.integration


def _wait_for(path: Path, running: subprocess.Popen[str], what: str) -> None:
    deadline = time.monotonic() + 120
    while not path.exists():
        assert running.poll() is None, running.communicate()
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_ps_lists_a_running_instance_and_stop_powers_it_off(vm: VM) -> None:
    work = vm.project()
    running = vm.start(work, "touch /work/up; sleep 120", "-p", "18931:80")
    try:
        _wait_for(work / "up", running, "the guest never came up")
        listed = vm.ops("ps", "--json")
        assert listed.returncode == 0, listed.stderr
        (row,) = json.loads(listed.stdout)
        assert row["agent"] == "testagent"
        assert row["project"] == str(work.resolve())
        assert row["net"] == "open"
        assert row["ports"] == ["127.0.0.1:18931:80"]
        assert row["runner_pid"] == running.pid
        # QEMU's and virtiofsd's resident memory, not zero and not absurd.
        assert 10 * 1024 < row["memory_kib"] < 4 * 1024 * 1024, row
        table = vm.ops("ps").stdout
        assert row["id"] in table and "testagent" in table

        stopped = vm.ops("stop", "--timeout", "2", row["id"][:4])
        assert stopped.returncode == 0, stopped.stderr
        assert row["id"] in stopped.stdout
        _, err = running.communicate(timeout=60)
    finally:
        if running.poll() is None:
            running.kill()
    assert running.returncode == 143, err
    assert "microvm-run stop" in err
    assert json.loads(vm.ops("ps", "--json").stdout) == []


def test_stop_of_an_unknown_id_is_bad_input(vm: VM) -> None:
    result = vm.ops("stop", "nosuchid")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "nosuchid" in result.stderr


def test_four_instances_at_once_on_one_project_all_succeed(vm: VM) -> None:
    work = vm.project()
    runs = [vm.start(work, f'echo {n} > /work/out-{n}; echo {n} > "$HOME/h-{n}"') for n in range(4)]
    results = [run.communicate(timeout=VM_TIMEOUT_S) for run in runs]
    assert [run.returncode for run in runs] == [0, 0, 0, 0], [err for _, err in results]
    outputs = sorted(p.read_text().strip() for p in work.glob("out-*"))
    assert outputs == ["0", "1", "2", "3"]
    home = vm.agent_home(work)
    assert sorted(p.name for p in home.glob("h-*")) == ["h-0", "h-1", "h-2", "h-3"]


def test_the_guest_terminal_follows_the_host_terminal(vm: VM) -> None:
    work = vm.project()
    script = (
        "stty size > /work/size-start; touch /work/started; "
        "while [ ! -e /work/resized ]; do sleep 0.1; done; "
        # The host's SIGWINCH travels as a status-port line; allow it a moment.
        'for i in $(seq 50); do s=$(stty size); [ "$s" = "50 132" ] && break; sleep 0.1; done; '
        "stty size > /work/size-after; echo TERM=$TERM COLORTERM=$COLORTERM > /work/term"
    )
    running, master = start_on_pty(
        vm.as_user(vm.argv(work, script)),
        vm.env(TERM="xterm-256color", COLORTERM="truecolor"),
        rows=33,
        cols=101,
    )
    try:
        _wait_for(work / "started", running, "the guest never started the command")
        set_size(master, 50, 132)
        os.kill(running.pid, signal.SIGWINCH)
        (work / "resized").touch()
        _, err = running.communicate(timeout=VM_TIMEOUT_S)
    finally:
        if running.poll() is None:
            running.kill()
        os.close(master)
    assert running.returncode == 0, err
    assert (work / "size-start").read_text().strip() == "33 101"
    assert (work / "size-after").read_text().strip() == "50 132"
    assert (work / "term").read_text().strip() == "TERM=xterm-256color COLORTERM=truecolor"


def test_gc_lists_homes_of_vanished_projects_and_prune_deletes_them(vm: VM) -> None:
    kept, gone = vm.project("kept"), vm.project("gone")
    for work in (kept, gone):
        result = vm.run(work, 'echo x > "$HOME/login"')
        assert result.returncode == 0, result.stderr
    gone_home, kept_home = vm.agent_home(gone), vm.agent_home(kept)
    shutil.rmtree(gone)

    listed = vm.ops("gc")
    assert listed.returncode == 0, listed.stderr
    assert str(gone_home) in listed.stdout
    assert str(kept_home) not in listed.stdout
    assert gone_home.exists()

    refused = vm.ops("gc", "--prune")  # no terminal, no --yes: nothing is deleted
    assert refused.returncode == 2 and gone_home.exists()

    pruned = vm.ops("gc", "--prune", "--yes")
    assert pruned.returncode == 0, pruned.stderr
    assert not gone_home.exists()
    assert (kept_home / "login").read_text() == "x\n"


def test_doctor_boots_a_guest(vm: VM) -> None:
    result = vm.ops("doctor", "--spec", str(vm.spec), "--accel", "tcg", "--boot")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "booted and ran `true`" in result.stdout
