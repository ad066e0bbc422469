"""File access inside trees the guest can write (the project, the agent home).

The guest controls every name under ``/work`` and the agent home: any entry
may be a symlink (to ``~/.ssh``, ``/proc/self/environ``), a FIFO (a read
that never ends), a device (``/dev/zero``: a read that never ends either) or
a huge file.  So the runner never opens such a path by name.  It opens the
share root once, checked (a real directory owned by the user, not a
symlink), and reaches everything below it with ``openat`` from that
directory's fd, one component at a time, with ``O_NOFOLLOW``: a symlink
anywhere fails with ELOOP instead of being followed.  Files are opened
``O_NONBLOCK`` (a FIFO cannot block the open), checked with ``fstat`` to be
regular, and read with a bound.  Writes go to a fresh ``O_EXCL`` temp file
renamed over the target inside the same directory fd: a planted symlink at
the target is replaced, never written through.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
_SETID = stat.S_ISUID | stat.S_ISGID


class UnsafeFile(OSError):
    """A guest-writable path that is not what the runner may touch; one line."""


def check_share_root(path: Path, uid: int, mode: int | None = None) -> int:
    """Open a share root the guest will write: a real directory owned by ``uid``.

    Refuses a symlink or anything not a directory, and a directory owned by
    someone else.  With ``mode``, re-applies it (a guest's ``chmod 0777`` of
    its home does not outlive the launch).  Returns an O_DIRECTORY fd.
    """
    try:
        fd = os.open(path, _DIR_FLAGS)
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafeFile(err.errno, f"{path} is not a real directory (a symlink?)") from None
        raise
    try:
        info = os.fstat(fd)
        if info.st_uid != uid:
            raise UnsafeFile(errno.EPERM, f"{path} is owned by uid {info.st_uid}, not by you")
        if mode is not None and stat.S_IMODE(info.st_mode) != mode:
            os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def opened_dir(path: Path) -> Iterator[int]:
    """An fd for a directory the runner itself made (its own state dirs)."""
    fd = os.open(path, _DIR_FLAGS)
    try:
        yield fd
    finally:
        os.close(fd)


def _parts(relative: str | PurePosixPath) -> list[str]:
    parts = [p for p in PurePosixPath(relative).parts if p not in ("", ".")]
    if not parts or parts[0] == "/" or ".." in parts:
        raise ValueError(f"not a plain relative path: {relative!s}")
    return parts


def open_beneath(dir_fd: int, relative: str | PurePosixPath) -> int:
    """Open a directory below ``dir_fd`` without following any symlink."""
    fd = os.dup(dir_fd)
    try:
        for part in _parts(relative):
            child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(dir_fd: int, relative: str | PurePosixPath, limit: int) -> bytes | None:
    """The bytes of a regular file below ``dir_fd``; None when it does not exist.

    Raises UnsafeFile for a symlink (anywhere on the way), a FIFO, a device,
    a directory or a file longer than ``limit`` bytes.
    """
    fd = _open_file_beneath(dir_fd, relative)
    if fd is None:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnsafeFile(errno.EINVAL, f"{relative} is not a regular file")
        if info.st_size > limit:
            raise UnsafeFile(errno.EFBIG, f"{relative} is larger than {limit} bytes")
        chunks = []
        left = limit + 1  # one more than allowed: a file that grew is caught too
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 16))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > limit:
        raise UnsafeFile(errno.EFBIG, f"{relative} is larger than {limit} bytes")
    return data


def _open_file_beneath(dir_fd: int, relative: str | PurePosixPath) -> int | None:
    """O_NOFOLLOW|O_NONBLOCK open of the last component; None if absent."""
    *dirs, name = _parts(relative)
    try:
        parent = open_beneath(dir_fd, PurePosixPath(*dirs)) if dirs else os.dup(dir_fd)
    except FileNotFoundError:
        return None
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafeFile(
                err.errno, f"{relative}: a directory on the way is a symlink"
            ) from None
        raise
    try:
        return os.open(name, _READ_FLAGS, dir_fd=parent)
    except FileNotFoundError:
        return None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise UnsafeFile(err.errno, f"{relative} is a symlink") from None
        raise
    finally:
        os.close(parent)


def write_replacing(dir_fd: int, name: str, data: bytes, mode: int = 0o644) -> None:
    """Put ``data`` at ``name`` in the directory ``dir_fd``, atomically.

    Whatever the guest put at ``name`` (a symlink to a file of the user, a
    FIFO) is replaced by the rename, never opened.
    """
    if "/" in name or name in ("", ".", ".."):
        raise ValueError(f"not a plain name: {name!r}")
    tmp = f".{name}.{os.urandom(6).hex()}.tmp"
    fd = os.open(
        tmp,
        os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
        mode,
        dir_fd=dir_fd,
    )
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fchmod(fd, mode)  # the umask must not decide what the guest may read
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise


def remove(dir_fd: int, name: str) -> None:
    """unlinkat: removes a symlink itself, never its target; absent is fine."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dir_fd)


def strip_unsafe_modes(root: Path, uid: int) -> list[str]:
    """Clear set-uid/set-gid bits on regular files, and write-for-others
    on files and directories, everywhere below ``root``.

    virtiofsd stores what the guest's ``chmod 4755`` or ``chmod -R 0777``
    asks for, and the files are the user's: any local user who can reach
    them would run their code as the user, or change what the user runs
    next.  Walks with directory fds (no symlink followed), changes modes
    through the directory's fd or an O_PATH fd of the file itself.  Returns
    the relative paths whose set-id bits it cleared (for one line of output).
    """
    fixed: list[str] = []
    try:
        top = check_share_root(root, uid)
    except OSError:
        return fixed
    os.close(top)
    for dirpath, _dirs, files, dir_fd in os.fwalk(root, follow_symlinks=False):
        with contextlib.suppress(OSError):
            mode = stat.S_IMODE(os.fstat(dir_fd).st_mode)
            if mode & stat.S_IWOTH:
                os.fchmod(dir_fd, mode & ~stat.S_IWOTH)
        for name in files:
            try:
                info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except OSError:
                continue
            if not stat.S_ISREG(info.st_mode) or not info.st_mode & (_SETID | stat.S_IWOTH):
                continue
            with contextlib.suppress(OSError):
                fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
                try:
                    mode = stat.S_IMODE(info.st_mode) & ~(_SETID | stat.S_IWOTH)
                    os.chmod(f"/proc/self/fd/{fd}", mode)
                finally:
                    os.close(fd)
                if info.st_mode & _SETID:
                    fixed.append(os.path.relpath(os.path.join(dirpath, name), root))
    return fixed
