"""The host module's shares, for real: guest root gets no root's powers on the host.

A VM declared with services.agent-microvm has its shares served by
microvm.nix's ``microvm-virtiofsd@NAME``, which runs virtiofsd as root
(supervisord with ``user = root``; nixos-modules/microvm/virtiofsd and
nixos-modules/host in microvm.nix).  Without an ID translation, what guest
root does in the workspace and the home is done by host root: a set-uid
root program, a device node open to everyone, root-owned files in the
user's project.

Here that virtiofsd runs as root with exactly the arguments the host
module's evaluation rendered (tests/host-network/rendered/virtiofsd.json,
``make eval-modules``) for VM beta's writable shares, on a workspace and a
home owned by the VM's user as the module makes them.  The busybox test
guest (tests/guest/build with tests/host-network/virtiofs-init) mounts
them and runs a script as root: the attacker.  Every assertion is made on
the host, on what is in the two directories afterwards.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import REPO
from tests.support.prereq import require

RENDERED = REPO / "tests" / "host-network" / "rendered" / "virtiofsd.json"
BOOT_TIMEOUT_S = 240
VM = "beta"
# The writable shares and where the persistent guest mounts them (modules/persistent.nix).
SHARES = {"work": "/work", "home": "/home/agent"}

ATTACK = """\
for d in /work /home/agent; do
  cd "$d" || continue
  mknod blk b 7 0 && chmod 0666 blk && echo "$d: made a block device"
  mknod mem c 1 1 && chmod 0666 mem && echo "$d: made a character device"
  cp /bin/busybox suid-root && chown 0:0 suid-root && chmod 4755 suid-root &&
    echo "$d: made a set-uid program"
  echo root > root-file && echo "$d: made a file"
  mkdir root-dir && echo "$d: made a directory"
  chown 0:0 users-file && echo "$d: took the user's file"
  chown 0:0 . && echo "$d: took the share root"
  ls -lna
done
"""


@pytest.fixture(scope="module")
def declared() -> dict[str, object]:
    data: dict[str, object] = json.loads(RENDERED.read_text())[VM]
    return data


@pytest.fixture(scope="module")
def share_guest(host_env: dict[str, str], scratch: Path) -> Path:
    out = scratch / "virtiofs-guest"
    subprocess.run(
        [
            str(REPO / "tests" / "guest" / "build"), str(out), "--machine", "q35",
            "--init", str(REPO / "tests" / "host-network" / "virtiofs-init"),
            "--modules", "virtio_pci virtiofs qemu_fw_cfg",
        ],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return out


def _virtiofsd_argv(
    host_env: dict[str, str], args: list[str], socket: Path, shared: Path
) -> list[str]:
    """microvm.nix's command line for one share.  `nproc` is what its shell
    expands; the open-file limit is the hard one here (its unit raises the
    hard limit to that value with LimitNOFILE=, which needs CAP_SYS_RESOURCE
    this machine's root may lack; the number decides nothing about files)."""
    argv = [host_env["AMVM_VIRTIOFSD"], f"--socket-path={socket}", f"--shared-dir={shared}"]
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    for before, arg in zip(["", *args], args, strict=False):
        if arg == "`nproc`":
            argv.append(str(os.cpu_count() or 1))
        elif before == "--rlimit-nofile" and hard != resource.RLIM_INFINITY:
            argv.append(str(min(int(arg), hard)))
        else:
            argv.append(arg)
    return argv


@pytest.fixture
def daemons(
    host_env: dict[str, str], scratch: Path, declared: dict[str, object]
) -> Iterator[tuple[Path, dict[str, Path], int]]:
    """virtiofsd as root for each writable share, on directories owned by the VM's user."""
    require(os.geteuid() == 0, "root (microvm.nix's virtiofsd runs as root)")
    uid = int(str(declared["uid"]))
    shares = declared["shares"]
    assert isinstance(shares, dict)
    # Root's only: a device node guest root may make there reaches no one else.
    work = scratch / f"declared-{os.urandom(3).hex()}"
    work.mkdir(mode=0o700)
    dirs: dict[str, Path] = {}
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for tag in SHARES:
            shared = work / tag
            shared.mkdir(mode=0o700)
            # The user's own file, and the modes the module gives a home
            # (prepareState: install -d -m 0700 -o UID).
            (shared / "users-file").write_text("the user's\n")
            for path in (shared, shared / "users-file"):
                os.chown(path, uid, uid)
            socket = work / f"{tag}.sock"
            argv = _virtiofsd_argv(host_env, shares[tag]["args"], socket, shared)
            with (work / f"{tag}.log").open("wb") as log:
                processes.append(
                    subprocess.Popen(
                        argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                    )
                )
            deadline = time.monotonic() + 30
            while not socket.exists():
                assert processes[-1].poll() is None, (work / f"{tag}.log").read_text()
                assert time.monotonic() < deadline, f"virtiofsd for {tag} made no socket"
                time.sleep(0.05)
            dirs[tag] = shared
        yield work, dirs, uid
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)


