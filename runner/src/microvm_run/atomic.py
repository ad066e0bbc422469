"""Replace one of the runner's own files atomically (state, records, caches).

Readers see the old file or the whole new one, never a part: the data goes
to a temporary name beside the target, is fsynced, renamed over the target,
and the directory is synced so the rename survives a crash.  For files
under a share, which the guest controls, use safefs.write_replacing instead.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def write_atomic(path: Path, data: bytes, mode: int = 0o600, *, shared: bool = False) -> None:
    """Raises OSError; nothing is left under a temporary name on failure.

    ``shared``: other processes may write the same file at once (the
    dev-shell cache): each gets a temporary name of its own.  Otherwise the
    one writer uses ``<name>.tmp`` and replaces what a writer that died
    left there, so leftovers never pile up.
    """
    if shared:
        tmp = path.with_name(f".{path.name}.{os.urandom(6).hex()}.tmp")
    else:
        tmp = path.with_name(path.name + ".tmp")
        # Ours to replace; O_EXCL below then guards against anything else
        # appearing in between (a symlink is removed, never followed).
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def make_private_dir(path: Path) -> None:
    """``path`` and every missing directory on the way to it, each 0700.

    Path.mkdir(parents=True) makes the parents with the umask's mode: under
    ``umask 000`` a first run's ~/.local/state/microvm-run would be writable
    by every local user, who could swap what the runner reads back.  0700 is
    the XDG base directory spec's mode for the directories it creates.  An
    existing directory is left as it is.
    """
    try:
        os.mkdir(path, 0o700)
    except FileNotFoundError:
        if path.parent == path:
            raise
        make_private_dir(path.parent)
        make_private_dir(path)
    except FileExistsError:
        if not path.is_dir():
            raise
