"""Before a run: the agent's git directory, made by the host (docs/git.md).

Host git runs here only in the user's repository (trusted: the guest
cannot reach it) and to check out a --worktree; the agent's directory is
written as plain files.  A reused worktree's directory is the guest's
writing: only the runner's own pieces (the alternates, the mount point of
the user's objects) are put back.
"""

from __future__ import annotations

import contextlib
import stat
from collections.abc import Mapping
from pathlib import Path

from microvm_run import safefs
from microvm_run.agentgit import (
    HEX,
    USER_OBJECTS,
    GitError,
    GitPlan,
    Meta,
    git,
    last_line,
    read_meta,
    rev,
    user_git,
    write_meta,
)
from microvm_run.atomic import make_private_dir


def prepare(plan: GitPlan, environ: Mapping[str, str], created: str) -> Meta | None:
    """Create (or, for a worktree, refresh) the agent's git directory."""
    if plan.mode == "gitfile":
        return None
    make_private_dir(plan.run_dir.parent)
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
            # mode only, or the first `git status` re-hashes every file
            # (bench/git_status measures both).
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
            HEX.fullmatch(sha)
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
    of git on purpose (an ``.env``, say).  The excludes file is taken from
    your global configuration only, never the repository's, and both are
    read as regular files with a bound: no symlink, FIFO or device.
    """
    configured = git(
        ["config", "--global", "--path", "--get", "core.excludesFile"], environ, check=False
    ).stdout.strip()
    if configured:
        global_file = Path(configured)
    else:
        # Where git itself looks (any non-empty XDG_CONFIG_HOME), not the
        # runner's own config_home (absolute values only).
        xdg = environ.get("XDG_CONFIG_HOME") or str(Path(environ.get("HOME", "/")) / ".config")
        global_file = Path(xdg) / "git" / "ignore"
    parts = []
    for source, text in (
        (plan.user_git / "info" / "exclude", _read_exclude(plan.user_git, "info/exclude")),
        (global_file, _read_exclude(global_file.parent, global_file.name)),
    ):
        if text is not None:
            parts.append(f"# from {source} (copied by microvm-run)\n{text.rstrip()}\n")
    info = plan.agent_git / "info"
    info.mkdir(exist_ok=True)
    (info / "exclude").write_text("".join(parts))


def _read_exclude(directory: Path, relative: str) -> str | None:
    try:
        with safefs.opened_dir(directory) as fd:
            data = safefs.read_regular(fd, relative, MAX_EXCLUDES)
    except OSError:
        return None
    return None if data is None else data.decode(errors="replace")


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
        # Iterative, no symlink followed: the guest sets the depth and the modes.
        from microvm_run.ops import remove_tree  # noqa: PLC0415 - keeps --dry-run's imports small

        error = remove_tree(path)
        if error:
            raise GitError(f"cannot remove what the agent left at {safefs.shown(path)}: {error}")
    else:
        path.unlink()
