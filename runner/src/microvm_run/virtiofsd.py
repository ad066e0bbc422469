"""virtiofsd command lines (the Rust virtiofsd dialect that nixpkgs ships)."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

from microvm_run.contract import GUEST_UID


class Supervisor(StrEnum):
    """Who keeps the virtiofsd daemons: transient user units, or the runner."""

    SYSTEMD = "systemd"
    CHILD = "child"


# overlayfs inside the guest (container storage) keeps its metadata in
# trusted.* xattrs, which an unprivileged virtiofsd may not set: store them
# under user.* on the host instead.
_CRI_XATTRMAP = ":map:trusted.:user.virtiofs.trusted.:"

# The store never changes under a path the guest has seen (paths are
# immutable; new ones appear as new names, and virtiofsd caches no negative
# lookups), so the guest may keep everything: `always` makes an exec from the
# store about 12x cheaper (6 ms vs 72 ms measured).  Every other share can
# change on the host while the guest runs: `auto` re-validates within 1 s
# (virtiofsd's attribute and entry timeout) and on every open.
_CACHE = {"nix-store": "always"}
# The shares the host edits too (the project, the agent home) take the
# user's --fs-cache; README "Bench" has the measurements behind the default.
USER_CACHED_SOURCES = ("work", "home")


class FsCache(StrEnum):
    """--fs-cache: virtiofsd's --cache for the shares the host edits too."""

    AUTO = "auto"
    ALWAYS = "always"
    NEVER = "never"


FS_CACHE_MODES = tuple(mode.value for mode in FsCache)
DEFAULT_FS_CACHE = FsCache.AUTO


def cache_mode(source: str, chosen: FsCache) -> str:
    """virtiofsd's --cache for a share: the store's fixed one, else the user's for
    the project and the home, else auto."""
    if source in _CACHE:
        return _CACHE[source]
    return chosen if source in USER_CACHED_SOURCES else DEFAULT_FS_CACHE


def virtiofsd_argv(
    virtiofsd: Path,
    *,
    shared_dir: Path,
    socket: Path,
    uid: int,
    gid: int,
    read_only: bool,
    source: str,
    cache: FsCache = DEFAULT_FS_CACHE,
) -> list[str]:
    """One unprivileged virtiofsd for one share.

    The namespace maps the invoking user to 0; guest uid 1000 (the agent) is
    translated to that 0 too, so what the agent writes is owned by the user.
    No ``--tag``: QEMU 7.1-8.0 crash on the tag it announces.
    """
    argv = [
        str(virtiofsd),
        f"--shared-dir={shared_dir}",
        f"--socket-path={socket}",
        "--sandbox=namespace",
    ]
    if uid != 0:
        # virtiofsd refuses ID maps when run by root, who needs none.
        argv += [f"--uid-map=:0:{uid}:1:", f"--gid-map=:0:{gid}:1:"]
    argv += [
        f"--translate-uid=map:{GUEST_UID}:0:1",
        f"--translate-gid=map:{GUEST_UID}:0:1",
        "--xattr",
        # Without CAP_MKNOD and CAP_SETFCAP virtiofsd cannot create device
        # nodes or set file capabilities for the guest: where it runs as
        # root (MICROVM_RUN_ALLOW_ROOT) guest root could otherwise leave a
        # 0666 node of the host's disk, or a file granting capabilities, in
        # the project for any local user.  FIFOs and sockets need neither.
        "--modcaps=-mknod:-setfcap",
        f"--cache={cache_mode(source, cache)}",
    ]
    if read_only:
        argv.append("--readonly")
    if source == "cri-storage":
        argv.append(f"--xattrmap={_CRI_XATTRMAP}")
    return argv


def unit_name(basename: str, agent: str, tag: str, instance_id: str) -> str:
    """The transient user unit: ``<basename>-<agent>-vm-virtiofsd-<tag>-<id>``."""
    return f"{basename}-{agent}-vm-virtiofsd-{tag}-{instance_id}"
