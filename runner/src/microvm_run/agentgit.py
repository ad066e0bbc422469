"""The agent's own git directory: planned, prepared before a run, imported after.

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
import os
import re
import stat
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from microvm_run import home

if TYPE_CHECKING:
    from microvm_run import process

# Guest-written files are read with bounds: refs are one line, packed-refs
# is a list, objects are copied up to a total.
MAX_REF_FILE = 4096
MAX_PACKED_REFS = 8 * 1024 * 1024
MAX_IMPORT_BYTES = 2 * 1024 * 1024 * 1024
MAX_IMPORT_FILES = 200_000
GIT_TIMEOUT_S = 300
# --worktree NAME: one ref component, no git ref syntax surprises.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_HEX = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
# Branch names the import accepts from the guest (subset of git's rules).
_REFNAME = re.compile(r"refs/heads/[A-Za-z0-9._/-]{1,200}")
_MODES = ("shared", "worktree", "gitfile")
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


def plan_git(
    project: Path, state_home: Path, *, worktree: str | None, instance_id: str
) -> GitPlan | None:
    """The git part of a launch, from what ``<project>/.git`` is (lstat only)."""
    user_git = project / ".git"
    try:
        info = user_git.lstat()
    except FileNotFoundError:
        if worktree:
            raise ValueError(f"--worktree needs a git repository; {project} has no .git") from None
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
    "-c", "core.fsmonitor=false",
    "-c", "protocol.allow=never",
    "-c", "protocol.file.allow=always",
    "-c", "transfer.fsckObjects=true",
    "-c", "uploadpack.packObjectsHook=",
)  # fmt: skip


def git_env(environ: Mapping[str, str], *, isolated: bool = False) -> dict[str, str]:
    """The environment for host git: no GIT_* from the caller steers it.

    isolated: the runner's scratch repository: no system or global config.
    """
    env = {k: v for k, v in environ.items() if not k.startswith("GIT_")}
    env["GIT_TERMINAL_PROMPT"] = "0"
    env["GIT_ASKPASS"] = "true"
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
) -> process.Completed:
    from microvm_run import process  # noqa: PLC0415 - keeps --dry-run's imports small

    env = git_env(environ, isolated=isolated)
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
    project: Path, args: list[str], environ: Mapping[str, str], **kw: bool
) -> process.Completed:
    return git(["-C", str(project), *args], environ, **kw)


def rev(project: Path, what: str, environ: Mapping[str, str]) -> str | None:
    result = user_git(
        project, ["rev-parse", "--verify", "-q", what + "^{commit}"], environ, check=False
    )
    value = result.stdout.strip()
    return value if result.returncode == 0 and _HEX.fullmatch(value) else None


# -- before the run --------------------------------------------------------------------


def prepare(plan: GitPlan, environ: Mapping[str, str], created: str) -> Meta | None:
    """Create (or, for a worktree, refresh) the agent's git directory."""
    if plan.mode == "gitfile":
        return None
    plan.run_dir.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fresh = not plan.agent_git.exists()
    if plan.mode == "shared" and not fresh:
        raise GitError(f"{plan.agent_git} already exists")
    if fresh:
        meta = _create(plan, environ, created)
    else:
        meta = read_meta(plan.run_dir)
        _refresh(plan)
    if plan.mode == "worktree":
        # The mount point for the agent's .git: an empty directory on the host.
        mount_point = plan.share_root / ".git"
        _replace_with_dir(mount_point)
    return meta


def _create(plan: GitPlan, environ: Mapping[str, str], created: str) -> Meta:
    project = plan.project
    branch_ref = user_git(
        project, ["symbolic-ref", "-q", "HEAD"], environ, check=False
    ).stdout.strip()
    branch = (
        branch_ref.removeprefix("refs/heads/") if branch_ref.startswith("refs/heads/") else None
    )
    start = rev(project, "HEAD", environ)
    object_format = user_git(project, ["rev-parse", "--show-object-format"], environ, check=False)
    plan.run_dir.mkdir(mode=0o700, exist_ok=True)
    agent = plan.agent_git
    for sub in ("objects/info", "objects/pack", "refs/heads", "refs/tags", USER_OBJECTS):
        (agent / sub).mkdir(parents=True, exist_ok=True)
    _write_config(plan, environ, object_format.stdout.strip() or "sha1")
    (agent / "objects" / "info" / "alternates").write_text(f"../{USER_OBJECTS}\n")
    (agent / "packed-refs").write_text(_packed_refs(project, environ))
    _write_excludes(plan, environ)
    agent_branch = plan.branch if plan.mode == "worktree" else branch
    if agent_branch:
        (agent / "HEAD").write_text(f"ref: refs/heads/{agent_branch}\n")
        if start:
            ref_file = agent / "refs" / "heads" / agent_branch
            ref_file.parent.mkdir(parents=True, exist_ok=True)
            ref_file.write_text(start + "\n")
    else:
        (agent / "HEAD").write_text(f"{start}\n" if start else "ref: refs/heads/main\n")
    if plan.mode == "worktree":
        _checkout_tree(plan, environ, start)
    else:
        _copy_index(plan)
    meta = Meta(
        project=str(project),
        mode=plan.mode,
        name=plan.name,
        branch=branch,
        start=start,
        created=created,
    )
    write_meta(plan.run_dir, meta)
    return meta


