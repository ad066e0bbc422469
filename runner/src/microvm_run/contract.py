"""The guest contract: what the runner gives a guest and what it expects back.

Both guests honour it: the NixOS guest (``modules/base.nix``) and the tiny
busybox test guest (``tests/guest/init``).  Version 1:

Boot
    Direct kernel boot of the spec's kernel and initrd.  The runner appends
    ``console=hvc0 panic=-1`` to the spec's kernel parameters (plus
    ``tsc_early_khz=<the host's TSC kHz> tsc=reliable`` on the microvm
    machine under TCG, where the guest's TSC is the host's and nothing else
    can calibrate or check it, so the guest clock keeps the host's pace):
    the console
    is a virtio console, and a kernel panic reboots, which ``-no-reboot``
    turns into a QEMU exit, so a panic can never hang or look like success.

Terminal
    ``hvc0`` is the agent's terminal, wired to the runner's stdin/stdout.

Launch data (non-secret), fw_cfg file ``opt/org.agent-microvm/launch``
    A POSIX sh fragment (every value quoted with shlex.quote) that sets
    ``MICROVM_INSTANCE``, ``MICROVM_SHARES`` (space-separated ``tag=mount``
    pairs; the NixOS guest mounts from its own config and ignores it),
    ``MICROVM_NET`` (``open``, ``allowlist`` or ``none``), exports
    the agent's environment (TERM, COLORTERM, LANG, ...) and ends with
    ``set -- CMD ARGS...``.  The guest sources it in a shell and runs "$@".

Secrets, fw_cfg files ``opt/io.systemd.credentials/<VAR>``
    One file per API key variable, content = the value, no newline.  This is
    systemd's credential channel, so the NixOS guest's systemd imports them;
    the guest exports each as VAR to the agent only.  The host copies live in
    the instance's runtime dir (0700, mode 0600) and are deleted as soon as
    the guest reports ``ready`` (QEMU reads them at start-up).

Running the command
    After mounting every share by tag, the guest runs the command in
    ``/work`` as uid/gid 1000 (the ``agent`` user, HOME=/home/agent).
    virtiofsd maps guest uid/gid 0 and 1000 to the invoking host user.

Network (``open`` and ``allowlist``; ``none`` has no network device)
    One virtio-net device on QEMU user networking with ``restrict=on``.  The
    guest sets ``10.0.2.15/24`` with a default route via ``10.0.2.2`` and
    resolves names through ``10.0.2.100`` over TCP (glibc: ``nameserver
    10.0.2.100`` and ``options use-vc`` in resolv.conf): UDP leaves nothing.
    Every connection goes to ``10.0.2.100`` (ports 53, 80, 443, 3128, 4180
    and allowlisted extra ports), where the runner's egress proxy decides
    (netpolicy.py, egress.py).  The launch data exports ``http(s)_proxy``.

Local directories (``MICROVM_LOCAL_DIRS``, when not empty)
    The launch data's ``MICROVM_LOCAL_DIRS`` lists paths relative to /work
    (space-separated; each matches ``[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*``,
    no ``..``), and the VM has a virtio-blk disk with serial
    ``agent-microvm-local``.  Before the command starts, guest root: finds
    the disk by its serial; formats it (ext4, or ext2 where only busybox's
    mke2fs exists) if it has no ext2/3/4 superblock (magic 0xEF53 at byte
    1080); mounts it on ``/run/microvm-local``; and for each path P makes
    ``/run/microvm-local/dirs/P`` (owned by the agent) and ``/work/P``
    (refusing a symlink in any component of it) and bind-mounts the first
    over the second.  The launch data exports ``PYTHONPYCACHEPREFIX=
    /run/microvm-local/pycache`` (owned by the agent).  A disk that cannot
    be formatted or mounted fails the boot.  The host never sees these
    files: the disk is its own image in the runner's state.

Status, virtio-serial port ``org.agent-microvm.status``
    The guest writes ASCII lines: ``ready`` when the shares are mounted and
    the command is about to start, then ``exit N`` (0-255) when it ended.
    Then it powers off.  The host writes ``size ROWS COLS`` lines after
    ``ready`` and whenever its terminal is resized; the guest sets hvc0's
    size to it (TIOCSWINSZ, which sends the agent SIGWINCH).  The launch
    data's ``MICROVM_TTY_SIZE`` (``ROWS COLS``, when the runner has a
    terminal) is the size to set before the command starts.  QEMU ending
    without an ``exit`` line is a guest failure (panic, crash, killed),
    never a success.

    The host also writes ``denied TEXT`` (after ``ready``): a refusal of the
    egress proxy, one line of printable ASCII saying which host, under which
    mode, and the command that allows it (denials.py).  The guest's root
    side appends TEXT to ``/run/agent-microvm/denied`` (root's, readable by
    the agent).  The guest may write ``notify TEXT`` any time after
    ``ready``: "the agent needs you" (notify.py).  Its agent asks for it by
    writing a line to the FIFO ``/run/agent-microvm/notify`` (the command
    ``agent-microvm-notify [MESSAGE]`` does); the root side passes it on,
    printable ASCII only, at most 200 characters.  The agent never holds the
    status port itself.

Ctrl+Z
    The agent's process group is orphaned (no job-control shell above it),
    so the terminal's SIGTSTP stops nothing; an agent that stops itself
    (SIGSTOP, as a TUI's suspend key does) is resumed by the guest's root
    side within a second, with one line on the terminal: there is no
    shell in the VM to ``fg`` it from.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

CONTRACT_VERSION = 1
STATUS_PORT = "org.agent-microvm.status"
LAUNCH_FW_CFG = "opt/org.agent-microvm/launch"
CREDENTIAL_FW_CFG_PREFIX = "opt/io.systemd.credentials/"
GUEST_UID = 1000
GUEST_HOME = "/home/agent"
GUEST_WORK_DIR = "/work"
LOCAL_DISK_SERIAL = "agent-microvm-local"
LOCAL_MOUNT = "/run/microvm-local"
LOCAL_PYCACHE = f"{LOCAL_MOUNT}/pycache"
# The launch fragment's variables the NixOS guest reads (lib/contract.nix
# launchVars; make nix-test compares them).
LAUNCH_VAR_NET = "MICROVM_NET"
LAUNCH_VAR_LOCAL_DIRS = "MICROVM_LOCAL_DIRS"
LAUNCH_VAR_TTY_SIZE = "MICROVM_TTY_SIZE"
# Exported with the agent's environment (plan.py):
LAUNCH_VAR_DEVSHELL = "MICROVM_DEVSHELL"
LAUNCH_VAR_ENABLE_CRI = "ENABLE_CRI"
CONSOLE = "hvc0"  # the agent's terminal (lib/contract.nix console)
RUNNER_KERNEL_PARAMS = (f"console={CONSOLE}", "panic=-1")
# Without tsc_early_khz the guest hangs at "Marking TSC unstable" on microvm
# under TCG (no HPET or PIT to calibrate against).  Under TCG the guest reads
# the host's TSC (QEMU's cpu_get_host_ticks), so the host's TSC frequency is
# the right value; a wrong one makes the guest clock run fast or slow by the
# ratio.  This is the value when the host's cannot be read.
TCG_MICROVM_TSC_PARAM = "tsc_early_khz"
FALLBACK_TSC_KHZ = 2_000_000
# The guest's only other clocksource there is jiffies, which lags behind the
# TSC when the host is busy; the watchdog then marks the TSC unstable and the
# guest falls back to jiffies (seen under load: a drifting clock, and hangs).
# The TSC is the host's own constant one, so it is reliable by construction.
TCG_MICROVM_EXTRA_PARAMS = ("tsc=reliable",)

# Runner exit statuses that are not the agent's own (README documents them).
EXIT_BAD_INPUT = 2
EXIT_BOOT_DEADLINE = 124
EXIT_NO_STATUS = 125


def render_launch(
    instance_id: str,
    shares: Iterable[tuple[str, str]],
    env: Mapping[str, str],
    argv: Sequence[str],
    *,
    net: str = "none",
    tty_size: tuple[int, int] | None = None,
    local_dirs: Sequence[str] = (),
) -> bytes:
    """The launch fragment the guest sources: quoted, so never code from data."""
    lines = [
        f"# agent-microvm launch data, guest contract {CONTRACT_VERSION}; generated by microvm-run",
        f"MICROVM_INSTANCE={shlex.quote(instance_id)}",
        "MICROVM_SHARES=" + shlex.quote(" ".join(f"{tag}={mount}" for tag, mount in shares)),
        f"{LAUNCH_VAR_NET}={shlex.quote(net)}",
    ]
    if local_dirs:
        lines.append(f"{LAUNCH_VAR_LOCAL_DIRS}=" + shlex.quote(" ".join(local_dirs)))
    if tty_size is not None:
        lines.append(f"{LAUNCH_VAR_TTY_SIZE}='{int(tty_size[0])} {int(tty_size[1])}'")
    for name in sorted(env):
        lines.append(f"export {name}={shlex.quote(env[name])}")
    lines.append("set -- " + " ".join(shlex.quote(arg) for arg in argv))
    return ("\n".join(lines) + "\n").encode()


@dataclass(frozen=True)
class GuestStatus:
    """What the guest reported on the status port so far."""

    ready: bool = False
    exit_code: int | None = None

    def feed(self, line: str) -> GuestStatus:
        """Fold one status line in; unknown lines are ignored (forward compat)."""
        word, _, rest = line.strip().partition(" ")
        if word == "ready":
            return GuestStatus(ready=True, exit_code=self.exit_code)
        # At most 3 digits before int(): the guest's thousands of digits
        # would make int() raise (Python's 4300-digit limit).
        if (
            word == "exit"
            and rest.isascii()
            and rest.isdigit()
            and len(rest) <= 3
            and int(rest) <= 255
        ):
            return GuestStatus(ready=True, exit_code=int(rest))
        return self
