"""The agent's commits on the host: around a run, ``review``, ``land``, pruning.

cli.main hands argv here when its first word is ``review`` or ``land``;
the launch path calls before_run/after_run.  agentgit.py holds the git
mechanics; this module decides and prints.

Exit statuses of review and land: 0 done (or nothing to do), 1 refused
(the user's branch moved, local changes in the way, nothing imported),
2 bad input (not a git project, unknown run).
"""

from __future__ import annotations

import argparse
import fcntl
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from microvm_run import agentgit, gitimport, gitprepare, process, safefs, state, usage
from microvm_run.agentgit import GitError, GitPlan, Meta
from microvm_run.atomic import make_private_dir
from microvm_run.contract import EXIT_BAD_INPUT
from microvm_run.ops import remove_tree  # iterative: the guest sets the depth

__all__ = ["GitError", "after_run", "before_run", "main", "prune"]

EXIT_REFUSED = 1


# -- around a run -------------------------------------------------------------------------


@dataclass
class Session:
    """A run's git: what it started from, and the lock that keeps it to one run."""

    plan: GitPlan
    meta: Meta
    lock_fd: int


def before_run(
    plan: GitPlan | None,
    environ: Mapping[str, str],
    *,
    project: Path | None = None,
    trust_git: bool = False,
) -> Session | None:
    if plan is None:
        if project is None:
            return None
        enclosing = agentgit.enclosing_repo(project)
        if (project / ".git").exists():
            process.log(agentgit.untrusted_git_line(project))
        elif enclosing is not None:
            process.log(
                f"{project} is inside the git repository {enclosing}, which the guest does "
                "not see: the agent has no git here (run from the repository's top level)"
            )
        # Whatever .git the agent leaves here is the agent's from now on.
        mark_run(environ, project, git_hidden=False)
        return None
    if plan.mode == "gitfile":
        process.log(
            f"{plan.user_git} is a file (a linked worktree or submodule): the guest sees it "
            "read-only and gets no git; run from the main checkout, or use --worktree NAME there"
        )
        mark_run(environ, plan.project, git_hidden=True)
        return None
    if agentgit.git_untrusted(_state_home(environ), plan.project):
        if not trust_git:
            # Marked since it was planned (a VM above it started meanwhile).
            process.log(agentgit.untrusted_git_line(plan.project))
            mark_run(environ, plan.project, git_hidden=True)
            return None
        agentgit.trust(_state_home(environ), plan.project)
    mark_run(environ, plan.project, git_hidden=True)
    try:
        agentgit.make_dirs(plan)
        make_private_dir(plan.run_dir.parent)
        plan.run_dir.mkdir(mode=0o700, exist_ok=plan.mode == "worktree")
    except OSError as err:
        raise GitError(f"cannot create {err.filename}: {err.strerror}") from None
    lock_fd = os.open(plan.run_dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock_fd)
        raise GitError(f"worktree {plan.name} is in use by another run") from None
    try:
        meta = gitprepare.prepare(plan, environ, state.now_utc())
    except (GitError, OSError) as err:
        os.close(lock_fd)
        if plan.mode == "shared":
            remove_tree(plan.run_dir)
        raise GitError(f"preparing the agent's git: {err}") from None
    assert meta is not None
    return Session(plan, meta, lock_fd)


def after_run(session: Session | None, environ: Mapping[str, str]) -> gitimport.Imported | None:
    """Import the agent's commits and say so in one line; never raises.

    Returns what was imported (None: no git, or the import failed).
    """
    if session is None:
        return None
    plan = session.plan
    if agentgit.git_untrusted(_state_home(environ), plan.project):
        # Another VM, on a directory above the project, started meanwhile:
        # its agent could have written the .git this import would run in.
        os.close(session.lock_fd)
        process.log(f"{agentgit.untrusted_git_line(plan.project)} (kept in {plan.agent_git})")
        return None
    try:
        imported = gitimport.import_commits(plan, session.meta, environ)
        if imported.head is not None:
            agentgit.write_meta(plan.run_dir, replace(session.meta, imported=imported.head))
    except (GitError, OSError) as err:
        process.log(f"importing the agent's commits failed: {err} (kept in {plan.agent_git})")
        return None
    finally:
        os.close(session.lock_fd)
    process.log(gitimport.summary(imported))
    gitimport.finish_shared(plan, imported)
    return imported


