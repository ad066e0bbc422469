"""Which directory each virtiofsd really serves, checked before the guest starts.

virtiofsd opens its ``--shared-dir`` by name, some time after the runner
checked that name.  An agent whose own share holds that name (a VM on a
directory that contains this project) can swap the project for a symlink, or
for another directory, in between: virtiofsd would then serve whatever the
link points at (``~``, ``~/.ssh``).  So the runner takes each share root's
identity (device and inode) from an fd it opened without following any
symlink, and after virtiofsd has confined itself (``--sandbox=namespace``
makes the shared directory its root) compares ``/proc/PID/root`` with it.
A mismatch stops the launch before QEMU exists: no guest ever sees the other
directory.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from microvm_run import safefs
from microvm_run.plan import LaunchPlan

Identity = tuple[int, int]  # (st_dev, st_ino)

_POLL_S = 0.005


class ShareSwapped(RuntimeError):
    """A share root is not the directory the runner checked; one line."""


def identities(plan: LaunchPlan, uid: int) -> dict[Path, Identity]:
    """The identity of every share root, from fds opened without following links.

    The project was resolved when the plan was made, so no component of its
    path may be a symlink now.  The runner's own share roots (agent home,
    container storage) must be real directories of the user (their parents
    are the runner's, out of the guest's reach).  Anything else (the host's
    store) is not writable by any guest and is taken as it is.
    """
    owned = set(plan.dirs_to_create)
    found: dict[Path, Identity] = {}
    for daemon in plan.virtiofsd:
        root = daemon.shared_dir
        if root in (plan.work_dir, plan.agent_home):
            # Both resolved when planned: no symlink may be on the way now.
            fd = safefs.open_resolved_dir(root)
        elif root in owned:
            fd = safefs.check_share_root(root, uid)
        else:
            info = os.stat(root)
            found[root] = (info.st_dev, info.st_ino)
            continue
        try:
            info = os.fstat(fd)
        finally:
            os.close(fd)
        found[root] = (info.st_dev, info.st_ino)
    return found


def confirm(
    served: Iterable[tuple[str, Path, int]],
    expected: Mapping[Path, Identity],
    deadline_s: float,
) -> None:
    """Raise ShareSwapped unless each virtiofsd's root is the checked directory.

    ``served`` holds (share tag, shared dir, virtiofsd's pid).  virtiofsd
    creates its socket before it enters its sandbox, so its root may still be
    ours for a moment: that is waited for, up to ``deadline_s``.
    """
    host_root = _identity_of("/proc/self/root")
    for tag, shared_dir, pid in served:
        want = expected[shared_dir]
        stop = time.monotonic() + deadline_s
        while True:
            try:
                seen = _identity_of(f"/proc/{pid}/root")
            except OSError as err:
                raise ShareSwapped(
                    f"cannot tell which directory virtiofsd for share {tag} serves: "
                    f"{err.strerror or err}"
                ) from None
            if seen != host_root:
                break
            if time.monotonic() > stop:
                raise ShareSwapped(
                    f"virtiofsd for share {tag} did not confine itself to {shared_dir} "
                    f"within {deadline_s:g} s"
                )
            time.sleep(_POLL_S)
        if seen != want:
            raise ShareSwapped(
                f"{safefs.shown(shared_dir)} was replaced while virtiofsd started (a VM on "
                "a directory that contains it can do that): not sharing what is there now"
            )


def _identity_of(path: str) -> Identity:
    info = os.stat(path)
    return (info.st_dev, info.st_ino)
