"""DIRENV_ALLOW=1 for an unprivileged user of a multi-user (daemon) Nix.

Most users' Nix is a daemon that builds on their behalf; the runner must
hand ``nix print-dev-env`` the variables their set-up is made of, or Nix
falls back to a local store the user cannot write. The test starts a real
``nix-daemon`` as root on a socket of its own (with the suite's Nix
configuration) and launches microvm-run as the unprivileged test user, with
the daemon named in each way a user's set-up can name it. Without the
variable reaching Nix, the evaluation fails ("could not set permissions on
'/nix/var/nix/profiles/per-user'") and the guest does not see the shell.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.devshell_fixture import copy_fixture
from tests.support.nixenv import NIX_TEST_ENV
from tests.support.prereq import require

from .conftest import VM

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def daemon_socket(scratch: Path) -> Iterator[Path]:
    daemon = shutil.which("nix-daemon")
    require(daemon is not None, "nix-daemon (Debian: apt-get install nix-bin)")
    assert daemon is not None
    directory = scratch / "nix-daemon"
    directory.mkdir(mode=0o755)
    socket = directory / "socket"
    log = (directory / "log").open("wb")
    proc = subprocess.Popen(
        [daemon],
        env={"PATH": "/usr/bin:/bin", **NIX_TEST_ENV, "NIX_DAEMON_SOCKET_PATH": str(socket)},
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while not socket.exists():
            assert proc.poll() is None, (directory / "log").read_text()
            assert time.monotonic() < deadline, "nix-daemon made no socket in 30 s"
            time.sleep(0.05)
        yield socket
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def _user_conf(vm: VM, directory: str, socket: Path) -> Path:
    conf = Path(vm.project(directory)) / "nix.conf"
    conf.write_text(f"store = unix://{socket}\n")
    conf.chmod(0o644)
    return conf


def _ways_to_name(vm: VM, socket: Path, way: str) -> dict[str, str]:
    """The runner's environment: the suite's configuration plus the one way under test."""
    if way == "NIX_REMOTE":
        return {**NIX_TEST_ENV, "NIX_REMOTE": f"unix://{socket}"}
    if way == "NIX_CONFIG":
        return {**NIX_TEST_ENV, "NIX_CONFIG": f"store = unix://{socket}"}
    if way == "NIX_USER_CONF_FILES":
        conf = _user_conf(vm, "conf-files", socket)
        return {**NIX_TEST_ENV, "NIX_USER_CONF_FILES": str(conf)}
    assert way == "XDG_CONFIG_HOME"
    conf = _user_conf(vm, "nix", socket)  # <XDG_CONFIG_HOME>/nix/nix.conf
    env = {**NIX_TEST_ENV, "XDG_CONFIG_HOME": str(conf.parent.parent)}
    del env["NIX_USER_CONF_FILES"]  # set, it would stop Nix from reading XDG dirs
    return env


WAYS = ["NIX_REMOTE", "NIX_CONFIG", "NIX_USER_CONF_FILES", "XDG_CONFIG_HOME"]


@pytest.mark.parametrize("way", WAYS)
def test_an_unprivileged_user_gets_the_dev_shell_through_the_daemon(
    vm: VM, daemon_socket: Path, way: str
) -> None:
    work = vm.project()
    copy_fixture("simple", work)
    for path in [work, *work.rglob("*")]:
        os.chown(path, vm.user.uid, vm.user.gid)
    vm.extra_env = {"PATH": "/usr/bin:/bin", **_ways_to_name(vm, daemon_socket, way)}
    result = vm.run(work, 'printf "%s" "$MY_PROJECT_VAR" > /work/seen', DIRENV_ALLOW="1")
    assert result.returncode == 0, result.stderr
    assert "dev shell ready" in result.stderr, result.stderr
    assert (work / "seen").read_text() == "hello-from-devshell"
