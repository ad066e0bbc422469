"""The NixOS guest's own unit and scripts under a real systemd (tests/guest-systemd).

The NixOS guest cannot be built here, so its boot path is exercised in a
Debian trixie root with systemd 257 as PID 1, running exactly what our
modules generate: ``agent-microvm.service``, the launcher and session
scripts, networkd's uplink, resolv.conf and the share mounts, rendered
from the evaluated modules into tests/guest-systemd/rendered (kept fresh by
`make eval-modules`), with the local-directories script on a virtio-blk
disk. virtio_console and virtio_net are loaded late, by udev, as on NixOS,
so the unit's ordering against its devices is what makes these pass.
Each boot costs tens of seconds under TCG: few tests, each checking much.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.devshell_fixture import copy_fixture
from tests.support.terminal import set_size, start_on_pty

from .conftest import REPO, VM, VM_TIMEOUT_S, HostUser, _vm, make_root_vm, wait_until_clean
from .test_localdirs import images
from .test_ops import _wait_for

pytestmark = pytest.mark.integration

KEY = "sk-canary-systemd-" + "5d1f0e" * 4
BOOT_TIMEOUT_S = 150


@pytest.fixture(scope="session")
def systemd_spec(host_env: dict[str, str], scratch: Path) -> Path:
    out = scratch / "guest-systemd"
    subprocess.run(
        [str(REPO / "tests" / "guest-systemd" / "build"), str(out)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    for path in [out, *out.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return out / "spec.toml"


@pytest.fixture
def sd_vm(
    test_user: HostUser,
    venv_python: Path,
    runner_copy: Path,
    systemd_spec: Path,
    scratch: Path,
    user_manager: Path,
) -> Iterator[VM]:
    for vm in _vm(test_user, venv_python, runner_copy, systemd_spec, scratch, user_manager):
        # systemd under TCG on a busy 2-core machine: allow the boot its time.
        vm.extra_env = {"MICROVM_BOOT_TIMEOUT": str(BOOT_TIMEOUT_S)}
        yield vm


def _files_containing(root: Path, needle: bytes) -> list[str]:
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink() and needle in path.read_bytes():
            found.append(str(path))
    return found


def test_the_agent_unit_runs_on_its_console_with_network_key_and_terminal(sd_vm: VM) -> None:
    """One boot: exit status, uid and home, the key by credential, the network at once,
    the terminal size at start and after a resize, and Ctrl-C for the agent."""
    work = sd_vm.project()
    home = sd_vm.agent_home(work)
    script = (
        # The first network call, before anything else: the unit waited for the uplink.
        "if bash -c 'exec 4<>/dev/tcp/10.0.2.100/80'; then echo ok > /work/net; "
        "else echo failed > /work/net; fi; "
        'id -u > /work/uid; printf %s "$HOME" > /work/home; cat /proc/1/comm > /work/pid1; '
        'printf %s "$TESTAGENT_API_KEY" | sha256sum | cut -d" " -f1 > /work/keyhash; '
        "stty size > /work/size-start; touch /work/started; "
        "while [ ! -e /work/resized ]; do sleep 0.1; done; "
        'for i in $(seq 100); do s=$(stty size); [ "$s" = "50 132" ] && break; sleep 0.1; done; '
        "stty size > /work/size-after; "
        "trap 'echo got-int > /work/int; exit 7' INT; touch /work/wait-int; "
        "while :; do sleep 0.1; done"
    )
    running, master = start_on_pty(
        sd_vm.as_user(sd_vm.argv(work, script, "--no-inject-keys")),
        sd_vm.env(TERM="xterm-256color", TESTAGENT_API_KEY=KEY),
        rows=33,
        cols=101,
    )
    try:
        _wait_for(work / "started", running, "the agent never started")
        set_size(master, 50, 132)
        os.kill(running.pid, signal.SIGWINCH)
        (work / "resized").touch()
        _wait_for(work / "wait-int", running, "the agent never waited for Ctrl-C")
        os.write(master, b"\x03")
        _, err = running.communicate(timeout=VM_TIMEOUT_S)
    finally:
        if running.poll() is None:
            running.kill()
        os.close(master)
    assert running.returncode == 7, err
    assert (work / "int").read_text() == "got-int\n"  # the agent's trap, not the launcher
    assert (work / "net").read_text() == "ok\n"
    assert (work / "uid").read_text() == "1000\n"
    assert (work / "home").read_text() == "/home/agent"
    assert (work / "pid1").read_text() == "systemd\n"
    assert (work / "keyhash").read_text().strip() == hashlib.sha256(KEY.encode()).hexdigest()
    assert (work / "size-start").read_text().strip() == "33 101"
    assert (work / "size-after").read_text().strip() == "50 132"
    # The key came by ImportCredential: in no file of either share.
    assert _files_containing(work, KEY.encode()) == []
    assert _files_containing(home, KEY.encode()) == []


def _with_key_route(spec: Path) -> Path:
    """The systemd guest's spec with a key proxy route (nothing is asked of it here)."""
    text = spec.read_text().replace("spec_version = 1", "spec_version = 2")
    text += """
[[key_proxy]]
var = "TESTAGENT_API_KEY"
upstream = "http://allowed.amvm.test:9/api"
header = "authorization"
base_url_var = "TESTAGENT_BASE_URL"
base_url_path = "/v1"
paths = ["/api/v1/"]
"""
    path = spec.with_name(f"spec-key-route-{os.urandom(3).hex()}.toml")
    path.write_text(text)
    path.chmod(0o644)
    return path


