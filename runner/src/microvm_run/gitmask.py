"""Start virtiofsd with the user's git directory hidden from its share.

Run as a plain script in front of virtiofsd:

    python3 -I -S gitmask.py UID GID [--bind SRC DST | --ro-bind SRC DST]... -- VIRTIOFSD ARGS...

It enters a new mount namespace (and, for an unprivileged user, a user
namespace that maps only the user to 0, the same single mapping virtiofsd's
``--uid-map :0:UID:1:`` makes), mounts each SRC over DST there, then execs
virtiofsd.  virtiofsd sees the project with the agent's own git directory
where ``.git`` is; the user's ``.git`` exists only under that mount, in a
namespace no guest request can change: the FUSE protocol has no mount or
unmount, a mount point cannot be renamed or removed (EBUSY), and virtiofsd
confines itself to the shared directory.  Guest root is no exception: all
it can do is send FUSE requests to this virtiofsd.

DST is opened with O_PATH|O_NOFOLLOW and mounted on through /proc/self/fd,
so a symlink planted at DST never redirects a mount.  Standard library only;
it must work before the runner's own imports are on the path.
"""

import ctypes
import os
import stat
import sys

_CLONE_NEWNS = 0x00020000
_CLONE_NEWUSER = 0x10000000
_MS_RDONLY = 0x1
_MS_NOSUID = 0x2
_MS_NODEV = 0x4
_MS_REMOUNT = 0x20
_MS_BIND = 0x1000
_MS_REC = 0x4000
_MS_PRIVATE = 0x40000


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _write(path: str, data: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, data.encode())
    finally:
        os.close(fd)


def enter_namespace(libc: ctypes.CDLL, uid: int, gid: int) -> None:
    if uid == 0:
        _check(libc.unshare(_CLONE_NEWNS), "unshare(mount namespace)")
    else:
        _check(libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNS), "unshare(user+mount namespace)")
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"0 {uid} 1\n")
        _write("/proc/self/gid_map", f"0 {gid} 1\n")
    # Nothing mounted here propagates back to the host.
    _check(libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None), "make / private")


def _open_target(path: str, want_dir: bool) -> int:
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    info = os.fstat(fd)
    ok = stat.S_ISDIR(info.st_mode) if want_dir else stat.S_ISREG(info.st_mode)
    if not ok:
        os.close(fd)
        raise OSError(f"{path} is not a {'directory' if want_dir else 'regular file'}")
    return fd


def open_source(source: str) -> int:
    """Sources are opened before any mount: a later source may sit under an earlier target."""
    return os.open(source, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)


def bind(libc: ctypes.CDLL, src_fd: int, target: str, read_only: bool) -> None:
    is_dir = stat.S_ISDIR(os.fstat(src_fd).st_mode)
    dst_fd = _open_target(target, want_dir=is_dir)
    try:
        _check(
            libc.mount(
                f"/proc/self/fd/{src_fd}".encode(),
                f"/proc/self/fd/{dst_fd}".encode(),
                None,
                _MS_BIND,
                None,
            ),
            f"bind on {target}",
        )
    finally:
        os.close(dst_fd)
    if read_only:
        # The new mount is on top now: open it afresh to remount it.
        top = os.open(target, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            flags = _MS_BIND | _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV
            _check(
                libc.mount(None, f"/proc/self/fd/{top}".encode(), None, flags, None),
                f"make {target} read-only",
            )
        finally:
            os.close(top)


def main(argv: list[str]) -> int:
    if len(argv) < 4 or "--" not in argv:
        print("usage: gitmask.py UID GID [--bind|--ro-bind SRC DST]... -- CMD...", file=sys.stderr)
        return 2
    split = argv.index("--")
    head, command = argv[:split], argv[split + 1 :]
    uid, gid = int(head[0]), int(head[1])
    binds: list[tuple[str, str, bool]] = []
    rest = head[2:]
    while rest:
        if rest[0] not in ("--bind", "--ro-bind") or len(rest) < 3:
            print(f"gitmask.py: bad argument {rest[0]!r}", file=sys.stderr)
            return 2
        binds.append((rest[1], rest[2], rest[0] == "--ro-bind"))
        rest = rest[3:]
    libc = _libc()
    try:
        enter_namespace(libc, uid, gid)
        # In the new namespace (a mount takes no fd from another), but all
        # before the first mount.
        sources = [open_source(source) for source, _, _ in binds]
        for src_fd, (_, target, read_only) in zip(sources, binds, strict=True):
            bind(libc, src_fd, target, read_only)
    except OSError as err:
        # virtiofsd never starts: the runner reports that its socket never came.
        print(f"gitmask.py: {err}", file=sys.stderr)
        return 1
    os.execv(command[0], command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
