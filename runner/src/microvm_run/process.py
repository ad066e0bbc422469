"""The one place that starts, stops and waits for processes.

Every subprocess of the runner starts here, so the environment rule and the
parent-death signal are handled once, and every stop goes down the same
ladder (``stop``: wait, SIGTERM, wait, SIGKILL, wait), watched through pidfds
rather than polled.  An ``env`` given here is the child's whole environment:
plumbum would otherwise lay it over a snapshot of the runner's own, and API
keys would reach every child.  plumbum is imported lazily: ``--dry-run`` and
the other pure paths never pay for it.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import functools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol, cast

if TYPE_CHECKING:
    from plumbum.commands.base import BoundCommand
    from plumbum.machines.local import LocalMachine

_PR_SET_PDEATHSIG = 1
DEVNULL = subprocess.DEVNULL
PIPE = subprocess.PIPE
TimeoutExpired = subprocess.TimeoutExpired
# The stop ladder's default waits: after SIGTERM, and after SIGKILL.
STOP_GRACE_S = 5.0
KILL_GRACE_S = 5.0


@dataclass(frozen=True)
class Completed:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


class ProcessError(RuntimeError):
    """A program could not be started (missing, not executable)."""


class Stopped(enum.Enum):
    """How a process ended under ``stop``."""

    BY_ITSELF = "exited by itself"
    TERMINATED = "terminated"
    KILLED = "killed"
    SURVIVED = "survived SIGKILL"


class _Popen(Protocol):
    """The part of plumbum's Popen wrapper (a subprocess.Popen) used here."""

    pid: int
    returncode: int | None

    def poll(self) -> int | None: ...
    def wait(self, timeout: float | None = None) -> int: ...
    def communicate(self, input: Any = None, timeout: float | None = None) -> tuple[Any, Any]: ...


class Child:
    """A started program: plumbum's Popen plus a pidfd opened at once.

    The pidfd is opened before the child can have been reaped, so it names
    this process for good: signals sent through it never reach a later
    process with the same pid.
    """

    def __init__(self, popen: _Popen, argv: Sequence[str]) -> None:
        self._popen = popen
        self.argv = tuple(argv)
        self.pid = popen.pid
        self.pidfd = os.pidfd_open(popen.pid)

    @property
    def returncode(self) -> int | None:
        return self._popen.returncode

    def poll(self) -> int | None:
        return self._popen.poll()

    def exited(self, timeout: float = 0.0) -> bool:
        """Has it exited (waiting up to ``timeout``)?  Does not reap it."""
        return exited(self.pidfd, timeout)

    def wait(self, timeout: float | None = None) -> int:
        """Reap it; raises TimeoutExpired after ``timeout``."""
        return self._popen.wait(timeout=timeout)

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """Its piped output, decoded; raises TimeoutExpired after ``timeout``."""
        out, err = self._popen.communicate(timeout=timeout)
        return _text(out), _text(err)

    def send_signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self.pidfd, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def stop(self) -> Stopped:
        """The stop ladder, then reap it (already gone: BY_ITSELF)."""
        outcome = stop([self.pidfd])[self.pidfd]
        if outcome is not Stopped.SURVIVED:
            self.wait()
        return outcome

    def close(self) -> None:
        """Reap it if it has exited, and close the pidfd (once)."""
        if self.pidfd >= 0:
            self.poll()
            os.close(self.pidfd)
            self.pidfd = -1


def _text(data: Any) -> str:
    if isinstance(data, bytes):
        return data.decode(errors="replace")
    return data or ""


def exited(pidfd: int, timeout: float = 0.0) -> bool:
    """Has the process behind ``pidfd`` exited, within ``timeout`` seconds?"""
    return bool(wait_exits([pidfd], timeout))


def wait_exits(pidfds: Sequence[int], timeout: float) -> set[int]:
    """Wait until all have exited or ``timeout`` passed; the pidfds that exited."""
    done: set[int] = set()
    if not pidfds:
        return done
    deadline = time.monotonic() + timeout
    import selectors  # noqa: PLC0415 - only stopping needs it: keeps `ps` quick

    with selectors.DefaultSelector() as poller:
        for pidfd in pidfds:
            poller.register(pidfd, selectors.EVENT_READ)
        while len(done) < len(pidfds):
            left = deadline - time.monotonic()
            events = poller.select(max(0.0, left))
            for key, _ in events:
                done.add(key.fd)
                poller.unregister(key.fileobj)
            if not events and left <= 0:
                break
    return done


