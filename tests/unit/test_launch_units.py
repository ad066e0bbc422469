"""virtiofsd units: their main pids come from one systemctl call."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from microvm_run import daemons, launch, process

# What systemctl show prints for several units (seen with systemd 252).
SHOWN = (
    "MainPID=1492\nId=a-vm-virtiofsd-work-1.service\n\n"
    "MainPID=0\nId=a-vm-virtiofsd-home-1.service\n"
)


def test_each_unit_gets_its_own_main_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str, ...]] = []

    def run(argv: list[str], **_: Any) -> process.Completed:
        seen.append(tuple(argv))
        return process.Completed(tuple(argv), 0, SHOWN, "")

    monkeypatch.setattr(process, "run", run)
    units = ["a-vm-virtiofsd-work-1", "a-vm-virtiofsd-home-1", "a-vm-virtiofsd-ro-store-1"]
    pids = daemons.main_pids(units, {})
    assert len(seen) == 1 and seen[0][-3:] == tuple(units)
    assert pids["a-vm-virtiofsd-work-1"] == (1492, "it exited at once")
    assert pids["a-vm-virtiofsd-home-1"][0] == 0
    assert "a-vm-virtiofsd-ro-store-1" not in pids


def test_a_failing_systemctl_names_its_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    def run(argv: list[str], **_: Any) -> process.Completed:
        return process.Completed(tuple(argv), 1, "", "Failed to connect to bus\n")

    monkeypatch.setattr(process, "run", run)
    assert daemons.main_pids(["u"], {}) == {"u": (0, "Failed to connect to bus")}


def test_set_id_file_names_the_guest_chose_reach_the_terminal_escaped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work, home = tmp_path / "work", tmp_path / "home"
    for directory in (work, home):
        directory.mkdir(mode=0o700)
    hostile = work / "\x1b]0;owned\x07\x1b[2J\n.sh"
    hostile.write_text("")
    hostile.chmod(0o4755)
    plan = SimpleNamespace(work_dir=work, agent_home=home, dirs_to_create=(home,), git=None)
    launch.restore_shares(plan, 0o700)  # type: ignore[arg-type]
    err = capsys.readouterr().err
    assert "removed set-uid/set-gid bits" in err
    assert "\x1b" not in err and "\x07" not in err and err.count("\n") == 1
    assert "\\x1b]0;owned\\x07\\x1b[2J\\x0a.sh" in err
    assert hostile.stat().st_mode & 0o7777 == 0o755


def test_virtiofsd_log_lines_reach_the_terminal_escaped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # virtiofsd's errors can name a path the guest chose.
    log = tmp_path / "virtiofsd-work.log"
    log.write_text("[2026] ERROR lookup /work/\x1b]0;owned\x07\x1b[2J failed\n")
    plan = SimpleNamespace(tag="work", log=log)
    daemons.show_logs([SimpleNamespace(plan=plan)], problems_only=True)  # type: ignore[list-item]
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\x07" not in err
    assert "ERROR lookup /work/\\x1b]0;owned\\x07\\x1b[2J failed" in err


def test_a_worktree_and_the_agents_git_dir_lose_set_id_bits_too(tmp_path: Path) -> None:
    # With --worktree, /work is the runner's tree and /work/.git the agent's
    # git directory; the guest may chmod 4755 in both.
    work, home, tree, agent_git = (tmp_path / n for n in ("proj", "home", "tree", "git"))
    for directory in (work, home, tree, agent_git):
        directory.mkdir(mode=0o700)
    planted = [tree / "tool", agent_git / "hook"]
    for path in planted:
        path.write_text("")
        path.chmod(0o4755)
    tree.chmod(0o777)
    git = SimpleNamespace(mode="worktree", share_root=tree, agent_git=agent_git)
    plan = SimpleNamespace(work_dir=work, agent_home=home, dirs_to_create=(home,), git=git)
    launch.restore_shares(plan, 0o700)  # type: ignore[arg-type]
    assert [p.stat().st_mode & 0o7777 for p in planted] == [0o755, 0o755]
    assert tree.stat().st_mode & 0o7777 == 0o700


def test_a_vm_on_an_outer_directory_cannot_redirect_the_restore_through_a_symlink(
    tmp_path: Path,
) -> None:
    """An agent whose share holds a directory on the way to this project (a VM
    on ~/src while this one runs on ~/src/a/proj) swaps that directory for a
    symlink while this VM runs.  The restore after the run must not follow
    it: the user's directory of the same name elsewhere keeps its modes."""
    outer = tmp_path / "src"
    work = outer / "a" / "proj"
    work.mkdir(parents=True, mode=0o755)
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    victim = tmp_path / "private" / "proj"  # the user's, named like the project
    (victim / "kept").mkdir(parents=True)
    victim.chmod(0o700)
    (victim / "kept").chmod(0o500)
    (victim / "shared-notes").write_text("")
    (victim / "shared-notes").chmod(0o664)
    plan = SimpleNamespace(work_dir=work, agent_home=home, dirs_to_create=(home,), git=None)
    # The outer agent, meanwhile:
    (outer / "a").rename(outer / "a.moved")
    (outer / "a").symlink_to(tmp_path / "private")
    launch.restore_shares(plan, 0o755)  # type: ignore[arg-type]
    assert victim.stat().st_mode & 0o7777 == 0o700
    assert (victim / "kept").stat().st_mode & 0o7777 == 0o500
    assert (victim / "shared-notes").stat().st_mode & 0o7777 == 0o664
