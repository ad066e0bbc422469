"""After a run: the agent's commits into the user's repository, never running git on its dir.

The agent's git directory is the guest's writing.  Refs are parsed here
(no symlink followed, no FIFO opened, bounded reads); new objects are copied
as plain files into a scratch repository whose configuration is the
runner's; the user's repository fetches from that with fsck on.  Nothing
the guest wrote is configuration, a hook or a path that host git follows.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from microvm_run import safefs
from microvm_run.agentgit import (
    AGENT_PREFIX,
    HEX,
    GitError,
    GitPlan,
    Meta,
    count_commits,
    git,
    user_git,
)

# Guest-written files are read with bounds: refs are one line, packed-refs
# is a list, objects are copied up to a total.
MAX_REF_FILE = 4096
MAX_PACKED_REFS = 8 * 1024 * 1024
MAX_IMPORT_BYTES = 2 * 1024 * 1024 * 1024
MAX_IMPORT_FILES = 200_000
# Branch names the import accepts from the guest (subset of git's rules).
_REFNAME = re.compile(r"refs/heads/[A-Za-z0-9._/-]{1,200}")


@contextlib.contextmanager
def _opendir(path: Path, dir_fd: int | None = None) -> Iterator[int]:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        yield fd
    finally:
        os.close(fd)


def _read_at(dir_fd: int, parts: list[str], limit: int) -> bytes | None:
    """A regular file below dir_fd, no symlink followed, at most ``limit`` bytes."""
    fds: list[int] = []
    try:
        current = dir_fd
        for part in parts[:-1]:
            current = os.open(
                part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=current
            )
            fds.append(current)
        fd = os.open(
            parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=current
        )
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_size > limit:
                return None
            return os.read(fd, limit + 1)[:limit]
        finally:
            os.close(fd)
    except OSError:
        return None
    finally:
        for fd in fds:
            os.close(fd)


def agent_head(agent_git: Path) -> str | None:
    """The commit the agent's HEAD names, read as data (None: none or unreadable)."""
    try:
        with _opendir(agent_git) as root:
            raw = _read_at(root, ["HEAD"], MAX_REF_FILE)
            if raw is None:
                return None
            text = raw.decode(errors="replace").strip()
            if HEX.fullmatch(text):
                return text
            ref = text.removeprefix("ref: ").strip()
            if not text.startswith("ref: ") or not _REFNAME.fullmatch(ref) or ".." in ref:
                return None
            loose = _read_at(root, ref.split("/"), MAX_REF_FILE)
            if loose is not None:
                value = loose.decode(errors="replace").strip()
                return value if HEX.fullmatch(value) else None
            packed = _read_at(root, ["packed-refs"], MAX_PACKED_REFS)
            for line in (packed or b"").decode(errors="replace").splitlines():
                sha, _, name = line.partition(" ")
                if name == ref and HEX.fullmatch(sha):
                    return sha
    except OSError:
        return None
    return None


# Names one object folder may hold: a real one holds far fewer.
MAX_OBJECT_NAMES = 1 << 16


def _copy_objects(agent_git: Path, target_objects: Path) -> None:
    """The agent's own objects as plain files (loose ones and packs), bounded."""
    budget = _Budget()
    with _opendir(agent_git) as root, _opendir(Path("objects"), root) as objects:
        for entry in sorted(safefs.names_in(objects)):
            if re.fullmatch(r"[0-9a-f]{2}", entry):
                wanted = re.compile(r"[0-9a-f]{38}|[0-9a-f]{62}")
            elif entry == "pack":
                wanted = re.compile(r"pack-[0-9a-f]{40,64}\.(pack|idx)")
            else:
                continue  # info/ (the guest's alternates) and anything else: never read
            try:
                with _opendir(Path(entry), objects) as folder:
                    for name in sorted(safefs.names_in(folder, limit=MAX_OBJECT_NAMES)):
                        if wanted.fullmatch(name):
                            dest = target_objects / entry / name
                            dest.parent.mkdir(exist_ok=True)
                            _copy_at(folder, name, dest, budget)
            except OSError:
                continue  # a symlink or file where a folder should be