def stop(
    pidfds: Sequence[int],
    *,
    settle: float = 0.0,
    term: Callable[[int], None] | None = None,
    grace: float | None = None,
    kill_grace: float | None = None,
) -> dict[int, Stopped]:
    """The one stop ladder, for several processes at once.

    Wait ``settle`` seconds for them to exit by themselves, then ``term``
    each one left (default SIGTERM through its pidfd; a systemd unit passes
    ``systemctl stop``) and wait ``grace``, then SIGKILL and wait
    ``kill_grace`` (None: STOP_GRACE_S, KILL_GRACE_S).  Stopping several
    takes no longer than stopping one.
    """
    grace = STOP_GRACE_S if grace is None else grace
    kill_grace = KILL_GRACE_S if kill_grace is None else kill_grace
    outcome: dict[int, Stopped] = {}
    steps: tuple[tuple[Stopped, Callable[[int], None] | None, float], ...] = (
        (Stopped.BY_ITSELF, None, settle),
        (Stopped.TERMINATED, term or functools.partial(_signal, signum=signal.SIGTERM), grace),
        (Stopped.KILLED, functools.partial(_signal, signum=signal.SIGKILL), kill_grace),
    )
    left = list(pidfds)
    for result, send, timeout in steps:
        if not left:
            break
        if send is not None:
            for pidfd in left:
                send(pidfd)
        for pidfd in wait_exits(left, timeout):
            outcome[pidfd] = result
        left = [pidfd for pidfd in left if pidfd not in outcome]
    for pidfd in left:
        outcome[pidfd] = Stopped.SURVIVED
    return outcome


def _signal(pidfd: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        signal.pidfd_send_signal(pidfd, signum)


@functools.cache
def _prctl() -> Callable[..., int]:
    """prctl(2), looked up in the parent: the forked child only calls it.

    A dlopen between fork and exec is not safe while other threads run
    (the egress proxy's); a call through a resolved pointer is one syscall.
    """
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl


def _die_with_parent_hook() -> Callable[[], object]:
    # Runs in the child between fork and exec: if the runner is SIGKILLed,
    # the kernel sends the child SIGTERM, so QEMU and fallback virtiofsd
    # daemons never outlive it.
    return functools.partial(_prctl(), _PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def run(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
) -> Completed:
    """Run a program to completion and capture its output."""
    from plumbum import ProcessTimedOut, local  # noqa: PLC0415 - lazy: keeps --dry-run fast

    command = _command(local, argv)
    try:
        with _exact_env(local, env):
            code, out, err = command.run(retcode=None, timeout=timeout)
    except OSError as error:
        raise ProcessError(f"cannot run {argv[0]}: {error.strerror}") from None
    except ProcessTimedOut:
        raise ProcessError(f"{argv[0]} did not finish within {timeout:g} s") from None
    return Completed(tuple(argv), code, out or "", err or "")


def spawn(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    stdin: int | IO[Any] | None = None,
    stdout: int | IO[Any] | None = None,
    stderr: int | IO[Any] | None = None,
    die_with_parent: bool = True,
) -> Child:
    """Start a long-running program (QEMU, a fallback virtiofsd, Nix, a pager).

    stdio left as None is inherited, unlike plumbum's default of pipes.
    """
    from plumbum import local  # noqa: PLC0415 - lazy: keeps --dry-run fast

    command = _command(local, argv)
    preexec = _die_with_parent_hook() if die_with_parent else None
    try:
        with _exact_env(local, env):
            popen = command.popen(
                cwd=str(cwd) if cwd is not None else None,
                stdin=stdin,
                stdout=stdout,
                stderr=stderr,
                preexec_fn=preexec,
            )
    except OSError as error:
        raise ProcessError(f"cannot start {argv[0]}: {error.strerror}") from None
    # plumbum's PopenWithAddons protocol leaves out wait's and communicate's
    # timeouts, which its subprocess.Popen has.
    return Child(cast(_Popen, popen), argv)


def replace(argv: Sequence[str], env: Mapping[str, str]) -> None:
    """Become ``argv`` (an interactive program that owns the terminal: ssh for attach).

    Returns only by raising ProcessError when the program cannot be run.
    """
    from microvm_run.host import which  # noqa: PLC0415 - only attach needs it

    found = which(argv[0], env)
    if found is None:
        raise ProcessError(f"{argv[0]} not found on PATH")
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(found, list(argv), dict(env))
    except OSError as error:
        raise ProcessError(f"cannot run {argv[0]}: {error.strerror}") from None


def _command(local: LocalMachine, argv: Sequence[str]) -> BoundCommand:
    from plumbum import CommandNotFound  # noqa: PLC0415

    try:
        return local[argv[0]][list(argv[1:])]
    except CommandNotFound:
        raise ProcessError(f"{argv[0]} not found on PATH") from None


@contextlib.contextmanager
def _exact_env(local: LocalMachine, env: Mapping[str, str] | None) -> Iterator[None]:
    """Make ``env`` the child's whole environment (None: inherit the runner's)."""
    with local.env():
        if env is not None:
            local.env.clear()
            local.env.update(env)
        yield


def without(environ: Mapping[str, str], names: Sequence[str]) -> dict[str, str]:
    """The environment minus some variables (API keys for every child)."""
    return {k: v for k, v in environ.items() if k not in names}


def log(message: str) -> None:
    # The terminal may be gone (a closed window, tmux kill-session: SIGHUP,
    # then EIO on every write): a message nobody can read must not stop the
    # cleanup it reports on.
    with contextlib.suppress(OSError, ValueError):
        print(f"microvm-run: {message}", file=sys.stderr, flush=True)
