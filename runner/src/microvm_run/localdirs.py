"""Local directories: heavy, reproducible build trees on a guest-local disk.

node_modules, target, .venv and their kind are many small files that the
agent's tools write and delete by the thousand; over virtiofs every one of
those is a round trip to the host (bench/fs: 10-25x the guest's own disk).
They are rebuilt from the project's lockfiles, so they need not be shared:
the guest keeps them on a disk of its own, a sparse per-project image in
the runner's state dir (never in the project or the agent home), and
bind-mounts them over those paths in /work (contract.py, "Local
directories").  The host sees what it had there (usually nothing, or an
empty directory the guest made), never the guest's files.

Which directories: the ones the project's lockfiles and manifests imply
(RULES), or the user's list (--local-dirs), or none (--no-local-dirs).
Only names at the project's top are looked at, and only whether they exist:
nothing in the project is read.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import stat
import struct
from pathlib import Path

# (a file at the project's top, the directories it implies); every rule
# whose file exists adds its directories.
RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("package-lock.json", ("node_modules",)),
    ("npm-shrinkwrap.json", ("node_modules",)),
    ("yarn.lock", ("node_modules",)),
    ("pnpm-lock.yaml", ("node_modules",)),
    ("bun.lockb", ("node_modules",)),
    ("package.json", ("node_modules", "dist")),
    ("Cargo.lock", ("target",)),
    ("Cargo.toml", ("target",)),
    ("uv.lock", (".venv",)),
    ("poetry.lock", (".venv",)),
    ("Pipfile.lock", (".venv",)),
    ("pyproject.toml", (".venv",)),
    ("requirements.txt", (".venv",)),
    ("build.gradle", (".gradle",)),
    ("build.gradle.kts", (".gradle",)),
    ("settings.gradle", (".gradle",)),
    ("settings.gradle.kts", (".gradle",)),
    (".envrc", (".direnv",)),
)
DEFAULT_SIZE_GIB = 16
MAX_SIZE_GIB = 1024
# Concurrent instances on one project each get a disk of their own (one
# ext4 must never be mounted by two guests): slot 0 for the first, 1 for a
# second that runs at the same time, ...
MAX_SLOTS = 16
MAX_DIRS = 32
_DIR = re.compile(r"[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*")


class LocalDirsError(ValueError):
    """A bad --local-dirs value; the message is one line for the user."""


def parse(raw: str) -> tuple[str, ...]:
    """--local-dirs A,B: relative paths inside /work, checked."""
    dirs = tuple(dict.fromkeys(word for word in raw.replace(",", " ").split() if word))
    if len(dirs) > MAX_DIRS:
        raise LocalDirsError(f"--local-dirs takes at most {MAX_DIRS} directories")
    for entry in dirs:
        parts = entry.split("/")
        if (
            not _DIR.fullmatch(entry)
            or any(part in (".", "..") for part in parts)
            or parts[0] == ".git"
        ):
            raise LocalDirsError(
                f"--local-dirs: {entry!r} must be a relative path inside the project "
                "(letters, digits, . _ - and /; no .., not .git)"
            )
    return dirs


def implied(work_dir: Path) -> tuple[str, ...]:
    """The directories the project's top-level lockfiles and manifests imply."""
    try:
        names = set(os.listdir(work_dir))
    except OSError:
        return ()
    dirs: dict[str, None] = {}
    for marker, wanted in RULES:
        if marker in names:
            dirs |= dict.fromkeys(wanted)
    return tuple(dirs)


def image_dir(state_dir: Path) -> Path:
    """Where a project's disk images live: the runner's own state for it."""
    return state_dir / "local-dirs"


def free_slot(state_dir: Path) -> int:
    """The first slot whose image no running QEMU holds (reads only).

    QEMU locks the image it writes (byte-range OFD locks); a slot whose
    image carries a lock belongs to a running instance.  Two runners that
    start at the same moment may pick the same slot: the second QEMU then
    refuses the image ("Failed to get write lock"), never shares it.
    """
    directory = image_dir(state_dir)
    for slot in range(MAX_SLOTS):
        if not _locked(directory / f"{slot}.img"):
            return slot
    return MAX_SLOTS - 1  # every slot busy: QEMU will say so


def _locked(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except OSError:
        return True  # not ours to use (a symlink, unreadable): skip the slot
    try:
        # struct flock: l_type, l_whence, l_start, l_len, l_pid (Linux x86_64)
        query = struct.pack("hhqqi", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
        answer = fcntl.fcntl(fd, _F_OFD_GETLK, query + b"\0" * 4)
        return struct.unpack("hhqqi", answer[: struct.calcsize("hhqqi")])[0] != fcntl.F_UNLCK
    except OSError as err:
        return err.errno != errno.EINVAL
    finally:
        os.close(fd)


_F_OFD_GETLK = 36  # linux/fcntl.h; Python's fcntl module has it from 3.12 on


def ensure_image(path: Path, size_bytes: int) -> bool:
    """Create the sparse image (0600, in the runner's state dir) if missing;
    True if it was created.

    An existing image keeps its size (its file system was made for it): a
    new quota applies to a new disk, after `gc --prune` or removing the
    image.  The guest formats a disk that has no file system yet.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        info = path.lstat()
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
            raise OSError(f"{path} is not a regular file of yours") from None
        return False
    try:
        os.ftruncate(fd, size_bytes)
    finally:
        os.close(fd)
    return True
