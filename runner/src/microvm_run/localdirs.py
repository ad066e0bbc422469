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

import fcntl
import os
import re
import stat
from pathlib import Path

from microvm_run.atomic import make_private_dir

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
# second that runs at the same time, ...  Each disk persists for its slot.
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
    """The first slot no running instance holds, as --dry-run shows it; the
    launch claims one for real (claim_slot)."""
    directory = image_dir(state_dir)
    for slot in range(MAX_SLOTS):
        fd = _open_lock(directory / f"{slot}.lock", create=False)
        if fd is None:
            return slot
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue
        finally:
            os.close(fd)  # drops the lock taken to look
        return slot
    return MAX_SLOTS


def claim_slot(state_dir: Path) -> tuple[int, int]:
    """Claim the first free slot: (slot, the fd whose flock holds it).

    The lock lives as long as the fd, which the runner keeps open until its
    VM has ended (not inherited: close-on-exec).  Runners that start at the
    same moment each get a slot of their own: one ext4 is never mounted by
    two guests.
    """
    directory = _private_dir(image_dir(state_dir))
    for slot in range(MAX_SLOTS):
        fd = _open_lock(directory / f"{slot}.lock", create=True)
        assert fd is not None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        return slot, fd
    raise LocalDirsError(
        f"all {MAX_SLOTS} local-directory disks of this project are in use by running "
        "instances; use --no-local-dirs"
    )


def _open_lock(path: Path, *, create: bool) -> int | None:
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    try:
        return os.open(path, flags, 0o600)
    except FileNotFoundError:
        if create:
            raise
        return None


def ensure_image(path: Path, size_bytes: int) -> bool:
    """Create the sparse image (0600, in the runner's state dir) if missing;
    True if it was created.

    An existing image keeps its size (its file system was made for it): a
    new quota applies to a new disk, after `gc --prune` or removing the
    image.  The guest formats a disk that has no file system yet.
    """
    _private_dir(path.parent)
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


def _private_dir(directory: Path) -> Path:
    """The image dir and the project's state dir above it, 0700 when made."""
    make_private_dir(directory.parent)
    directory.mkdir(mode=0o700, exist_ok=True)
    return directory
