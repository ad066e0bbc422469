"""The host module's state preparation, for real: what root does in directories
another user owns.

``microvm@NAME`` of a VM declared with services.agent-microvm first runs the
module's prepareState as root (``ExecStartPre=+``): it makes the VM's SSH
host key and known_hosts line and gives the home to the VM's user.  The
directories it works in are not root's: microvm.nix's tmpfiles rules make
``/var/lib/microvms``, and the share sources ``NAME/ssh`` and ``NAME/home``,
owned by its ``microvm`` user (tests/host-network/rendered/tmpfiles.json),
and install-microvm-NAME gives it ``NAME`` too.  QEMU runs as that user, for
every VM: a guest that escapes its QEMU is that user, and may leave symlinks
there for the next start.

Here the rendered script (tests/host-network/rendered/prepare-beta.sh, ``make
eval-modules``) runs as root on a scratch state directory laid out as
microvm.nix leaves it, after the test user, standing in for ``microvm``, has
put its links in.  Every assertion is on the files the links point at.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import REPO
from tests.support.prereq import require

RENDERED = REPO / "tests" / "host-network" / "rendered" / "prepare-beta.sh"
VM = "beta"
VM_UID = 1001  # alice's, the uid the rendered script gives the home


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A directory the attacker can reach (pytest's own are root's only)."""
    path = Path(tempfile.mkdtemp(prefix="amvm-prepare-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


@pytest.fixture
def layout(scratch: Path) -> Iterator[tuple[Path, Path, int]]:
    """(script, state dir, attacker uid): the rendered script pointed at a
    scratch copy of /var/lib/microvms, owned as microvm.nix owns it."""
    require(os.geteuid() == 0, "root (microvm@NAME runs the script as root)")
    attacker = pwd.getpwnam(os.environ.get("AMVM_TEST_USER", "amvm-test")).pw_uid
    keygen = shutil.which("ssh-keygen")
    require(keygen is not None, "ssh-keygen (openssh-client)")
    assert keygen is not None
    text = RENDERED.read_text()
    state = scratch / "microvms"
    text = re.sub(r"(?m)^PATH=/nix/store/\S+$", "PATH=/usr/bin:/bin", text)
    text = re.sub(r"/nix/store/[^/\s]+-openssh/bin/ssh-keygen", keygen, text)
    text = text.replace("/var/lib/microvms", str(state))
    assert "/nix/store" not in text, text
    script = scratch / "prepare.sh"
    script.write_text(text)
    # tmpfiles: microvm:kvm 0775 (the root, and each share's source);
    # install-microvm-NAME: chown microvm:kvm NAME.
    for d in (state, state / VM, state / VM / "ssh", state / VM / "home"):
        d.mkdir()
        os.chown(d, attacker, attacker)
        d.chmod(0o775)
    yield script, state, attacker


def as_attacker(uid: int, command: str) -> None:
    subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "sh", "-ec", command],
        check=True,
    )


def run(script: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(script)], check=False, capture_output=True, text=True, timeout=60
    )


def victim(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


def test_first_start_ignores_what_microvm_left_in_ssh(
    layout: tuple[Path, Path, int], scratch: Path
) -> None:
    script, state, attacker = layout
    secret = victim(scratch / "shadow", "root's secret\n")
    precious = victim(scratch / "precious", "root's file\n")
    ssh = state / VM / "ssh"
    # Its own host key (to answer `microvm-run attach` itself), the public
    # half and known_hosts pointing at root's files.
    as_attacker(
        attacker,
        f"cd {ssh}; echo 'its key' > ssh_host_ed25519_key;"
        f" ln -s {secret} ssh_host_ed25519_key.pub; ln -s {precious} known_hosts",
    )
    result = run(script)
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert precious.read_text() == "root's file\n"
    assert secret.read_text() == "root's secret\n"
    # The directory and its files are root's, the key the script's own.
    st = ssh.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o755)
    for name in ("ssh_host_ed25519_key", "ssh_host_ed25519_key.pub", "known_hosts"):
        f = ssh / name
        assert not f.is_symlink() and f.is_file() and f.stat().st_uid == 0, name
    assert (ssh / "ssh_host_ed25519_key").read_text() != "its key\n"
    public = (ssh / "ssh_host_ed25519_key.pub").read_text().split()
    assert (ssh / "known_hosts").read_text().split()[1:] == public[:2]


def test_later_start_follows_no_link_put_in_place_of_the_key(
    layout: tuple[Path, Path, int], scratch: Path
) -> None:
    script, state, attacker = layout
    assert run(script).returncode == 0
    ssh = state / VM / "ssh"
    key = (ssh / "ssh_host_ed25519_key").read_text()
    secret = victim(scratch / "shadow", "root's secret\n")
    precious = victim(scratch / "precious", "root's file\n")
    # The ssh directory is root's now; the state directory is still
    # microvm's: it swaps the whole ssh directory for one of its own.
    own = state / "its-ssh"
    as_attacker(
        attacker,
        f"mkdir {own}; cd {own}; echo 'its key' > ssh_host_ed25519_key;"
        f" ln -s {secret} ssh_host_ed25519_key.pub;"
        f" ln -s {precious} known_hosts; mv {ssh} {state / VM}/old; ln -s {own} {ssh}",
    )
    result = run(script)
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert precious.read_text() == "root's file\n"
    assert secret.read_text() == "root's secret\n"
    assert result.returncode != 0
    assert "not starting beta" in result.stderr
    # The key did not change hands.
    assert (state / VM / "old" / "ssh_host_ed25519_key").read_text() == key


def test_home_swapped_for_a_link_is_not_given_away(
    layout: tuple[Path, Path, int], scratch: Path
) -> None:
    script, state, attacker = layout
    target = scratch / "roots-dir"
    target.mkdir(mode=0o755)
    home = state / VM / "home"
    as_attacker(attacker, f"rmdir {home}; ln -s {target} {home}")
    result = run(script)
    st = target.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o755)
    assert result.returncode != 0
    assert "not starting beta" in result.stderr


def test_state_dir_swapped_for_a_link_is_not_entered(
    layout: tuple[Path, Path, int], scratch: Path
) -> None:
    script, state, attacker = layout
    # A directory of root's with the layout's names in it.
    elsewhere = scratch / "elsewhere"
    for d in (elsewhere, elsewhere / "ssh", elsewhere / "home"):
        d.mkdir(mode=0o755)
    as_attacker(attacker, f"mv {state / VM} {state}/gone; ln -s {elsewhere} {state / VM}")
    result = run(script)
    assert result.returncode != 0
    assert "not starting beta" in result.stderr
    assert list((elsewhere / "ssh").iterdir()) == []
    assert (elsewhere / "home").stat().st_uid == 0


def test_a_fresh_state_dir_is_prepared(layout: tuple[Path, Path, int]) -> None:
    script, state, _ = layout
    (state / VM / "ssh").rmdir()
    (state / VM / "home").rmdir()
    result = run(script)
    assert result.returncode == 0, result.stderr
    home = (state / VM / "home").stat()
    assert (home.st_uid, stat.S_IMODE(home.st_mode)) == (VM_UID, 0o700)
    key = (state / VM / "ssh" / "ssh_host_ed25519_key").stat()
    assert (key.st_uid, stat.S_IMODE(key.st_mode)) == (0, 0o600)
    line = (state / VM / "ssh" / "known_hosts").read_text()
    assert line.startswith("10.77.0.37 ssh-ed25519 "), line
