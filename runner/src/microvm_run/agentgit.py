"""The agent's own git directory: the plan, the hardened host git, the run's record.

gitprepare.py makes the directory before a run, gitimport.py brings the
agent's commits home after it, git_cli.py drives both.

The guest never sees the user's git directory (docs/git.md).  Per run (or
per ``--worktree`` name) the runner keeps, in its state directory and never
inside the project:

    $XDG_STATE_HOME/microvm-run/git/<basename>-<hash>/<NAME>/
        meta.json   what the run started from (host-written, never shared)
        git/        the agent's git directory: the guest's /work/.git
        tree/       --worktree only: the agent's working tree, the guest's /work

``git/`` borrows the user's objects read-only (``objects/info/alternates``
names ``../user-objects``, where virtiofsd's namespace mounts the user's
``.git/objects`` read-only, see gitmask.py), so preparing it costs no copy.
After the run the host imports the agent's commits without ever running git
in ``git/``: refs are parsed here, new objects are copied as plain files into
a scratch repository whose configuration is the runner's, and the user's
repository fetches from that with fsck on.  Nothing the guest wrote is
configuration, a hook or a path that host git follows.
"""

from __future__ import annotations

import contextlib
import re
import stat
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from microvm_run import home
from microvm_run.atomic import make_private_dir, write_atomic

if TYPE_CHECKING:
    from microvm_run import process

GIT_TIMEOUT_S = 300
# --worktree NAME: one ref component, no git ref syntax surprises.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
HEX = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
AGENT_PREFIX = "agent/"
USER_OBJECTS = "user-objects"


class GitError(RuntimeError):
    """A git step failed; the message is one line for the user."""


@dataclass(frozen=True)
class GitPlan:
    """How the project's git is presented to the guest (pure data, --dry-run shows it).

    mode: ``shared`` (the project's working tree, the agent's own .git),
    ``worktree`` (the runner's working tree for NAME), ``gitfile`` (the
    project's .git is a file: a linked worktree or a submodule; shown
    read-only, the agent gets no git).
    """

    mode: str
    name: str
    project: Path
    user_git: Path  # <project>/.git
    run_dir: Path
    share_root: Path  # what the work share exposes at /work
    # (flag, source, target) for gitmask.py, in order.
    binds: tuple[tuple[str, Path, Path], ...]
    # Unpopulated submodules' directories to create before the launch.
    make_dirs: tuple[Path, ...] = ()

    @property
    def agent_git(self) -> Path:
        return self.run_dir / "git"

    @property
    def branch(self) -> str:
        """The branch the agent's work is imported as, in the user's repository."""
        return AGENT_PREFIX + self.name