# -- review and land ---------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = usage.Parser(prog="microvm-run", description="Review and land the agent's commits.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    review = commands.add_parser(
        "review", help="list the agent's runs, or show one's log, diff stat and diff"
    )
    review.add_argument("name", nargs="?", metavar="NAME|ID", help="worktree name or instance id")
    review.add_argument("--stat", action="store_true", help="log and diff stat only")
    review.add_argument("--work-dir", help="project directory (default: $WORK_DIR or .)")
    land = commands.add_parser("land", help="put the agent's commits onto its starting branch")
    land.add_argument("name", metavar="NAME|ID", help="worktree name or instance id")
    land.add_argument(
        "--merge",
        action="store_true",
        help="when your branch moved: merge (needs a --worktree run and that branch checked out)",
    )
    land.add_argument("--work-dir", help="project directory (default: $WORK_DIR or .)")
    return parser


def main(argv: Sequence[str], environ: Mapping[str, str]) -> int:
    try:
        args = _parser().parse_args(list(argv))
    except usage.UsageError as err:
        return usage.bad_input(str(err))
    except SystemExit as done:  # --help
        return done.code if isinstance(done.code, int) else 0
    try:
        project = _project(args.work_dir, environ)
        if args.command == "review":
            if args.name is None:
                return _list(project, environ)
            return _review(
                project, _find(project, args.name, environ), environ, stat_only=args.stat
            )
        return _land(project, _find(project, args.name, environ), environ, merge=args.merge)
    except _Refused as err:
        return _fail(str(err), EXIT_REFUSED)
    except (GitError, ValueError, OSError) as err:
        return _fail(str(err), EXIT_BAD_INPUT)


class _Refused(Exception):
    pass


def _fail(message: str, code: int) -> int:
    print(f"microvm-run: {message}", file=sys.stderr)
    return code


def _project(raw: str | None, environ: Mapping[str, str]) -> Path:
    path = Path(raw or environ.get("WORK_DIR") or os.getcwd()).expanduser().resolve()
    if not (path / ".git").is_dir():
        raise ValueError(f"{path} is not the main checkout of a git repository")
    if agentgit.git_untrusted(_state_home(environ), path):
        raise ValueError(agentgit.untrusted_git_line(path))
    return path


def mark_run(environ: Mapping[str, str], project: Path, *, git_hidden: bool) -> None:
    try:
        agentgit.mark_run(_state_home(environ), project, git_hidden=git_hidden)
    except OSError as err:
        raise GitError(f"cannot record the run on {project}: {err}") from None


def _state_home(environ: Mapping[str, str]) -> Path:
    from microvm_run import host  # noqa: PLC0415

    return host.state_home(environ)


def _runs(project: Path, environ: Mapping[str, str]) -> list[tuple[Path, Meta]]:
    base = agentgit.project_dir(_state_home(environ), project)
    found = []
    if base.is_dir():
        for run_dir in sorted(base.iterdir()):
            if (run_dir / "meta.json").is_file():
                try:
                    meta = agentgit.read_meta(run_dir)
                except GitError:
                    continue
                found.append((run_dir, _import_pending(project, run_dir, meta, environ)))
    return found