def _boot(host_env: dict[str, str], build: Path, work: Path, script: str) -> str:
    (work / "script").write_text(script)
    console = work / "console"
    argv = [
        host_env.get("AMVM_QEMU") or shutil.which("qemu-system-x86_64") or "qemu-system-x86_64",
        "-machine", "q35,accel=tcg", "-m", "256",
        "-object", "memory-backend-memfd,id=mem,size=256M,share=on", "-numa", "node,memdev=mem",
        "-nodefaults", "-no-reboot", "-display", "none", "-monitor", "none", "-nic", "none",
        "-kernel", str(build / "vmlinuz"), "-initrd", str(build / "initrd.gz"),
        "-append", "console=ttyS0 quiet panic=-1 "
        + " ".join(f"amvm.mount={tag}:{where}" for tag, where in SHARES.items()),
        "-serial", f"file:{console}",
        "-fw_cfg", f"name=opt/amvm/script,file={work / 'script'}",
    ]  # fmt: skip
    for index, tag in enumerate(SHARES):
        argv += [
            "-chardev", f"socket,id=fs{index},path={work / f'{tag}.sock'}",
            "-device", f"vhost-user-fs-pci,chardev=fs{index},tag={tag}",
        ]  # fmt: skip
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=BOOT_TIMEOUT_S, check=False
    )
    text = console.read_text(errors="replace") if console.exists() else ""
    assert "AMVM-END" in text, f"the guest did not finish: {result.stderr}\n{text[-3000:]}"
    assert "AMVM-MOUNT-FAILED" not in text, text[-3000:]
    return text.split("AMVM-BEGIN", 1)[1].split("AMVM-END", 1)[0]


def test_guest_root_leaves_no_root_file_no_device_and_no_set_uid_root_program_on_the_host(
    host_env: dict[str, str],
    share_guest: Path,
    daemons: tuple[Path, dict[str, Path], int],
) -> None:
    work, dirs, uid = daemons
    said = _boot(host_env, share_guest, work, ATTACK)
    problems = []
    for tag, shared in dirs.items():
        for path in [shared, *shared.rglob("*")]:
            info = path.lstat()
            what = (
                f"{tag}:{path.relative_to(shared)} "
                f"(uid {info.st_uid} gid {info.st_gid}, mode {info.st_mode:o})"
            )
            if stat.S_ISBLK(info.st_mode) or stat.S_ISCHR(info.st_mode):
                problems.append(f"a device node on the host: {what}")
            if (info.st_uid, info.st_gid) != (uid, uid):
                problems.append(f"not the VM user's: {what}")
    assert not problems, "\n".join(problems) + f"\nthe guest said:\n{said}"
    # The attack ran: guest root's own files are there, as the user's.
    assert (dirs["work"] / "root-file").read_text() == "root\n", said
    assert (dirs["home"] / "root-dir").is_dir(), said