def _write_config(plan: GitPlan, environ: Mapping[str, str], object_format: str) -> None:
    (plan.agent_git / "config").write_text(
        config_text(object_format, _identity(plan.project, environ))
    )


def _identity(project: Path, environ: Mapping[str, str]) -> dict[str, str]:
    """The host user's user.name and user.email, as git resolves them in the project."""
    found = user_git(
        project, ["config", "-z", "--get-regexp", r"^user\.(name|email)$"], environ, check=False
    ).stdout
    identity = {}
    for entry in found.split("\0"):
        key, _, value = entry.partition("\n")
        if key in ("user.name", "user.email") and value:
            identity[key.removeprefix("user.")] = value  # the last one wins, as in git
    return identity


def config_text(object_format: str, identity: Mapping[str, str]) -> str:
    """The agent's git config, written once by the host (no git process)."""
    sections: dict[str, dict[str, str]] = {
        "core": {
            "repositoryformatversion": "1" if object_format != "sha1" else "0",
            "bare": "false",
            "logallrefupdates": "true",
            # The guest sees other inode numbers, owners and ctimes than the
            # host wrote into the index: compare size, whole-second mtime and
            # mode only, or the first `git status` re-hashes every file (#22).
            "checkStat": "minimal",
            "trustCtime": "false",
        }
    }
    if object_format != "sha1":
        sections["extensions"] = {"objectFormat": object_format}
    # The host user's identity, by value: the guest has no other config.
    if identity:
        sections["user"] = dict(identity)
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        # Only the identity is free text; the runner's own values are plain words.
        quote = _config_value if section == "user" else str
        lines += [f"\t{key} = {quote(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


def _config_value(value: str) -> str:
    """A git config value in quotes: backslash, quote, newline and tab escaped."""
    for raw, escaped in (("\\", "\\\\"), ('"', '\\"'), ("\n", "\\n"), ("\t", "\\t")):
        value = value.replace(raw, escaped)
    return f'"{value}"'


def _packed_refs(project: Path, environ: Mapping[str, str]) -> str:
    """The user's branches and tags, so the agent can log and diff against them."""
    out = user_git(
        project,
        ["for-each-ref", "--format=%(objectname) %(refname)", "refs/heads", "refs/tags"],
        environ,
    ).stdout
    lines = ["# pack-refs with: peeled fully-peeled sorted "]
    for line in sorted(out.splitlines(), key=lambda entry: entry.partition(" ")[2]):
        sha, _, ref = line.partition(" ")
        if (
            _HEX.fullmatch(sha)
            and ref.startswith("refs/")
            and not ref.startswith("refs/heads/agent/")
        ):
            lines.append(f"{sha} {ref}")
    return "\n".join(lines) + "\n"


MAX_EXCLUDES = 1024 * 1024


def _write_excludes(plan: GitPlan, environ: Mapping[str, str]) -> None:
    """Your ignore rules that live outside the tree, so the agent ignores what you do.

    ``.git/info/exclude`` and your global excludes file are invisible to the
    guest; without them `git add -A` there would pick up files you keep out
    of git on purpose (an ``.env``, say).
    """
    configured = user_git(
        plan.project, ["config", "--path", "--get", "core.excludesFile"], environ, check=False
    ).stdout.strip()
    if configured:
        global_file = Path(configured)
    else:
        xdg = environ.get("XDG_CONFIG_HOME") or str(Path(environ.get("HOME", "/")) / ".config")
        global_file = Path(xdg) / "git" / "ignore"
    parts = []
    for source in (plan.user_git / "info" / "exclude", global_file):
        try:
            with source.open("rb") as handle:
                text = handle.read(MAX_EXCLUDES).decode(errors="replace")
        except OSError:
            continue
        parts.append(f"# from {source} (copied by microvm-run)\n{text.rstrip()}\n")
    info = plan.agent_git / "info"
    info.mkdir(exist_ok=True)
    (info / "exclude").write_text("".join(parts))


def _copy_index(plan: GitPlan) -> None:
    """Start from the user's index (same mtimes and sizes: nothing to re-hash)."""
    import shutil  # noqa: PLC0415 - keeps --dry-run's imports small

    source = plan.user_git / "index"
    if source.is_file() and not source.is_symlink():
        shutil.copy2(source, plan.agent_git / "index")
    for shared in plan.user_git.glob("sharedindex.*"):  # core.splitIndex
        if shared.is_file() and not shared.is_symlink():
            shutil.copy2(shared, plan.agent_git / shared.name)


def _checkout_tree(plan: GitPlan, environ: Mapping[str, str], start: str | None) -> None:
    tree = plan.share_root
    tree.mkdir(mode=0o700, exist_ok=True)
    if start is None:
        return
    # The user's repository writes the files (its own filters, as a checkout
    # would); the index goes to the agent's git dir, never the user's.
    result = git(
        [f"--git-dir={plan.user_git}", f"--work-tree={tree}", "read-tree", "--reset", "-u", start],
        environ,
        check=False,
        index_file=plan.agent_git / "index",
    )
    if result.returncode != 0:
        raise GitError(f"checking out the worktree: {last_line(result.stderr)}")
    # The user's side gets the branch too, so review and land find it.
    user_git(
        plan.project, ["update-ref", f"refs/heads/{plan.branch}", start, ""], environ, check=False
    )


def _refresh(plan: GitPlan) -> None:
    """A reused worktree: the runner's own pieces are put back as they must be."""
    agent = plan.agent_git
    _replace_with_dir(agent / USER_OBJECTS)
    info = agent / "objects" / "info"
    _replace_with_dir(agent / "objects")
    _replace_with_dir(info)
    alternates = info / "alternates"
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISREG(alternates.lstat().st_mode):
            _remove(alternates)  # a symlink, FIFO or directory the guest left
    alternates.write_text(f"../{USER_OBJECTS}\n")


def _replace_with_dir(path: Path) -> None:
    """Make ``path`` a real directory (the guest may have left a symlink or file)."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        path.mkdir(mode=0o755)
        return
    if stat.S_ISDIR(info.st_mode):
        return
    _remove(path)
    path.mkdir(mode=0o755)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        import shutil  # noqa: PLC0415 - keeps --dry-run's imports small

        shutil.rmtree(path)
    else:
        path.unlink()


def write_meta(run_dir: Path, meta: Meta) -> None:
    tmp = run_dir / "meta.json.tmp"
    tmp.write_text(meta.to_json())
    tmp.replace(run_dir / "meta.json")


def read_meta(run_dir: Path) -> Meta:
    try:
        import json  # noqa: PLC0415 - keeps --dry-run's imports small

        data = json.loads((run_dir / "meta.json").read_text())
        return Meta(**{k: data.get(k) for k in Meta.__dataclass_fields__})
    except (OSError, ValueError, TypeError) as err:
        raise GitError(f"{run_dir}/meta.json is unreadable: {err}") from None


# -- reading what the guest wrote, without git -----------------------------------------


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
            if _HEX.fullmatch(text):
                return text
            ref = text.removeprefix("ref: ").strip()
            if not text.startswith("ref: ") or not _REFNAME.fullmatch(ref) or ".." in ref:
                return None
            loose = _read_at(root, ref.split("/"), MAX_REF_FILE)
            if loose is not None:
                value = loose.decode(errors="replace").strip()
                return value if _HEX.fullmatch(value) else None
            packed = _read_at(root, ["packed-refs"], MAX_PACKED_REFS)
            for line in (packed or b"").decode(errors="replace").splitlines():
                sha, _, name = line.partition(" ")
                if name == ref and _HEX.fullmatch(sha):
                    return sha
    except OSError:
        return None
    return None


def _copy_objects(agent_git: Path, target_objects: Path) -> None:
    """The agent's own objects as plain files (loose ones and packs), bounded."""
    budget = _Budget()
    with _opendir(agent_git) as root, _opendir(Path("objects"), root) as objects:
        for entry in sorted(os.listdir(objects)):
            if re.fullmatch(r"[0-9a-f]{2}", entry):
                wanted = re.compile(r"[0-9a-f]{38}|[0-9a-f]{62}")
            elif entry == "pack":
                wanted = re.compile(r"pack-[0-9a-f]{40,64}\.(pack|idx)")
            else:
                continue  # info/ (the guest's alternates) and anything else: never read
            try:
                with _opendir(Path(entry), objects) as folder:
                    for name in sorted(os.listdir(folder)):
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


# -- after the run -----------------------------------------------------------------------


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


def count_commits(project: Path, start: str | None, ref: str, environ: Mapping[str, str]) -> int:
    spec = [ref, f"^{start}"] if start else [ref]
    result = user_git(project, ["rev-list", "--count", *spec, "--"], environ, check=False)
    return int(result.stdout.strip()) if result.stdout.strip().isdigit() else 0


def finish_shared(plan: GitPlan, imported: Imported) -> None:
    """A shared run's git dir goes once imported: its commits are in the user's repo.

    Its meta.json stays while there are commits to land (review and land read it).
    """
    if plan.mode != "shared":
        return
    import shutil  # noqa: PLC0415 - keeps --dry-run's imports small

    shutil.rmtree(plan.run_dir if imported.commits == 0 else plan.agent_git, ignore_errors=True)


def summary(imported: Imported) -> str:
    if imported.commits == 0:
        return "the agent made no commits"
    plural = "s" if imported.commits != 1 else ""
    name = imported.branch.removeprefix(AGENT_PREFIX)
    return f"{imported.commits} commit{plural} on {imported.branch}; microvm-run review {name}"


def mode_names() -> tuple[str, ...]:
    return _MODES
