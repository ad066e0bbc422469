"""Git with real VMs: the user's .git out of the guest's reach, commits imported, land.

The guest acts as an attacker would: with the agent's uid it writes
fsmonitor, hooksPath, hooks, include.path, pager and aliases into whatever
.git it sees, each a command that would create a marker file on the host
if host git ever ran it.  The host then does what a careful user does.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import VM, VM_TIMEOUT_S

pytestmark = pytest.mark.integration

USER_NAME = "Host User"
USER_EMAIL = "host.user@example.org"

# Run in the guest as the agent: every route by which a .git steers git.
# $1 is the marker prefix (a host path: it only exists if the host runs it).
ATTACK = r"""
m=$1
set +e
g=/work/.git
mkdir -p /work/evilhooks "$g/hooks"
for h in pre-commit post-commit post-checkout post-merge post-rewrite reference-transaction \
         pre-auto-gc post-index-change fsmonitor-watchman; do
  printf '#!/bin/sh\ntouch %s.hook-%s\n' "$m" "$h" >"$g/hooks/$h"
  cp "$g/hooks/$h" "/work/evilhooks/$h"
  chmod +x "$g/hooks/$h" "/work/evilhooks/$h"
done
printf '[core]\n\tpager = touch %s.include-pager\n[alias]\n\tst = !touch %s.alias\n' "$m" "$m" \
  >/work/evil.cfg
cat >>"$g/config" <<EOF
[core]
	fsmonitor = touch $m.fsmonitor; false
	hooksPath = /work/evilhooks
	pager = touch $m.pager
	editor = touch $m.editor
[diff]
	external = touch $m.diff-external
[alias]
	lg = !touch $m.alias-lg
[include]
	path = /work/evil.cfg
[filter "x"]
	clean = touch $m.filter
EOF
echo '* filter=x' >"$g/info/attributes" 2>/dev/null || true
"""


def _script(text: str, *args: object) -> str:
    """A guest command that runs ``text`` with ``args`` (no quoting to get wrong)."""
    encoded = base64.b64encode(text.encode()).decode()
    words = " ".join(str(arg) for arg in args)
    return f"printf %s {encoded} | base64 -d >/tmp/s.sh && sh /tmp/s.sh {words}"


def _as_user(vm: VM, argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        vm.as_user(argv),
        env=vm.env(),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=VM_TIMEOUT_S,
        check=False,
    )


def _git(vm: VM, project: Path, *args: str) -> str:
    done = _as_user(vm, ["git", "-C", str(project), *args])
    assert done.returncode == 0, (args, done.stderr)
    return done.stdout.strip()


def _repo(vm: VM, name: str = "proj") -> Path:
    project = vm.project(name)
    _git(vm, project, "init", "-q", "-b", "main")
    _git(vm, project, "config", "user.name", USER_NAME)
    _git(vm, project, "config", "user.email", USER_EMAIL)
    (project / "app.txt").write_text("one\n")
    os.chown(project / "app.txt", vm.user.uid, vm.user.gid)
    _git(vm, project, "add", "app.txt")
    _git(vm, project, "commit", "-q", "-m", "start")
    return project


# What the import adds to the user's .git (new objects, the agent refs and
# their reflogs); everything else must stay as it was.
_IMPORTED = ("objects", "logs", "refs/heads/agent")


def _tree_digest(path: Path) -> str:
    """Names, modes and contents of the user's .git, except what the import adds."""
    digest = hashlib.sha256()
    for item in sorted(path.rglob("*")):
        name = str(item.relative_to(path))
        if any(name == top or name.startswith(top + "/") for top in _IMPORTED):
            continue
        info = item.lstat()
        digest.update(f"{item.relative_to(path)} {info.st_mode:o}\n".encode())
        if item.is_file() and not item.is_symlink():
            digest.update(item.read_bytes())
    return digest.hexdigest()


def _markers(prefix: Path) -> list[str]:
    return sorted(p.name for p in prefix.parent.iterdir() if p.name.startswith(prefix.name))


