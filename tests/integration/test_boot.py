"""microvm-run end to end: a real guest boots, works in /work and reports back."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import VM, HostUser, _user_units

pytestmark = pytest.mark.integration


def _ok(result: subprocess.CompletedProcess[str], code: int = 0) -> None:
    assert result.returncode == code, (
        f"exit {result.returncode}, wanted {code}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    )


def test_file_written_in_work_is_on_the_host_owned_by_the_user(vm: VM) -> None:
    work = vm.project()
    result = vm.run(work, "id -u > /work/uid; echo hello > /work/hello.txt; mkdir /work/d")
    _ok(result)
    assert (work / "hello.txt").read_text() == "hello\n"
    assert (work / "uid").read_text().strip() == "1000"  # the agent user in the guest
    for name in ("hello.txt", "uid", "d"):
        info = (work / name).stat()
        assert (info.st_uid, info.st_gid) == (vm.user.uid, vm.user.gid), name


@pytest.mark.parametrize("code", [0, 7])
def test_the_agents_exit_status_is_the_runners(vm: VM, code: int) -> None:
    _ok(vm.run(vm.project(), f"exit {code}"), code)


def test_the_home_persists_across_runs_and_is_private(vm: VM) -> None:
    work = vm.project()
    _ok(vm.run(work, 'echo "$HOME" > /work/home; echo remembered > "$HOME/login"'))
    _ok(vm.run(work, 'cat "$HOME/login" > /work/seen'))
    assert (work / "home").read_text().strip() == "/home/agent"
    assert (work / "seen").read_text() == "remembered\n"
    home = vm.agent_home(work)
    assert (home / "login").read_text() == "remembered\n"
    assert home.stat().st_mode & 0o777 == 0o700
    assert home.stat().st_uid == vm.user.uid


def test_a_symlinked_path_gets_the_same_home(vm: VM) -> None:
    work = vm.project()
    link = work.parent / "link"
    link.symlink_to(work)
    _ok(vm.run(link, 'echo one > "$HOME/mark"'))
    assert (vm.agent_home(work) / "mark").read_text() == "one\n"


def test_agent_home_override(vm: VM) -> None:
    work = vm.project()
    custom = work.parent / "custom-home"
    _ok(vm.run(work, 'echo x > "$HOME/here"', AGENT_HOME=str(custom)))
    assert (custom / "here").read_text() == "x\n"


def test_two_instances_at_once_on_one_project(vm: VM) -> None:
    work = vm.project()
    first = vm.start(work, "sleep 2; echo a > /work/a; exit 3")
    second = vm.start(work, "sleep 2; echo b > /work/b; exit 4")
    _out1, err1 = first.communicate(timeout=180)
    _out2, err2 = second.communicate(timeout=180)
    assert (first.returncode, second.returncode) == (3, 4), (err1, err2)
    assert (work / "a").read_text() == "a\n" and (work / "b").read_text() == "b\n"


def test_virtiofsd_runs_as_named_user_units(vm: VM, test_user: HostUser) -> None:
    work = vm.project("unitproj")
    running = vm.start(work, "sleep 4")
    deadline = time.monotonic() + 60
    units: list[str] = []
    while time.monotonic() < deadline and running.poll() is None:
        units = [u for u in _user_units(test_user) if "-vm-virtiofsd-" in u]
        if len(units) == 3:
            break
        time.sleep(0.2)
    running.communicate(timeout=180)
    assert running.returncode == 0
    assert len(units) == 3, units
    for unit in units:
        assert unit.startswith("unitproj-testagent-vm-virtiofsd-"), unit


def test_without_a_user_manager_virtiofsd_runs_as_children(vm_no_manager: VM) -> None:
    work = vm_no_manager.project()
    dry = vm_no_manager.run(work, "true", "--dry-run")
    _ok(dry)
    assert "virtiofsd    child (fallback: no user manager" in dry.stdout
    _ok(vm_no_manager.run(work, "echo fallback > /work/f; exit 5"), 5)
    assert (work / "f").read_text() == "fallback\n"


def test_the_api_key_reaches_the_agent_but_no_argv_or_file(vm: VM) -> None:
    work = vm.project()
    canary = "canary-" + os.urandom(8).hex()
    running = vm.start(
        work, 'echo "$TESTAGENT_API_KEY" > /work/key; sleep 3', TESTAGENT_API_KEY=canary
    )
    seen_in_argv = []
    seen_in_child_env = []
    while running.poll() is None:
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                argv = cmdline.read_bytes()
                if canary.encode() in argv:
                    seen_in_argv.append(cmdline)
                # QEMU and virtiofsd get the key neither in argv nor environment.
                if b"qemu-system" in argv or b"virtiofsd" in argv:
                    environ = cmdline.with_name("environ").read_bytes()
                    if canary.encode() in environ:
                        seen_in_child_env.append(argv.split(b"\0")[0])
            except OSError:
                pass
        time.sleep(0.3)
    _, err = running.communicate()
    assert running.returncode == 0, err
    assert (work / "key").read_text().strip() == canary
    assert seen_in_argv == []
    assert seen_in_child_env == []
    home = vm.agent_home(work)
    for path in home.rglob("*"):
        if path.is_file():
            assert canary not in path.read_text(errors="replace"), path


def test_the_store_share_is_read_only(vm: VM) -> None:
    work = vm.project()
    result = vm.run(work, "ls /nix/.ro-store >/dev/null && ! touch /nix/.ro-store/x 2>/dev/null")
    _ok(result)


def test_q35_machine_boots_too(vm: VM, guest_spec_q35: Path) -> None:
    vm.spec = guest_spec_q35
    _ok(vm.run(vm.project(), "exit 9"), 9)


def test_a_guest_that_never_comes_up_hits_the_boot_deadline(vm: VM) -> None:
    started = time.monotonic()
    result = vm.run(vm.project(), "true", "--boot-timeout", "0.5")
    assert result.returncode == 124, result.stderr
    assert "did not come up within 0.5 s" in result.stderr
    assert time.monotonic() - started < 30


def test_a_kernel_panic_is_a_failure_not_success(vm: VM, scratch: Path) -> None:
    broken = scratch / "broken-guest"
    shutil.copytree(vm.spec.parent, broken, dirs_exist_ok=True)
    (broken / "initrd.gz").write_bytes(b"not an initramfs")
    vm.spec = broken / "spec.toml"
    result = vm.run(vm.project(), "true")
    assert result.returncode == 125, result.stderr
    assert "without reporting an exit status" in result.stderr
    assert "its last console lines above say why" in result.stderr
    # The daemons were healthy: their start-up lines would bury the reason.
    assert "virtiofsd work log" not in result.stderr


def test_no_network_device_with_net_none(vm: VM) -> None:
    work = vm.project()
    _ok(vm.run(work, "ls /sys/class/net > /work/nics", "--net", "none"))
    assert (work / "nics").read_text().split() == ["lo"]