@dataclass
class _Budget:
    files: int = 0
    bytes: int = 0

    def take(self, size: int) -> None:
        self.files += 1
        self.bytes += size
        if self.files > MAX_IMPORT_FILES or self.bytes > MAX_IMPORT_BYTES:
            raise GitError(
                f"the agent's new objects exceed {MAX_IMPORT_FILES} files or "
                f"{MAX_IMPORT_BYTES >> 30} GiB; not imported"
            )


def _copy_at(dir_fd: int, name: str, dest: Path, budget: _Budget) -> None:
    """Copy one regular file (no symlink, no FIFO) in chunks, within the budget."""
    try:
        fd = os.open(
            name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd
        )
    except OSError:
        return
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return
        budget.take(info.st_size)
        with dest.open("wb") as out:
            copied = 0
            while copied < info.st_size:
                chunk = os.read(fd, min(1 << 20, info.st_size - copied))
                if not chunk:
                    break
                out.write(chunk)
                copied += len(chunk)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Imported:
    branch: str
    commits: int  # not yet landed, on the branch after this import
    head: str | None = None  # what was imported (None: nothing)


def import_commits(plan: GitPlan, meta: Meta, environ: Mapping[str, str]) -> Imported:
    """Bring the agent's HEAD into the user's repository as refs/heads/agent/NAME.

    Nothing happens when the HEAD is where it started or where the last
    import left it: a branch the user rebased in between stays as it is.
    """
    head = agent_head(plan.agent_git)
    if head is None or head in (meta.start, meta.imported):
        return Imported(plan.branch, 0)
    import tempfile  # noqa: PLC0415 - keeps --dry-run's imports small

    with tempfile.TemporaryDirectory(prefix="import-", dir=plan.run_dir) as scratch:
        staging = Path(scratch) / "staging.git"
        git(["init", "-q", "--bare", "--template=", str(staging)], environ, isolated=True)
        if len(head) == 64:
            git(
                ["--git-dir", str(staging), "config", "extensions.objectFormat", "sha256"],
                environ,
                isolated=True,
            )
        objects = staging / "objects"
        (objects / "info").mkdir(exist_ok=True)
        (objects / "info" / "alternates").write_text(f"{plan.user_git / 'objects'}\n")
        _copy_objects(plan.agent_git, objects)
        staged = git(
            ["--git-dir", str(staging), "update-ref", "refs/import/head", head],
            environ,
            isolated=True,
            check=False,
        )
        if staged.returncode != 0:
            raise GitError(f"the agent's HEAD {head[:12]} is not a commit the host can read")
        user_git(
            plan.project,
            [
                "fetch", "-q", "--no-tags", "--no-write-fetch-head", "--no-recurse-submodules",
                str(staging), f"+refs/import/head:refs/heads/{plan.branch}",
            ],
            environ,
        )  # fmt: skip
    base = meta.landed or meta.start
    count = count_commits(plan.project, base, f"refs/heads/{plan.branch}", environ)
    return Imported(plan.branch, count, head)


def finish_shared(plan: GitPlan, imported: Imported) -> None:
    """A shared run's git dir goes once imported: its commits are in the user's repo.

    Its meta.json stays while there are commits to land (review and land read it).
    """
    if plan.mode != "shared":
        return

    from microvm_run.ops import remove_tree  # noqa: PLC0415 - iterative: the guest sets the depth

    remove_tree(plan.run_dir if imported.commits == 0 else plan.agent_git)


def summary(imported: Imported) -> str:
    if imported.commits == 0:
        return "the agent made no commits"
    plural = "s" if imported.commits != 1 else ""
    name = imported.branch.removeprefix(AGENT_PREFIX)
    return f"{imported.commits} commit{plural} on {imported.branch}; microvm-run review {name}"