def _review(vm: VM, project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return vm.ops("review", "--work-dir", str(project), *args)


def _land(vm: VM, project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return vm.ops("land", "--work-dir", str(project), *args)


def _runs_dir(vm: VM, project: Path) -> Path:
    from microvm_run.agentgit import project_dir  # noqa: PLC0415

    return project_dir(vm.user.home / ".local" / "state", project.resolve())


def _wait_for_branches(vm: VM, wanted: set[str], running: list[subprocess.Popen[str]]) -> set[str]:
    """The agent branches `ps --json` shows, once it shows all of ``wanted``."""
    deadline = time.monotonic() + VM_TIMEOUT_S
    seen: set[str] = set()
    while time.monotonic() < deadline and not wanted <= seen:
        assert all(run.poll() is None for run in running), "an agent ended before ps saw it"
        listed = vm.ops("ps", "--json")
        assert listed.returncode == 0, listed.stderr
        seen = {row["branch"] for row in json.loads(listed.stdout)} & wanted
        time.sleep(0.5)
    return seen


def _instance_name(stderr: str) -> str:
    line = next(line for line in stderr.splitlines() if "microvm-run review" in line)
    return line.rsplit(" ", 1)[1]


def test_the_guest_cannot_steer_host_git_and_its_commits_arrive_as_agent_refs(vm: VM) -> None:
    project = _repo(vm)
    marker = project.parent / "PWNED"
    before = _tree_digest(project / ".git")
    # Git as an agent uses it: commit, diff, branch, stash, rebase.
    work = """set -e; cd /work
echo two >>app.txt; echo new >new.txt; git add -A; git commit -q -m 'agent: two'
git diff --stat HEAD~1 >/dev/null
git branch side
echo tmp >>new.txt; git stash -q; test "$(cat new.txt)" = new; git stash pop -q
git checkout -q -- new.txt
echo m >>app.txt; git commit -q -am 'agent: on main'
git checkout -q side; echo s >s.txt; git add s.txt; git commit -q -m 'agent: on side'
git checkout -q main; git rebase -q side
git log --format='%an <%ae>' -1 >/work/identity
"""
    result = vm.run(project, _script(work + ATTACK, marker))
    assert result.returncode == 0, result.stderr
    # The user's git directory is byte for byte what it was.
    assert _tree_digest(project / ".git") == before
    assert (project / "identity").read_text().strip() == f"{USER_NAME} <{USER_EMAIL}>"
    # One line tells the user what the agent committed.
    assert "3 commits on agent/" in result.stderr, result.stderr
    name = _instance_name(result.stderr)
    log = _git(vm, project, "log", "--format=%s|%an", f"agent/{name}")
    assert log.splitlines()[:3] == [
        f"agent: on main|{USER_NAME}",
        f"agent: on side|{USER_NAME}",
        f"agent: two|{USER_NAME}",
    ]
    # What a careful user does next; nothing of the guest's may run.
    for args in (["status"], ["diff"], ["log", "-p", "--all"], ["diff", "main", f"agent/{name}"]):
        _git(vm, project, *args)
    reviewed = _review(vm, project, name)
    assert reviewed.returncode == 0, reviewed.stderr
    assert "agent: two" in reviewed.stdout
    assert "+two" in reviewed.stdout
    listed = _review(vm, project)
    assert name in listed.stdout and "not landed" in listed.stdout
    assert _markers(marker) == []


def test_land_fast_forwards_and_refuses_when_the_branch_moved(vm: VM) -> None:
    project = _repo(vm)
    first = vm.run(project, "cd /work && echo a >a && git add a && git commit -q -m a")
    assert first.returncode == 0, first.stderr
    name = _instance_name(first.stderr)
    landed = _land(vm, project, name)
    assert landed.returncode == 0, landed.stderr
    assert "fast-forward" in landed.stdout
    assert _git(vm, project, "log", "-1", "--format=%s", "main") == "a"
    assert _git(vm, project, "status", "--porcelain") == ""
    # A second run, then the user commits on main before landing.
    second = vm.run(project, "cd /work && echo b >b && git add b && git commit -q -m b")
    assert second.returncode == 0, second.stderr
    other = _instance_name(second.stderr)
    (project / "user.txt").write_text("mine\n")
    os.chown(project / "user.txt", vm.user.uid, vm.user.gid)
    _git(vm, project, "add", "user.txt")
    _git(vm, project, "commit", "-q", "-m", "user moved main")
    refused = _land(vm, project, other)
    assert refused.returncode == 1
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "main moved since the agent started" in lines[0], refused.stderr
    assert _git(vm, project, "log", "-1", "--format=%s", "main") == "user moved main"


def test_two_worktree_agents_commit_side_by_side_and_gc_prunes_only_landed(vm: VM) -> None:
    project = _repo(vm)
    marker = project.parent / "PWNED"
    runs = _runs_dir(vm, project)
    # Each agent waits for the host's go (after ps has listed both), then commits.
    work = (
        'set -e; n=$2; cd /work; test "$(git rev-parse --abbrev-ref HEAD)" = agent/$n; '
        "i=0; while [ ! -e /work/.go ] && [ $i -lt 1200 ]; do usleep 100000; i=$((i+1)); done; "
        'echo $n >$n.txt; git add $n.txt; git commit -q -m "work of $n"\n'
    )
    one = vm.start(project, _script(work + ATTACK, marker, "one"), "--worktree", "one")
    two = vm.start(project, _script(work + ATTACK, marker, "two"), "--worktree", "two")
    try:
        branches = _wait_for_branches(vm, {"agent/one", "agent/two"}, [one, two])
    finally:
        for name in ("one", "two"):
            if (runs / name / "tree").is_dir():
                (runs / name / "tree" / ".go").touch()
    assert branches == {"agent/one", "agent/two"}
    outs = [one.communicate(timeout=VM_TIMEOUT_S), two.communicate(timeout=VM_TIMEOUT_S)]
    assert one.returncode == 0 and two.returncode == 0, outs
    assert "1 commit on agent/one; microvm-run review one" in outs[0][1]
    assert "1 commit on agent/two; microvm-run review two" in outs[1][1]
    # Each on its own branch; the project's own tree untouched.
    assert _git(vm, project, "show", "agent/one:one.txt") == "one"
    assert _git(vm, project, "ls-tree", "--name-only", "agent/two") == "app.txt\ntwo.txt"
    assert not (project / "one.txt").exists()
    assert _git(vm, project, "status", "--porcelain") == ""
    # The attack payload is live: host git run in the agent's own git dir
    # (what the runner never does) fires it.  Proves the marker check can fail.
    agent_git = runs / "one" / "git"
    _as_user(
        vm, ["git", f"--git-dir={agent_git}", f"--work-tree={agent_git.parent / 'tree'}", "status"]
    )
    assert _markers(marker) != []
    for found in marker.parent.glob(marker.name + "*"):
        found.unlink()
    # The user's side, reviewed and landed, runs nothing of the guest's.
    assert _review(vm, project, "one").returncode == 0
    assert _markers(marker) == []
    landed = _land(vm, project, "one")
    assert landed.returncode == 0, landed.stderr
    assert (project / "one.txt").read_text() == "one\n"
    # The second worktree's base moved: land refuses; gc keeps it.
    assert _land(vm, project, "two").returncode == 1
    pruned = vm.ops("gc", "--prune", "--yes")
    assert pruned.returncode == 0, pruned.stderr
    assert "removed worktree run one" in pruned.stdout
    assert not (agent_git.parent).exists()
    assert (runs / "two" / "tree" / "two.txt").exists()
    # Reused by name: the next run on "two" finds its own work.
    again = vm.run(
        project,
        "test -f /work/two.txt && git --no-pager -C /work log -1 --format=%s",
        "--worktree",
        "two",
    )
    assert again.returncode == 0, again.stderr
    assert "work of two" in again.stdout
    assert _markers(marker) == []
    # On request, an unlanded worktree goes too.
    forced = vm.ops("gc", "--prune", "--yes", "--worktree", "two")
    assert "removed worktree run two" in forced.stdout, forced.stdout
    assert not (runs / "two").exists()


def test_git_status_in_the_guest_does_not_rehash_the_tree_and_the_host_pays_nothing(
    vm: VM,
) -> None:
    project = _repo(vm)
    for i in range(50):
        path = project / f"f{i}.txt"
        path.write_text(f"{i}\n")
        os.chown(path, vm.user.uid, vm.user.gid)
    _git(vm, project, "add", "-A")
    _git(vm, project, "commit", "-q", "-m", "many")
    # An index written in the same second as the files holds "racily clean"
    # entries (git smudges their size), which any git re-reads. A second
    # later the host's status writes a clean one, as a user's usually is.
    time.sleep(1.1)
    _git(vm, project, "status")
    assert _git(vm, project, "ls-files", "--debug").count("size: 0\t") == 0
    index = project / ".git" / "index"
    host_before = index.read_bytes()
    # checkStat=minimal: the copied index matches; status writes nothing.
    # Whether git's defaults would re-hash here depends on this host (the
    # test user's uid against the guest's 1000, inode numbers), so the
    # control changes one stat field the minimal check ignores, the ctime
    # (chmod to the same mode), on a file only the agent's index holds:
    # git's defaults then refresh the entry and rewrite the index.
    command = """set -e; cd /work
idx() { sha256sum .git/index; }
a=$(idx); git status --porcelain >/dev/null; b=$(idx)
test "$a" = "$b" && echo minimal-unchanged
echo ctl >ctl.txt; git add ctl.txt; git commit -q -m ctl; sleep 2
git status --porcelain >/dev/null; c=$(idx)
chmod 644 ctl.txt; git status --porcelain >/dev/null; d=$(idx)
test "$c" = "$d" && echo minimal-ignores-ctime
git -c core.checkStat=default -c core.trustCtime=true status --porcelain >/dev/null; e=$(idx)
test "$d" != "$e" && echo default-rewrote
true
"""
    result = vm.run(project, command)
    assert result.returncode == 0, result.stderr
    for seen in ("minimal-unchanged", "minimal-ignores-ctime", "default-rewrote"):
        assert seen in result.stdout, result.stdout
    # The other direction: the guest never wrote the host's index.
    assert index.read_bytes() == host_before
    _git(vm, project, "status")
    assert index.read_bytes() == host_before


def test_a_project_whose_git_is_a_file_is_shown_read_only(vm: VM) -> None:
    main = _repo(vm, "main")
    linked = main.parent / "linked"
    _git(vm, main, "worktree", "add", "-q", str(linked))
    pointer = (linked / ".git").read_text()
    result = vm.run(linked, "echo 'gitdir: /work/evil' >/work/.git && echo wrote")
    assert result.returncode != 0, result.stderr
    assert "wrote" not in result.stdout
    assert "is a file (a linked worktree or submodule)" in result.stderr
    assert (linked / ".git").read_text() == pointer


# The guest makes a git directory whose fsmonitor would run on the host, then
# tries every way to have a submodule of yours point at it.
SUBMODULE_ATTACK = r"""
m=$1
git init -q --bare /work/evil
printf '[core]\n\tbare = false\n\tfsmonitor = touch %s.fsmonitor; false\n' "$m" >>/work/evil/config
echo 'gitdir: /work/evil' >/work/sub/.git && echo wrote-sub
mv /work/sub /work/sub-aside && echo moved-sub
mv /work/deep /work/deep-aside && echo moved-parent
mkdir -p /work/deep/empty && echo 'gitdir: /work/evil' >/work/deep/empty/.git && echo wrote-empty
true
"""


def test_submodules_cannot_be_pointed_at_a_git_dir_of_the_guests(vm: VM) -> None:
    lib = _repo(vm, "lib")
    project = _repo(vm)
    marker = project.parent / "PWNED"
    _git(vm, project, "-c", "protocol.file.allow=always", "submodule", "add", "-q", str(lib), "sub")
    # A submodule that is not checked out (its directory is even missing).
    commit = _git(vm, project, "rev-parse", "HEAD")
    _git(vm, project, "update-index", "--add", "--cacheinfo", f"160000,{commit},deep/empty")
    _git(vm, project, "commit", "-q", "-m", "submodules")
    pointer = (project / "sub" / ".git").read_text()
    result = vm.run(project, _script(SUBMODULE_ATTACK, marker))
    assert result.returncode == 0, result.stderr
    for done in ("wrote-sub", "moved-sub", "moved-parent", "wrote-empty"):
        assert done not in result.stdout, result.stdout
    assert (project / "sub" / ".git").read_text() == pointer
    assert not (project / "deep" / "empty" / ".git").exists()
    # Your git status enters every submodule: none runs the guest's fsmonitor.
    _git(vm, project, "status")
    _git(vm, project, "diff")
    assert _markers(marker) == []
    # The payload is live: git pointed at the guest's directory runs it.
    _as_user(
        vm, ["git", f"--git-dir={project / 'evil'}", f"--work-tree={project / 'sub'}", "status"]
    )
    assert _markers(marker) != []


def test_a_project_without_git_works_as_before(vm: VM) -> None:
    project = vm.project()
    result = vm.run(project, "echo hi >/work/f; test ! -e /work/.git")
    assert result.returncode == 0, result.stderr
    assert (project / "f").read_text() == "hi\n"
    assert "commit" not in result.stderr
