"""The one place that starts processes.

Every subprocess of the runner starts here, so the environment rule and the
parent-death signal are handled once.  An ``env`` given here is the child's
whole environment: plumbum would otherwise lay it over a snapshot of the
runner's own, and API keys would reach every child.  plumbum is imported
lazily: ``--dry-run`` and the other pure paths never pay for it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

_PR_SET_PDEATHSIG = 1
DEVNULL = subprocess.DEVNULL
PIPE = subprocess.PIPE
TimeoutExpired = subprocess.TimeoutExpired


@dataclass(frozen=True)
class Completed:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


class ProcessError(RuntimeError):
    """A program could not be started (missing, not executable)."""


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: if the runner is SIGKILLed,
    # the kernel sends the child SIGTERM, so QEMU and fallback virtiofsd
    # daemons never outlive it.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def run(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float | None = None,
    stdout: int | IO[Any] | None = None,
    stderr: int | IO[Any] | None = None,
) -> Completed:
    """Run a program to completion and capture its output (unless redirected)."""
    from plumbum import ProcessTimedOut, local  # noqa: PLC0415 - lazy: keeps --dry-run fast

    command = _command(local, argv)
    kwargs: dict[str, Any] = {}
    if cwd is not None:
        kwargs["cwd"] = str(cwd)
    if stdout is not None:
        kwargs["stdout"] = stdout
    if stderr is not None:
        kwargs["stderr"] = stderr
    try:
        with _exact_env(local, env):
            code, out, err = command.run(retcode=None, timeout=timeout, **kwargs)
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
    new_session: bool = False,
) -> Any:
    """Start a long-running program (QEMU, a fallback virtiofsd).

    Returns plumbum's Popen wrapper (pid, poll, wait, send_signal).  stdio
    left as None is inherited, unlike plumbum's default of pipes.
    """
    from plumbum import local  # noqa: PLC0415 - lazy: keeps --dry-run fast

    command = _command(local, argv)
    preexec: Callable[[], None] | None = _die_with_parent if die_with_parent else None
    try:
        with _exact_env(local, env):
            return command.popen(
                cwd=str(cwd) if cwd is not None else None,
                stdin=stdin,
                stdout=stdout,
                stderr=stderr,
                preexec_fn=preexec,
                new_session=new_session,
            )
    except OSError as error:
        raise ProcessError(f"cannot start {argv[0]}: {error.strerror}") from None


def replace(argv: Sequence[str], env: Mapping[str, str]) -> None:
    """Become ``argv`` (an interactive program that owns the terminal: ssh for attach).

    Returns only by raising ProcessError when the program cannot be run.
    """
    import shutil  # noqa: PLC0415 - only attach needs it: keeps `ps` quick

    found = shutil.which(argv[0], path=env.get("PATH"))
    if found is None:
        raise ProcessError(f"{argv[0]} not found on PATH")
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(found, list(argv), dict(env))
    except OSError as error:
        raise ProcessError(f"cannot run {argv[0]}: {error.strerror}") from None


def _command(local: Any, argv: Sequence[str]) -> Any:
    from plumbum import CommandNotFound  # noqa: PLC0415

    try:
        return local[argv[0]][list(argv[1:])]
    except CommandNotFound:
        raise ProcessError(f"{argv[0]} not found on PATH") from None


@contextlib.contextmanager
def _exact_env(local: Any, env: Mapping[str, str] | None) -> Iterator[None]:
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
    print(f"microvm-run: {message}", file=sys.stderr, flush=True)
