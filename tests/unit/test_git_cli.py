"""--worktree, WORK_WORKTREE and the git part of --dry-run: bad input is one line, exit 2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.cli import run

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir()
    return {
        "HOME": str(home),
        "XDG_DATA_HOME": str(tmp_path / "data"),
        "XDG_STATE_HOME": str(tmp_path / "state"),
        "XDG_RUNTIME_DIR": str(tmp_path / "run"),
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
    }


@pytest.fixture
def project(tmp_path: Path) -> Path:
    path = tmp_path / "project"
    (path / ".git" / "objects").mkdir(parents=True)
    return path


def test_dry_run_of_a_git_project_shows_the_masks_and_creates_nothing(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], spec_file: Path, project: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    argv = ["--spec", str(spec_file), "--work-dir", str(project), "--dry-run"]
    code, out, _ = run(capsys, argv, env)
    assert code == 0
    assert "git          shared: agent branch agent/" in out
    assert f"--ro-bind {project}/.git/objects -> {project}/.git/user-objects" in out
    assert not (tmp_path / "state").exists()


def test_work_worktree_shares_the_runners_tree(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], spec_file: Path, project: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    env |= {"WORK_WORKTREE": "fix-login"}
    argv = ["--spec", str(spec_file), "--work-dir", str(project), "--dry-run", "--json"]
    code, out, _ = run(capsys, argv, env)
    assert code == 0
    plan = json.loads(out)
    assert plan["git"]["mode"] == "worktree" and plan["git"]["name"] == "fix-login"
    work = next(d for d in plan["virtiofsd"] if d["tag"] == "work")
    assert work["shared_dir"].startswith(str(tmp_path / "state" / "microvm-run" / "git"))
    assert work["shared_dir"].endswith("/fix-login/tree")
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize(
    ("args", "extra_env", "message", "git"),
    [
        (["--worktree", "a/b"], {}, "worktree name 'a/b'", True),
        ([], {"WORK_WORKTREE": "-x"}, "worktree name '-x'", True),
        (["--worktree", "x"], {}, "--worktree needs a git repository", False),
        ([], {"AGENT_HOME": "{tmp}"}, "contains the project", True),
    ],
)
def test_bad_git_input_is_one_line_exit_2_and_nothing_created(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], spec_file: Path, tmp_path: Path,
    args: list[str], extra_env: dict[str, str], message: str, git: bool,
) -> None:  # fmt: skip
    work = tmp_path / "project"
    (work / ".git" if git else work).mkdir(parents=True)
    extra = {k: v.replace("{tmp}", str(tmp_path)) for k, v in extra_env.items()}
    code, out, err = run(
        capsys, ["--spec", str(spec_file), "--work-dir", str(work), *args], env | extra
    )
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "state").exists()
    assert not (tmp_path / "run").exists()


def test_review_and_land_are_subcommands_not_launches(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], tmp_path: Path
) -> None:
    code, _, err = run(capsys, ["review", "--work-dir", str(tmp_path)], env)
    assert code == 2 and "not the main checkout of a git repository" in err
    code, _, err = run(capsys, ["land", "--bogus"], env)
    assert code == 2 and err.count("\n") == 1


@pytest.mark.skipif(
    shutil.which("make") is None or not (REPO / "nix.mk").exists(),
    reason="make or nix.mk is not here (the Nix build's sources have no nix.mk)",
)
def test_make_passes_work_worktree_to_the_run() -> None:
    shown = subprocess.run(
        ["make", "-s", "-n", "-f", "nix.mk", "claude.run", "WORK_WORKTREE=fix-login"],
        cwd=REPO, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "WORK_WORKTREE='fix-login'" in shown.stdout