@dataclass(frozen=True)
class Meta:
    """What a run started from; meta.json, written only by the host."""

    project: str
    mode: str
    name: str
    branch: str | None  # the user's branch at the start (None: detached or unborn)
    start: str | None  # its commit (None: unborn)
    created: str
    landed: str | None = None  # the commit last landed
    imported: str | None = None  # the agent's HEAD at the last import

    def to_json(self) -> str:
        import json  # noqa: PLC0415 - keeps --dry-run's imports small

        return json.dumps(asdict(self), indent=2) + "\n"


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name) or name.endswith((".lock", ".")) or ".." in name:
        raise ValueError(
            f"worktree name {name!r}: use 1-63 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def project_dir(state_home: Path, project: Path) -> Path:
    return (
        state_home
        / "microvm-run"
        / "git"
        / f"{home.project_basename(project)}-{home.project_hash(project)}"
    )


def exposed_marker(state_home: Path, project: Path) -> Path:
    """Touched when an agent ran on ``project`` with its ``.git`` not hidden.

    With no ``.git`` (an agent may ``git init``) or inside another
    repository (it may make one), whatever ``.git`` appears later may be the
    agent's: its config, hooks and alternates would run when the runner's
    git reads it.  Kept in the runner's state, out of the guest's reach.
    """
    return project_dir(state_home, project) / "agent-could-write-git"


def below_marker(state_home: Path, project: Path) -> Path:
    """Touched at every run on ``project``: a ``.git`` below it may be an agent's."""
    return project_dir(state_home, project) / "agent-could-write-below"


def trust_record(state_home: Path, project: Path) -> Path:
    """Touched by --trust-git: the user checked ``project``'s ``.git`` then."""
    return project_dir(state_home, project) / "git-trusted"


def _touch(path: Path) -> None:
    make_private_dir(path.parent)
    path.touch(mode=0o600)  # an existing one gets the time now


def mark_run(state_home: Path, project: Path, *, git_hidden: bool) -> None:
    """Record that an agent ran on ``project`` (and could write below it)."""
    _touch(below_marker(state_home, project))
    if not git_hidden:
        _touch(exposed_marker(state_home, project))


def trust(state_home: Path, project: Path) -> None:
    _touch(trust_record(state_home, project))


def git_untrusted(state_home: Path, project: Path) -> bool:
    """May ``project/.git`` be an agent's?  Yes if, since the user last said
    --trust-git, an agent ran on the project with its .git not hidden, or on
    any directory above it (whose share held this .git)."""
    markers = [exposed_marker(state_home, project)]
    markers += [below_marker(state_home, parent) for parent in project.parents]
    newest = 0
    for marker in markers:
        with contextlib.suppress(OSError):
            newest = max(newest, marker.stat().st_mtime_ns)
    if newest == 0:
        return False
    try:
        return trust_record(state_home, project).stat().st_mtime_ns <= newest
    except OSError:
        return True


def plan_git(
    project: Path,
    state_home: Path,
    *,
    worktree: str | None,
    instance_id: str,
    trust_git: bool = False,
) -> GitPlan | None:
    """The git part of a launch, from what ``<project>/.git`` is (lstat only).

    None: the runner runs no git on the project (there is none, or the
    ``.git`` there may be an agent's and the user has not said it is theirs).
    """
    user_git = project / ".git"
    try:
        info = user_git.lstat()
    except FileNotFoundError:
        if worktree:
            raise ValueError(f"--worktree needs a git repository; {project} has no .git") from None
        return None
    if not trust_git and git_untrusted(state_home, project):
        if worktree:
            raise ValueError(f"--worktree: {untrusted_git_line(project)}")
        return None
    if stat.S_ISREG(info.st_mode):
        if worktree:
            raise ValueError(
                f"--worktree: {project} is itself a linked worktree or submodule "
                "(.git is a file); run it from the main checkout"
            )
        run_dir = project_dir(state_home, project) / instance_id
        return GitPlan(
            mode="gitfile",
            name=instance_id,
            project=project,
            user_git=user_git,
            run_dir=run_dir,
            share_root=project,
            binds=(("--ro-bind", user_git, user_git),),
        )
    if not stat.S_ISDIR(info.st_mode):
        raise ValueError(f"{user_git} is neither a directory nor a file; refusing to share it")
    name = check_name(worktree) if worktree else instance_id
    run_dir = project_dir(state_home, project) / name
    share_root = run_dir / "tree" if worktree else project
    agent_git = run_dir / "git"
    return GitPlan(
        mode="worktree" if worktree else "shared",
        name=name,
        project=project,
        user_git=user_git,
        run_dir=run_dir,
        share_root=share_root,
        binds=(
            ("--bind", agent_git, share_root / ".git"),
            ("--ro-bind", user_git / "objects", share_root / ".git" / USER_OBJECTS),
        ),
    )


def untrusted_git_line(project: Path) -> str:
    return (
        f"{project}/.git appeared after an agent could write the project, so it may be the "
        "agent's: the runner runs no git on it (no agent branch, nothing imported). If it is "
        "yours, check its config, hooks/, info/ and objects/info/alternates, then run with "
        "--trust-git"
    )


def enclosing_repo(project: Path) -> Path | None:
    """The nearest parent with a ``.git`` (WORK_DIR is a subdirectory of a repository)."""
    for parent in project.parents:
        if (parent / ".git").exists():
            return parent
    return None


def with_submodules(plan: GitPlan, environ: Mapping[str, str]) -> GitPlan:
    """Your submodules, pinned so the guest cannot plant a git directory in one.

    Your ``git status`` runs git inside every populated submodule, following
    that submodule's ``.git``; written by the guest, it could name a git
    directory with the guest's configuration.  So each submodule's ``.git``
    is read-only, an unpopulated submodule's directory is read-only (no
    ``.git`` can appear in it), and the submodule directory and every
    directory above it are mounts of themselves: a mount point cannot be
    renamed or removed, so none can be moved aside and replaced.  The paths
    come from your index, which the guest cannot write.  Only the shared mode
    shows your submodules (a --worktree checkout has none).
    """
    if plan.mode != "shared":
        return plan
    listed = user_git(plan.project, ["ls-files", "--stage", "-z"], environ, check=False)
    if listed.returncode != 0:
        return plan  # not a repository git can read: your git won't enter submodules either
    pinned: set[Path] = set()
    masks: list[tuple[str, Path, Path]] = []
    missing: list[Path] = []
    for entry in listed.stdout.split("\0"):
        meta, _, path = entry.partition("\t")
        if not meta.startswith("160000 ") or not path:
            continue
        submodule = plan.project / path
        if submodule == plan.project or plan.project not in submodule.parents:
            continue
        pinned.update(p for p in submodule.parents if plan.project in p.parents)
        dot_git = submodule / ".git"
        try:
            info = dot_git.lstat()
        except (FileNotFoundError, NotADirectoryError):
            # Not populated: git keeps an empty directory there.
            if not submodule.is_dir():
                missing.append(submodule)
            masks.append(("--ro-bind", submodule, submodule))
            continue
        if not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)):
            raise GitError(f"{dot_git} is neither a file nor a directory; refusing to share it")
        pinned.add(submodule)
        masks.append(("--ro-bind", dot_git, dot_git))
    # Outer directories first: each later mount lands inside the earlier ones.
    pins = [("--bind", p, p) for p in sorted(pinned, key=lambda p: (len(p.parts), p))]
    return replace(plan, binds=plan.binds + tuple(pins) + tuple(masks), make_dirs=tuple(missing))