def test_stop_powers_the_guest_off_through_its_power_button(sd_vm: VM) -> None:
    """Also: with --inject-keys the agent gets the placeholder and the proxy's base URL."""
    sd_vm.spec = _with_key_route(sd_vm.spec)
    work = sd_vm.project()
    script = (
        'printf "%s\\n" "$TESTAGENT_API_KEY" "$TESTAGENT_BASE_URL" > /work/key; '
        "touch /work/up; sleep 600"
    )
    running = sd_vm.start(work, script, TESTAGENT_API_KEY=KEY)
    try:
        _wait_for(work / "up", running, "the guest never came up")
        (row,) = json.loads(sd_vm.ops("ps", "--json").stdout)
        # No SIGTERM fallback: logind must take the ACPI button within this.
        stopped = sd_vm.ops("stop", "--timeout", "120", row["id"])
        running.communicate(timeout=VM_TIMEOUT_S)
    finally:
        if running.poll() is None:
            running.kill()
    assert stopped.returncode == 0, stopped.stderr
    assert "powered off" in stopped.stdout, stopped.stdout
    assert "terminated" not in stopped.stdout
    key, base_url = (work / "key").read_text().splitlines()
    assert key == "microvm-run-placeholder"
    assert base_url.startswith("http://10.0.2.100:") and base_url.endswith("/v1"), base_url
    assert _files_containing(work, KEY.encode()) == []


def test_the_launcher_tells_refusals_passes_notifications_and_resumes_a_stopped_agent(
    sd_vm: VM,
) -> None:
    """#19 in the NixOS launcher: /run/agent-microvm/denied, the notify FIFO, Ctrl+Z."""
    work = sd_vm.project()
    # A refused CONNECT: the proxy decides before any lookup.
    (work / "connect.sh").write_text(
        "exec 5<>/dev/tcp/10.0.2.100/3128\n"
        "printf 'CONNECT nothing.example:443 HTTP/1.1\\r\\n\\r\\n' >&5\n"
        "timeout 20 cat <&5\n"
    )
    script = "; ".join(
        [
            "bash /work/connect.sh > /work/connect",
            "for i in $(seq 100); do [ -s /run/agent-microvm/denied ] && break; sleep 0.2; done",
            "cat /run/agent-microvm/denied > /work/denied",
            "echo 'waiting for you' > /run/agent-microvm/notify",
            "ls -l /proc/self/fd/ > /work/fds",
            # What a TUI's suspend key does: stop itself and wait for `fg`.
            "kill -STOP $$",
            "echo resumed > /work/resumed",
            "sleep 1",
        ]
    )
    result = sd_vm.run(work, script, "--net", "allowlist")
    assert result.returncode == 0, result.stderr
    assert "HTTP/1.1 403" in (work / "connect").read_text()
    (line,) = (work / "denied").read_text().splitlines()
    assert line.startswith("microvm-run refused nothing.example:443: not in the allowlist")
    assert "microvm-run allow " in line
    assert "needs you: waiting for you" in result.stderr
    assert (work / "resumed").read_text() == "resumed\n"
    fds = (work / "fds").read_text()
    assert "virtio-ports" not in fds and "notify" not in fds


@pytest.mark.parametrize("status", [0, 3])
def test_every_boot_reports_the_status(sd_vm: VM, status: int) -> None:
    """Repeated boots with the console and status devices arriving late: no status lost."""
    work = sd_vm.project()
    result = sd_vm.run(work, f"exit {status}", "--net", "none")
    assert result.returncode == status, result.stderr
    assert "did not power off" not in result.stderr  # SuccessAction/FailureAction did


