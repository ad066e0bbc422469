"""No VM starts on a project while its dev shell is being evaluated.

The dev shell is evaluated only when no other VM runs on the project (its
agent could rewrite the files between the consent digest and Nix reading
them).  Checking once is not enough: a VM started during the evaluation,
which may last minutes, would not be seen.  So both sides announce
themselves before they look at the other:

- an evaluation holds an exclusive lock on a file of its own in the runtime
  base, naming its project, from before the consent digest until Nix exits;
  then it looks for running VMs (``state.toml`` records);
- a launch writes its record first; then, before QEMU starts, it waits for
  every held evaluation lock whose project overlaps its own.

Whichever comes second sees the first: the evaluation is skipped, or the VM
waits until Nix is done.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from microvm_run.atomic import make_private_dir

_PREFIX = "devshell-eval-"
_MAX_RECORD = 4096


@contextlib.contextmanager
def evaluating(base: Path, project: Path) -> Iterator[None]:
    """Hold this process's evaluation lock on ``project`` for the block."""
    make_private_dir(base)
    path = base / f"{_PREFIX}{os.getpid()}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, os.fsencode(project))
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        os.close(fd)


def wait_for_evaluations(base: Path, project: Path, say: Callable[[str], None]) -> None:
    """Block while an evaluation of a project overlapping ``project`` runs."""
    try:
        names = [n for n in os.listdir(base) if n.startswith(_PREFIX)]
    except FileNotFoundError:
        return
    for name in names:
        try:
            fd = os.open(base / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue  # gone meanwhile, or not ours to read
        try:
            other = Path(os.fsdecode(os.read(fd, _MAX_RECORD)))
            if not other.is_absolute() or not projects_overlap(other, project):
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError as err:
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                say(f"waiting for the dev shell of {other} to finish evaluating")
                fcntl.flock(fd, fcntl.LOCK_SH)
        finally:
            os.close(fd)


def projects_overlap(one: Path, other: Path) -> bool:
    """One project directory contains the other, or both are one directory
    (by device and inode, whatever path each was started by)."""
    if one == other or one.is_relative_to(other) or other.is_relative_to(one):
        return True
    try:
        a, b = os.stat(one, follow_symlinks=False), os.stat(other, follow_symlinks=False)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
