"""How many files of a project virtiofsd can serve: its open-file limit.

virtiofsd holds one O_PATH descriptor for every inode the guest has looked
up and not yet forgotten, and the guest forgets only under memory pressure.
A project with more files and directories than virtiofsd may open loses
files in the guest once it has walked them all (`find`, a build, an
indexer): lookups fail with EMFILE.  virtiofsd raises its soft limit to the
hard one by itself (its default --rlimit-nofile, which falls back to the
hard limit when it cannot go higher); an explicit --rlimit-nofile above the
hard limit is fatal, and file handles (--inode-file-handles) need
CAP_DAC_READ_SEARCH in the host's namespace, which an unprivileged
virtiofsd has not (it disables them with a warning).  So the hard limit is
the bound, and what the runner can do is say so before the guest runs into
it.  The count stops at the limit, so it costs at most that many entries.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path

# Descriptors virtiofsd keeps for itself before any inode: its
# INTERNAL_FD_RESERVE (one per vhost-user memory slot, 509, plus 100) and one
# per pool thread (we run none: 1).  With a limit below this it refuses to start.
RESERVED = 610


def hard_limit() -> int | None:
    """The hard RLIMIT_NOFILE that virtiofsd inherits (None: unlimited)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if hard == resource.RLIM_INFINITY else hard


def count_entries(root: Path, stop_at: int) -> int:
    """Files and directories below ``root``, at most ``stop_at``.

    The project is the guest's to shape: no symlink is followed, and a
    directory that cannot be read counts as itself only.
    """
    count = 0
    pending = [root]
    while pending:
        directory = pending.pop()
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    count += 1
                    if count >= stop_at:
                        return count
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            pending.append(Path(entry.path))
                    except OSError:
                        continue
        except OSError:
            continue
    return count


def budget(limit: int) -> int:
    """How many inodes of one share virtiofsd can hold open under ``limit``."""
    return max(limit - RESERVED, 0)


def warning(work_dir: Path, limit: int | None) -> str | None:
    """One line if the project has more entries than virtiofsd can hold open."""
    if limit is None:
        return None
    room = budget(limit)
    # One more than the room, so "more than" is known without counting on.
    if count_entries(work_dir, room + 1) <= room:
        return None
    return (
        f"{work_dir} has more than {room} files and directories, more than virtiofsd can "
        f"keep open (hard limit on open files: {limit}): once the guest has seen that many, "
        f"more lookups fail and files seem to vanish; {FIX}"
    )


FIX = (
    "raise the hard limit (`ulimit -Hn`; nofile in /etc/security/limits.conf, or "
    "DefaultLimitNOFILE= in /etc/systemd/system.conf and user.conf) and log in again"
)
