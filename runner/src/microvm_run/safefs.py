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
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from microvm_run.egresslog import printable

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
_SETID = stat.S_ISUID | stat.S_ISGID


# The most entries one directory may list: the guest chooses how many there
# are, and the names are held in the runner's memory (~100 MiB at this cap).
MAX_ENTRIES = 1 << 20


def names_in(fd: int, limit: int = MAX_ENTRIES) -> list[str]:
    """The names in the directory ``fd``, at most ``limit`` (else UnsafeFile)."""
    names: list[str] = []
    with os.scandir(fd) as entries:
        for entry in entries:
            if len(names) >= limit:
                raise UnsafeFile(errno.EFBIG, f"more than {limit} entries in one directory")
            names.append(entry.name)
    return names


def shown(name: str | Path) -> str:
    """A name the guest chose, safe to print: every byte outside printable
    ASCII escaped, so it can send nothing to the user's terminal."""
    return printable(os.fsencode(name).decode("latin-1"), spaces=True)


class UnsafeFile(OSError):
    """A guest-writable path that is not what the runner may touch; one line."""


def check_share_root(
    path: Path, uid: int, mode: int | None = None, *, resolved: bool = False
) -> int:
    """Open a share root the guest will write: a real directory owned by ``uid``.

    Refuses a symlink or anything not a directory, and a directory owned by
    someone else.  With ``mode``, re-applies it (a guest's ``chmod 0777`` of
    its home does not outlive the launch).  ``resolved``: ``path`` was
    resolved when the launch was planned (the project, the agent home), so
    no directory on the way may be a symlink now (open_resolved_dir): one
    that is was planted by an agent whose share holds it.  Returns an
    O_DIRECTORY fd.
    """
    try:
        fd = open_resolved_dir(path) if resolved else os.open(path, _DIR_FLAGS)
    except UnsafeFile:
        raise
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


def open_resolved_dir(path: Path) -> int:
    """Open an absolute, already resolved directory with no symlink anywhere.

    ``path`` was resolved (``realpath``) a moment ago, so none of its
    components is a symlink: one that is now was put there since, by an
    agent whose share holds that component (a VM on a directory that
    contains this project).  Every component is opened with ``O_NOFOLLOW``
    from ``/``, so the fd is the directory at ``path`` itself or an error.
    """
    if not path.is_absolute():
        raise ValueError(f"{path} is not absolute")
    relative = PurePosixPath(path.relative_to("/"))
    fd = os.open("/", _DIR_FLAGS)
    if relative == PurePosixPath("."):
        return fd
    try:
        return open_beneath(fd, relative)
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafeFile(
                err.errno,
                f"{path} changed after it was resolved: a directory on the way is now a symlink",
            ) from None
        raise
    finally:
        os.close(fd)


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


@dataclass
class ModeRepair:
    """What strip_unsafe_modes did in one share root."""

    setid: list[str] = field(default_factory=list)  # relative paths whose set-id bits went
    failed: list[str] = field(default_factory=list)  # "relative path: why" it could not check


@dataclass
class _Frame:
    """A directory on the walk's current path: its identity and what is left."""

    name: str
    ident: tuple[int, int]
    names: list[str]


def strip_unsafe_modes(root: Path, uid: int, *, resolved: bool = False) -> ModeRepair:
    """Clear set-uid/set-gid bits on regular files, and write for group and
    others on files and directories, everywhere below ``root``.

    virtiofsd stores what the guest's ``chmod 4755`` or ``chmod -R 0777``
    asks for, and the files are the user's: any local user who can reach
    them (on NixOS every user shares the group ``users``) would run their
    code as the user, or change what the user runs next.  The guest can
    also hide a directory from the walk (``chmod 0``) or make it deeper than
    any recursion: so the walk is iterative, holds one directory fd (plus
    the root's), goes back up through ``..`` checked against the identity
    it left, and gives a directory the user cannot list ``u+rwx`` before
    entering it.  No symlink is followed; modes change through the parent's
    fd or an O_PATH fd of the entry itself.  What it could not check is in
    ``failed``, never silently skipped.  ``resolved``: as for check_share_root.
    """
    repair = ModeRepair()
    try:
        root_fd = check_share_root(root, uid, resolved=resolved)
    except FileNotFoundError:
        return repair
    except OSError as err:
        repair.failed.append(f".: {err.strerror or err}")
        return repair
    current = os.dup(root_fd)
    try:
        # The root's own mode is the caller's: the mode it had at launch.
        try:
            names = sorted(names_in(current), reverse=True)
        except OSError as err:
            repair.failed.append(f".: {err.strerror or err}")
            names = []
        frames = [_Frame(".", _ident(current), names)]
        while frames:
            frame = frames[-1]
            if not frame.names:
                frames.pop()
                if frames:
                    current = _back_up(current, root_fd, frames)
                continue
            name = frame.names.pop()
            entered = _visit(current, name, _relative(frames, name), repair)
            if entered is not None:
                os.close(current)
                current, below = entered
                frames.append(below)
    except _WalkLost as lost:
        current = os.dup(root_fd)  # _back_up closed the old one
        repair.failed.append(f"{lost}: moved during the walk; the rest of {root} unchecked")
    finally:
        os.close(current)
        os.close(root_fd)
    return repair