def make_dirs(plan: GitPlan) -> None:
    """Create unpopulated submodules' missing directories (as git checkout does).

    Component by component without following a symlink: the project is the
    guest's writing.
    """
    for target in plan.make_dirs:
        current = plan.project
        for part in target.relative_to(plan.project).parts:
            current = current / part
            try:
                info = current.lstat()
            except FileNotFoundError:
                current.mkdir(mode=0o755)
                continue
            if not stat.S_ISDIR(info.st_mode):
                raise GitError(f"submodule path {current} is not a directory; refusing to share it")


# -- host git, hardened ---------------------------------------------------------------

# Every host git call: no hooks, no fsmonitor, no transport but local files,
# and objects checked as they arrive.  The user's own config still applies
# to the user's repository (the guest can no longer write it).
HARDENING = (
    "-c", "core.hooksPath=/dev/null",
    "-c", "core.alternateRefsCommand=",
    "-c", "core.fsmonitor=false",
    "-c", "protocol.allow=never",
    "-c", "protocol.ext.allow=never",
    "-c", "protocol.file.allow=always",
    "-c", "transfer.fsckObjects=true",
    "-c", "uploadpack.packObjectsHook=",
)  # fmt: skip


def git_env(
    environ: Mapping[str, str], *, isolated: bool = False, lfs_offline: bool = False
) -> dict[str, str]:
    """The environment for host git: no GIT_* from the caller steers it.

    isolated: the runner's scratch repository: no system or global config.
    lfs_offline: a checkout of the agent's commits (land): git-lfs's smudge
    filter, where the user has it, downloads nothing.  The server it would
    ask is the one a committed ``.lfsconfig`` names (the agent's writing), and
    the request leaves from the host, outside the VM's allowlist, with object
    ids the agent chose: a channel out for whatever the agent read.
    """
    # No API keys either (every flavor's is a *_API_KEY): a program a
    # repository's config names (a filter, a hook) must not read them.
    env = {
        k: v for k, v in environ.items() if not k.startswith("GIT_") and not k.endswith("_API_KEY")
    }
    env["GIT_TERMINAL_PROMPT"] = "0"
    # Above any repository's own protocol.<name>.allow: only local files.
    env["GIT_ALLOW_PROTOCOL"] = "file"
    # No lazy fetch from a promisor remote a repository names (git >= 2.44).
    env["GIT_NO_LAZY_FETCH"] = "1"
    env["GIT_ASKPASS"] = "true"
    if lfs_offline:
        # LFS files stay pointers; `git lfs checkout` fills them from the local store.
        env["GIT_LFS_SKIP_SMUDGE"] = "1"
    if isolated:
        env["GIT_CONFIG_NOSYSTEM"] = "1"
        env["GIT_CONFIG_GLOBAL"] = "/dev/null"
    return env


def git(
    args: list[str],
    environ: Mapping[str, str],
    *,
    isolated: bool = False,
    check: bool = True,
    index_file: Path | None = None,
    lfs_offline: bool = False,
) -> process.Completed:
    from microvm_run import process  # noqa: PLC0415 - keeps --dry-run's imports small

    env = git_env(environ, isolated=isolated, lfs_offline=lfs_offline)
    if index_file is not None:
        env["GIT_INDEX_FILE"] = str(index_file)
    try:
        result = process.run(["git", *HARDENING, *args], env=env, timeout=GIT_TIMEOUT_S)
    except process.ProcessError as err:
        raise GitError(str(err)) from None
    if check and result.returncode != 0:
        raise GitError(
            f"git {args[2] if args[:1] == ['-C'] else args[0]}: {last_line(result.stderr)}"
        )
    return result


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def user_git(
    project: Path,
    args: list[str],
    environ: Mapping[str, str],
    *,
    check: bool = True,
    lfs_offline: bool = False,
) -> process.Completed:
    return git(["-C", str(project), *args], environ, check=check, lfs_offline=lfs_offline)


def rev(project: Path, what: str, environ: Mapping[str, str]) -> str | None:
    result = user_git(
        project, ["rev-parse", "--verify", "-q", what + "^{commit}"], environ, check=False
    )
    value = result.stdout.strip()
    return value if result.returncode == 0 and HEX.fullmatch(value) else None


def write_meta(run_dir: Path, meta: Meta) -> None:
    write_atomic(run_dir / "meta.json", meta.to_json().encode())


def read_meta(run_dir: Path) -> Meta:
    try:
        import json  # noqa: PLC0415 - keeps --dry-run's imports small

        data = json.loads((run_dir / "meta.json").read_text())
        return Meta(**{k: data.get(k) for k in Meta.__dataclass_fields__})
    except (OSError, ValueError, TypeError) as err:
        raise GitError(f"{run_dir}/meta.json is unreadable: {err}") from None


def count_commits(project: Path, start: str | None, ref: str, environ: Mapping[str, str]) -> int:
    spec = [ref, f"^{start}"] if start else [ref]
    result = user_git(project, ["rev-list", "--count", *spec, "--"], environ, check=False)
    return int(result.stdout.strip()) if result.stdout.strip().isdigit() else 0