def test_the_dev_shell_reaches_the_agent_and_home_stays_its_own(
    venv_python: Path, runner_copy: Path, systemd_spec: Path, scratch: Path
) -> None:
    vm = make_root_vm(venv_python, runner_copy, systemd_spec, scratch, "root-systemd")
    vm.extra_env["MICROVM_BOOT_TIMEOUT"] = str(BOOT_TIMEOUT_S)
    work = vm.project()
    copy_fixture("simple", work)
    result = vm.run(
        work,
        'printf "%s\\n" "$MY_PROJECT_VAR" "$HOME" > /work/seen',
        "--net",
        "none",
        DIRENV_ALLOW="1",
    )
    assert result.returncode == 0, result.stderr
    assert (work / "seen").read_text().splitlines() == ["hello-from-devshell", "/home/agent"]
    assert vm.runtime_dir is not None
    assert wait_until_clean(vm.user, [vm.runtime_dir]) == []


def test_local_dirs_land_on_the_guest_disk_persist_and_a_planted_symlink_stops_the_boot(
    sd_vm: VM,
) -> None:
    """#20 in the NixOS launcher: agent-microvm-local-dirs, run as root before the
    session, on the default 16 GiB disk. Three boots, the agent in each: it builds
    into target/ (Cargo.lock makes it local); it finds its build again and plants
    /work/node_modules -> /etc with a package-lock.json, so that the next launch
    would bind its own disk over the guest's /etc; that launch is refused before
    the agent starts. Then `gc --prune` removes the disk."""
    work = sd_vm.project()
    home = sd_vm.agent_home(work)
    (work / "Cargo.lock").write_text("version = 4\n")
    os.chown(work / "Cargo.lock", sd_vm.user.uid, sd_vm.user.gid)
    marker = "built-in-the-guest-7c3e7c3e"

    first = sd_vm.run(
        work,
        "; ".join(
            [
                f"mkdir -p target/release && echo {marker} > target/release/app",
                "grep ' /work/target ' /proc/mounts > /work/mounts",
                "stat -c %u /run/microvm-local /work/target > /work/owners",
                'printf "%s\n" "$PYTHONPYCACHEPREFIX" > /work/pycache',
                'touch "$PYTHONPYCACHEPREFIX/probe" && echo writable >> /work/pycache',
            ]
        ),
        "--net",
        "none",
    )
    assert first.returncode == 0, first.stdout + first.stderr
    device, mount_point, fs_type, *_ = (work / "mounts").read_text().split()
    assert (mount_point, fs_type) == ("/work/target", "ext4")
    assert device.startswith("/dev/vd"), device
    assert (work / "owners").read_text().split() == ["0", "1000"]
    assert (work / "pycache").read_text() == "/run/microvm-local/pycache\nwritable\n"
    # The host has the empty mount point the guest made; the build is on the disk,
    # an image in the runner's state: in neither share.
    assert (work / "target").is_dir() and list((work / "target").iterdir()) == []
    assert _files_containing(work, marker.encode()) == []
    assert _files_containing(home, marker.encode()) == []
    [image] = images(sd_vm, work)
    assert not image.is_relative_to(work) and not image.is_relative_to(home)
    info = image.stat()
    assert (info.st_mode & 0o777, info.st_uid) == (0o600, sd_vm.user.uid)
    assert info.st_size == 16 << 30 and info.st_blocks * 512 < info.st_size

    second = sd_vm.run(
        work,
        "cat target/release/app > /work/seen; "
        "ln -s /etc /work/node_modules && echo '{}' > /work/package-lock.json",
        "--net",
        "none",
    )
    assert second.returncode == 0, second.stdout + second.stderr
    assert (work / "seen").read_text() == marker + "\n"
    assert images(sd_vm, work) == [image]

    third = sd_vm.run(work, "echo ran > /work/ran", "--net", "none")
    output = third.stdout + third.stderr
    assert third.returncode == 125, output
    assert not (work / "ran").exists()
    assert os.readlink(work / "node_modules") == "/etc"
    # The launcher's one line on the console, and the runner's on stderr.
    assert (
        "agent-microvm: local directories: /work/node_modules is or passes through a symlink"
        in output
    )
    assert "the guest ended without reporting an exit status" in third.stderr
    assert "its last console lines above say why" in third.stderr
    assert "virtiofsd work log" not in third.stderr

    shutil.rmtree(work)
    pruned = sd_vm.ops("gc", "--prune", "--yes")
    assert pruned.returncode == 0, pruned.stderr
    assert not image.exists()