@dataclass(frozen=True)
class Step:
    """One step of walk_tree: a directory entered, or one left.

    Entering: ``fd`` is the directory ``relative`` and ``names`` its entries.
    Leaving (``leaving``): everything below ``relative`` was walked; ``fd``
    is its parent's and ``name`` its name there (to rmdir it).  ``fd`` is
    valid until the next step.
    """

    relative: str
    fd: int
    names: tuple[str, ...]
    leaving: bool = False
    name: str = ""
    links: tuple[str, ...] = ()  # the entries that are symlinks (never entered)


def walk_tree(
    root_fd: int, *, unlock: bool = False, skip_top: frozenset[str] = frozenset()
) -> Iterator[Step]:
    """Every directory below ``root_fd`` (itself first), depth first, without
    recursion and with two fds open whatever the depth.

    No symlink is followed.  A directory that cannot be listed raises
    UnsafeFile, unless ``unlock`` gives it ``u+rwx`` first (the guest's
    ``chmod 0`` must not hide what is inside).  ``skip_top``: names in the
    root not entered.  The caller may remove entries during a step.
    """
    current = os.dup(root_fd)
    try:
        names, dirs, links = _listing(current, ".")
        frames = [_Frame(".", _ident(current), [d for d in dirs if d not in skip_top])]
        yield Step(".", current, names, links=links)
        while frames:
            frame = frames[-1]
            if not frame.names:
                frames.pop()
                if frames:
                    try:
                        current = _back_up(current, root_fd, frames)
                    except _WalkLost as lost:
                        current = os.dup(root_fd)  # closed in finally
                        raise UnsafeFile(errno.ESTALE, f"{shown(str(lost))} moved") from None
                    relative = _relative(frames, frame.name)
                    yield Step(relative, current, (), leaving=True, name=frame.name)
                continue
            name = frame.names.pop()  # a directory when listed
            relative = _relative(frames, name)
            try:
                info = os.stat(name, dir_fd=current, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if not stat.S_ISDIR(info.st_mode):
                continue
            repair = ModeRepair()
            if unlock:
                child = _open_dir(current, name, info, relative, repair)
            else:
                child = _open_checked(current, name, info, relative, repair)
            if child is None:
                raise UnsafeFile(errno.EACCES, f"cannot read {shown(repair.failed[0])}")
            try:
                names, dirs, links = _listing(child, relative)
            except BaseException:
                os.close(child)
                raise
            os.close(current)
            current = child
            frames.append(_Frame(name, (info.st_dev, info.st_ino), dirs))
            yield Step(relative, current, names, links=links)
    finally:
        os.close(current)


def _listing(fd: int, relative: str) -> tuple[tuple[str, ...], list[str], tuple[str, ...]]:
    """All entries, sorted; the subdirectories (from d_type, no stat each)
    in reverse order, for popping; and the symlinks."""
    try:
        with os.scandir(fd) as entries:
            listed: list[tuple[str, bool, bool]] = []
            for entry in entries:
                if len(listed) >= MAX_ENTRIES:
                    raise UnsafeFile(
                        errno.EFBIG, f"more than {MAX_ENTRIES} entries in one directory"
                    )
                listed.append((entry.name, entry.is_dir(follow_symlinks=False), entry.is_symlink()))
    except OSError as err:
        raise UnsafeFile(err.errno, f"cannot read {shown(relative)}: {err.strerror}") from None
    listed.sort()
    return (
        tuple(name for name, _, _ in listed),
        [name for name, is_dir, _ in reversed(listed) if is_dir],
        tuple(name for name, _, is_link in listed if is_link),
    )


def _open_checked(
    dir_fd: int, name: str, info: os.stat_result, relative: str, repair: ModeRepair
) -> int | None:
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError as err:
        repair.failed.append(f"{relative}: {err.strerror or err}")
        return None
    if _ident(fd) != (info.st_dev, info.st_ino):
        os.close(fd)
        repair.failed.append(f"{relative}: changed during the walk")
        return None
    return fd


class _WalkLost(Exception):
    """The way back up no longer leads where the walk came from."""


_UNSAFE_WRITE = stat.S_IWGRP | stat.S_IWOTH


def _ident(fd: int) -> tuple[int, int]:
    info = os.fstat(fd)
    return info.st_dev, info.st_ino


def _relative(frames: list[_Frame], name: str) -> str:
    return os.path.join(*(f.name for f in frames[1:]), name)


def _back_up(current: int, root_fd: int, frames: list[_Frame]) -> int:
    """The fd of frames[-1] (the parent of ``current``), which it closes."""
    try:
        parent = os.open("..", _DIR_FLAGS, dir_fd=current)
    except OSError:
        parent = None
    finally:
        os.close(current)
    if parent is not None and _ident(parent) == frames[-1].ident:
        return parent
    if parent is not None:
        os.close(parent)
    # Moved (another VM on the project): reach it again from the root.
    relative = PurePosixPath(*(f.name for f in frames[1:]))
    try:
        parent = open_beneath(root_fd, relative) if frames[1:] else os.dup(root_fd)
    except (OSError, ValueError):
        raise _WalkLost(str(relative)) from None
    if _ident(parent) != frames[-1].ident:
        os.close(parent)
        raise _WalkLost(str(relative))
    return parent


def _visit(dir_fd: int, name: str, relative: str, repair: ModeRepair) -> tuple[int, _Frame] | None:
    """Fix the entry ``name``; for a directory to enter, its fd and frame."""
    try:
        info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    except OSError as err:
        repair.failed.append(f"{relative}: {err.strerror or err}")
        return None
    if stat.S_ISREG(info.st_mode):
        _fix_file(dir_fd, name, info, relative, repair)
        return None
    if not stat.S_ISDIR(info.st_mode):
        return None  # symlinks, FIFOs, sockets: nothing to follow or run
    child = _open_dir(dir_fd, name, info, relative, repair)
    if child is None:
        return None
    names = _enter_dir(child, relative, repair)
    if names is None:
        os.close(child)
        return None
    return child, _Frame(name, (info.st_dev, info.st_ino), names)


def _enter_dir(fd: int, relative: str, repair: ModeRepair) -> list[str] | None:
    """Close the directory's write for group and others; its entries."""
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        if mode & _UNSAFE_WRITE:
            os.fchmod(fd, mode & ~_UNSAFE_WRITE)
        return sorted(names_in(fd), reverse=True)
    except OSError as err:
        repair.failed.append(f"{relative}: {err.strerror or err}")
        return None


def _chmod_entry(dir_fd: int, name: str, info: os.stat_result, mode: int) -> None:
    """chmod the entry ``name`` of ``dir_fd`` that ``info`` describes, never
    through a symlink: an O_PATH fd checked to be that entry, chmod-ed
    through /proc (fchmod refuses O_PATH fds)."""
    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino, stat.S_IFMT(now.st_mode)) != (
            info.st_dev, info.st_ino, stat.S_IFMT(info.st_mode),
        ):  # fmt: skip
            raise OSError(errno.ESTALE, "changed during the walk")
        os.chmod(f"/proc/self/fd/{fd}", mode)
    finally:
        os.close(fd)


def _fix_file(
    dir_fd: int, name: str, info: os.stat_result, relative: str, repair: ModeRepair
) -> None:
    if not info.st_mode & (_SETID | _UNSAFE_WRITE):
        return
    try:
        _chmod_entry(dir_fd, name, info, stat.S_IMODE(info.st_mode) & ~(_SETID | _UNSAFE_WRITE))
    except OSError as err:
        repair.failed.append(f"{relative}: {err.strerror or err}")
        return
    if info.st_mode & _SETID:
        repair.setid.append(relative)


def _open_dir(
    dir_fd: int, name: str, info: os.stat_result, relative: str, repair: ModeRepair
) -> int | None:
    """The subdirectory's fd, after giving it u+rwx if the guest took them away."""
    if info.st_mode & stat.S_IRWXU != stat.S_IRWXU:
        try:
            _chmod_entry(dir_fd, name, info, stat.S_IMODE(info.st_mode) | stat.S_IRWXU)
        except OSError as err:
            repair.failed.append(f"{relative}: {err.strerror or err}")
            return None
    return _open_checked(dir_fd, name, info, relative, repair)
