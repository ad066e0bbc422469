"""Another local user against a user's microvm-run: nothing to read, nothing to plant.

The runner must not depend on the user's umask: what it creates for itself
(its state, logs, the XDG directories on the way to them) is the user's
alone even under ``umask 000``.  The attacker is ``nobody``, an unprivileged
user other than the one running microvm-run.
"""

from __future__ import annotations

import os
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from .conftest import VM, VM_TIMEOUT_S

pytestmark = pytest.mark.integration

NOBODY = 65534
EGRESS = "10.0.2.100"


def _as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *argv],
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def _open_to_others(home: Path, skip: Path) -> list[str]:
    """Paths under ``home`` that a group or other user may change, or read
    when they are files of the runner's state."""
    found = []
    for root, dirs, files in os.walk(home):
        here = Path(root)
        dirs[:] = [d for d in dirs if here / d != skip]
        for name in [*dirs, *files]:
            path = here / name
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode):
                continue
            mode = stat.S_IMODE(info.st_mode)
            loose = 0o022 if stat.S_ISDIR(info.st_mode) else 0o066
            if mode & loose:
                found.append(f"{path.relative_to(home)} {oct(mode)}")
    return found


def test_under_umask_000_another_user_can_neither_read_the_egress_log_nor_plant_state(
    vm: VM,
) -> None:
    # A fresh home, as on a first run: the runner creates ~/.local/... itself.
    home = Path(tempfile.mkdtemp(prefix="home-", dir=vm.scratch))
    home.chmod(0o755)
    os.chown(home, vm.user.uid, vm.user.gid)
    work = vm.project()
    request = "GET / HTTP/1.0\\r\\nHost: denied.amvm.test\\r\\n\\r\\n"
    script = f"printf '{request}' | nc -w 3 {EGRESS} 80 > /dev/null; true"
    argv = vm.as_user(
        ["sh", "-c", 'umask 000 && exec "$@"', "sh", *vm.argv(work, script, "--net", "allowlist")]
    )
    result = subprocess.run(
        argv,
        env=vm.env(HOME=str(home)),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=VM_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    state = home / ".local" / "state" / "microvm-run"
    log = state / "egress.log"
    assert "deny denied.amvm.test:80" in log.read_text()
    # The other user: the log of where the agent went is not theirs to read ...
    read = _as_nobody("cat", str(log))
    assert read.returncode != 0 and "denied.amvm.test" not in read.stdout
    # ... and nothing the runner will read back can be planted or swapped.
    for directory in (state, state.parent, home / ".local" / "share"):
        planted = _as_nobody("mkdir", str(directory / "planted"))
        assert planted.returncode != 0, f"another user could create {directory}/planted"
    agent_home = home / ".local" / "share" / "testagent-microvm"
    assert _open_to_others(home, skip=agent_home) == []
