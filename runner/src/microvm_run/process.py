"""The one place that starts processes.

Every subprocess of the runner starts here, so argv logging, secret
scrubbing and the parent-death signal are handled once.  plumbum is imported
lazily: ``--dry-run`` and the other pure paths never pay for it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

_PR_SET_PDEATHSIG = 1
DEVNULL = subprocess.DEVNULL
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
    from plumbum import local  # noqa: PLC0415 - lazy: keeps --dry-run fast

    command = local[argv[0]][list(argv[1:])]
    kwargs: dict[str, Any] = {}
    if env is not None:
        kwargs["env"] = dict(env)
    if cwd is not None:
        kwargs["cwd"] = str(cwd)
    if stdout is not None:
        kwargs["stdout"] = stdout
    if stderr is not None:
        kwargs["stderr"] = stderr
    try:
        code, out, err = command.run(retcode=None, timeout=timeout, **kwargs)
    except OSError as error:
        raise ProcessError(f"cannot run {argv[0]}: {error.strerror}") from None
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

    command = local[argv[0]][list(argv[1:])]
    preexec: Callable[[], None] | None = _die_with_parent if die_with_parent else None
    try:
        return command.popen(
            env=dict(env) if env is not None else None,
            cwd=str(cwd) if cwd is not None else None,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            preexec_fn=preexec,
            new_session=new_session,
        )
    except OSError as error:
        raise ProcessError(f"cannot start {argv[0]}: {error.strerror}") from None


def scrub(argv: Sequence[str], secrets: Sequence[str]) -> list[str]:
    """argv for logs, with any secret value replaced (defence in depth)."""
    out = []
    for arg in argv:
        clean = arg
        for secret in secrets:
            if secret:
                clean = clean.replace(secret, "<redacted>")
        out.append(clean)
    return out


def log(message: str) -> None:
    print(f"microvm-run: {message}", file=sys.stderr, flush=True)


def environ() -> dict[str, str]:
    return dict(os.environ)