def _import_pending(project: Path, run_dir: Path, meta: Meta, environ: Mapping[str, str]) -> Meta:
    """A run whose runner died before importing (SIGKILL, power loss): import now.

    Only when no run holds it; a worktree whose HEAD did not move costs one read.
    """
    plan = agentgit.plan_git(
        project,
        _state_home(environ),
        worktree=meta.name if meta.mode == "worktree" else None,
        instance_id=meta.name,
    )
    if plan is None or plan.run_dir != run_dir or not plan.agent_git.is_dir():
        return meta
    try:
        lock_fd = os.open(run_dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        return meta
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        imported = gitimport.import_commits(plan, meta, environ)
        if imported.head is None:
            return meta
        meta = replace(meta, imported=imported.head)
        agentgit.write_meta(run_dir, meta)
        print(f"imported: {gitimport.summary(imported)}", file=sys.stderr)
        if imported.commits:
            gitimport.finish_shared(plan, imported)
        return meta
    except BlockingIOError:
        return meta  # a run is using it; it imports when it ends
    except (GitError, OSError, ValueError) as err:
        print(f"microvm-run: importing {meta.name} failed: {err}", file=sys.stderr)
        return meta
    finally:
        os.close(lock_fd)


def _find(project: Path, name: str, environ: Mapping[str, str]) -> tuple[Path, Meta]:
    runs = _runs(project, environ)
    exact = [run for run in runs if run[1].name == name]
    matches = exact or [run for run in runs if run[1].name.startswith(name)]
    if not matches:
        raise ValueError(f"no agent run {name!r} for {project} (microvm-run review lists them)")
    if len(matches) > 1:
        raise ValueError(f"{name!r} matches {len(matches)} runs; give more of it")
    return matches[0]


def _list(project: Path, environ: Mapping[str, str]) -> int:
    runs = _runs(project, environ)
    if not runs:
        print(f"no agent runs for {project}")
        return 0
    print(f"{'NAME':<20} {'MODE':<9} {'BRANCH':<28} {'COMMITS':>7}  STATUS")
    for _, meta in runs:
        branch = agentgit.AGENT_PREFIX + meta.name
        tip = agentgit.rev(project, f"refs/heads/{branch}", environ)
        base = meta.landed or meta.start
        count = agentgit.count_commits(project, base, f"refs/heads/{branch}", environ) if tip else 0
        status = _status(project, meta, tip, environ)
        print(f"{meta.name:<20} {meta.mode:<9} {branch:<28} {count:>7}  {status}")
    return 0


def _status(project: Path, meta: Meta, tip: str | None, environ: Mapping[str, str]) -> str:
    if tip is None:
        return "no commits imported"
    if meta.branch and _is_ancestor(project, tip, f"refs/heads/{meta.branch}", environ):
        return f"landed on {meta.branch}"
    return f"not landed (from {meta.branch or 'detached HEAD'})"


def _is_ancestor(project: Path, commit: str, ref: str, environ: Mapping[str, str]) -> bool:
    result = agentgit.user_git(
        project, ["merge-base", "--is-ancestor", commit, ref], environ, check=False
    )
    return result.returncode == 0


def _review(
    project: Path, run: tuple[Path, Meta], environ: Mapping[str, str], *, stat_only: bool
) -> int:
    run_dir, meta = run
    branch = agentgit.AGENT_PREFIX + meta.name
    tip = agentgit.rev(project, f"refs/heads/{branch}", environ)
    if tip is None:
        raise _Refused(f"{branch} does not exist: the agent made no commits that were imported")
    base = meta.landed or meta.start
    spec = f"{base}..{tip}" if base else tip
    log = agentgit.user_git(
        project, ["log", "--no-color", "--format=%h %an: %s", spec, "--"], environ
    )
    print(f"{branch} (from {meta.branch or 'detached HEAD'} at {(base or 'root')[:12]}):")
    if meta.mode == "worktree":
        print(f"  working tree {run_dir / 'tree'}")
    # Subjects and names are the agent's: no escape sequence reaches the terminal.
    shown = [safefs.shown(line) for line in log.stdout.rstrip().splitlines()]
    print("\n".join(shown) or "  no commits beyond the start")
    for link in new_gitlinks(project, base, tip, environ):
        print(
            f"  warning: adds a nested repository (gitlink) at {safefs.shown(link)}: "
            "land refuses it"
        )
    if base:
        stat = agentgit.user_git(
            project, ["diff", "--no-color", "--stat", base, tip, "--"], environ
        )
        print("\n".join(safefs.shown(line) for line in stat.stdout.rstrip().splitlines()))
    if stat_only or not base:
        return 0
    sys.stdout.flush()
    # The full diff through the user's own pager (their config, their
    # terminal); the hardening still keeps hooks and fsmonitor off.
    child = process.spawn(
        ["git", *agentgit.HARDENING, "-C", str(project), "diff", base, tip, "--"],
        env=agentgit.git_env(environ),
        die_with_parent=False,
    )
    code = child.wait()
    child.close()
    return 0 if code == 0 else EXIT_BAD_INPUT


def _land(project: Path, run: tuple[Path, Meta], environ: Mapping[str, str], *, merge: bool) -> int:
    run_dir, meta = run
    branch = agentgit.AGENT_PREFIX + meta.name
    tip = agentgit.rev(project, f"refs/heads/{branch}", environ)
    if tip is None:
        raise _Refused(f"{branch} does not exist: nothing to land")
    if not meta.branch:
        raise _Refused(f"the agent started on a detached HEAD: merge {branch} yourself")
    target = f"refs/heads/{meta.branch}"
    base = meta.landed or meta.start
    now = agentgit.rev(project, target, environ)
    if now is not None and _is_ancestor(project, tip, target, environ):
        print(f"{branch} is already on {meta.branch}")
        return 0
    links = new_gitlinks(project, base, tip, environ)
    if links:
        # Your git would enter each as a repository (`git status` recurses
        # into it), with the configuration the agent wrote there.
        raise _Refused(
            f"{branch} adds a nested repository (gitlink) at {safefs.shown(links[0])}: land "
            "refuses it, since your git would then run that repository's configuration; "
            "add submodules yourself"
        )
    head = agentgit.user_git(project, ["symbolic-ref", "-q", "HEAD"], environ, check=False)
    checked_out = head.stdout.strip() == target
    if now != base:
        if not merge:
            raise _Refused(
                f"{meta.branch} moved since the agent started ({(base or 'unborn')[:12]} -> "
                f"{(now or 'gone')[:12]}): rebase {branch} onto it, or land --merge"
            )
        _merge(project, meta, branch=branch, tip=tip, checked_out=checked_out, environ=environ)
        how = "merged"
    else:
        _fast_forward(
            project, meta, target=target, tip=tip, now=now, checked_out=checked_out, environ=environ
        )
        how = "fast-forward"
    count = agentgit.count_commits(project, base, tip, environ)
    agentgit.write_meta(run_dir, replace(meta, landed=tip))
    plural = "s" if count != 1 else ""
    print(f"landed {count} commit{plural} of {branch} on {meta.branch} ({how})")
    return 0


def new_gitlinks(
    project: Path, base: str | None, tip: str, environ: Mapping[str, str]
) -> list[str]:
    """Paths that are gitlinks (mode 160000) at ``tip`` and were not at ``base``.

    Read from the objects only (diff-tree), never from a working tree.
    """
    what = [base, tip] if base else ["--root", tip]
    raw = agentgit.user_git(
        project, ["diff-tree", "-r", "-z", "--no-renames", "--no-commit-id", *what], environ
    ).stdout
    fields = raw.split("\0")
    found = []
    # Each entry: ":OLDMODE NEWMODE OLDSHA NEWSHA STATUS" then the path.
    for header, path in zip(fields[0::2], fields[1::2], strict=False):
        modes = header.lstrip(":").split(" ")
        if len(modes) >= 2 and modes[1] == "160000" and modes[0] != "160000":
            found.append(path)
    return found


def _fast_forward(
    project: Path,
    meta: Meta,
    *,
    target: str,
    tip: str,
    now: str | None,
    checked_out: bool,
    environ: Mapping[str, str],
) -> None:
    if checked_out and meta.mode == "worktree":
        result = agentgit.user_git(
            project, ["merge", "--ff-only", "-q", tip], environ, check=False, lfs_offline=True
        )
        if result.returncode != 0:
            raise _Refused(f"git merge --ff-only refused: {agentgit.last_line(result.stderr)}")
        return
    if checked_out:
        # A shared run: the working tree already holds the agent's files.
        # Move the branch and the index to the agent's commit and leave every
        # file as it is; staged changes of the user's would be lost, so refuse.
        staged = agentgit.user_git(project, ["diff", "--cached", "--quiet"], environ, check=False)
        if staged.returncode != 0:
            raise _Refused(
                f"you have staged changes on {meta.branch}: commit or unstage them first"
            )
    old = now or ""
    agentgit.user_git(project, ["update-ref", target, tip, old], environ)
    if checked_out:
        agentgit.user_git(project, ["reset", "-q", "--mixed", tip, "--"], environ, check=False)


def _merge(
    project: Path,
    meta: Meta,
    *,
    branch: str,
    tip: str,
    checked_out: bool,
    environ: Mapping[str, str],
) -> None:
    if meta.mode != "worktree":
        raise _Refused(
            "land --merge needs a --worktree run: this run's files are already in your working tree"
        )
    if not checked_out:
        raise _Refused(f"land --merge: check out {meta.branch} first")
    result = agentgit.user_git(
        project,
        ["merge", "--no-ff", "--no-edit", "-q", "-m", f"Merge {branch}", tip],
        environ,
        check=False,
        lfs_offline=True,
    )
    if result.returncode != 0:
        raise _Refused(f"git merge stopped: {agentgit.last_line(result.stderr or result.stdout)}")


# -- gc --prune ------------------------------------------------------------------------------


def prune(environ: Mapping[str, str], *, explicit: Sequence[str] = ()) -> list[str]:
    """Remove runs that are landed (or whose project is gone), and the named ones.

    Unlanded worktrees are kept: they hold work that exists nowhere else.
    Returns one line per removal.
    """
    root = _state_home(environ) / "microvm-run" / "git"
    removed: list[str] = []
    if not root.is_dir():
        return removed
    for project_dir in sorted(root.iterdir()):
        for run_dir in sorted(project_dir.iterdir()) if project_dir.is_dir() else ():
            try:
                meta = agentgit.read_meta(run_dir)
            except GitError:
                continue
            project = Path(meta.project)
            if agentgit.git_untrusted(_state_home(environ), project):
                # No git at all on a .git an agent may have written since.
                removed.append(
                    f"kept {meta.mode} run {meta.name}: {agentgit.untrusted_git_line(project)}"
                )
                continue
            if (project / ".git").is_dir():
                # Commits a killed runner never imported are not lost here.
                meta = _import_pending(project, run_dir, meta, environ)
            why = _prune_reason(run_dir, meta, environ, explicit)
            if why and _in_use(run_dir):
                removed.append(f"kept {meta.mode} run {meta.name}: in use by a running instance")
                continue
            if why:
                remove_tree(run_dir)
                removed.append(f"removed {meta.mode} run {meta.name} of {meta.project} ({why})")
        if project_dir.is_dir() and not any(project_dir.iterdir()):
            project_dir.rmdir()
    return removed


def _in_use(run_dir: Path) -> bool:
    try:
        fd = os.open(run_dir / "lock", os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _prune_reason(
    run_dir: Path, meta: Meta, environ: Mapping[str, str], explicit: Sequence[str]
) -> str | None:
    if meta.name in explicit:
        return "asked for"
    project = Path(meta.project)
    if not (project / ".git").is_dir():
        return "project gone"
    branch = f"refs/heads/{agentgit.AGENT_PREFIX}{meta.name}"
    tip = agentgit.rev(project, branch, environ)
    if tip is None:
        # Nothing was imported: a worktree may still hold uncommitted work,
        # and a shared run's git dir that is still there failed to import.
        keep = meta.mode == "worktree" or (run_dir / "git").exists()
        return None if keep else "no commits"
    if meta.branch and _is_ancestor(project, tip, f"refs/heads/{meta.branch}", environ):
        return f"landed on {meta.branch}"
    return None
