"""The create-agent-vm skill: every command it shows exists and runs (--dry-run or --help),
and `microvm-run skill install` puts it where each agent looks."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest

from microvm_run import newvm, skill_cli
from tests.support.cli import run

REPO = Path(__file__).resolve().parents[2]
SKILL = REPO / "skills" / "create-agent-vm" / "SKILL.md"


def shown_commands() -> list[list[str]]:
    """The microvm-run commands in the skill's code blocks, as argv after `microvm-run`."""
    blocks = re.findall(r"```sh\n(.*?)```", SKILL.read_text(), re.S)
    lines = [line.strip() for block in blocks for line in block.splitlines() if line.strip()]
    assert all(line.startswith("microvm-run ") for line in lines), lines
    return [shlex.split(line)[1:] for line in lines]


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir()
    # As the package's wrapper sets it (in the Nix build the module is not in a checkout).
    skills = str(SKILL.parents[1])
    return {
        "HOME": str(home),
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "MICROVM_RUN_SKILLS": skills,
    }


def test_the_skill_has_the_front_matter_agents_read() -> None:
    text = SKILL.read_text()
    front = re.match(r"---\nname: (\S+)\ndescription: (.+?)\n---\n", text)
    assert front is not None
    assert front.group(1) == skill_cli.SKILL == SKILL.parent.name
    assert len(front.group(2)) <= 1024


def test_the_skill_shows_new_check_and_their_help() -> None:
    words = [argv[0] for argv in shown_commands()]
    assert {"new", "check"} <= set(words)
    assert ["new", "--help"] in shown_commands()


def test_every_command_the_skill_shows_runs_in_dry_run_or_help_form(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], tmp_path: Path
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    config = tmp_path / "etc-nixos"
    config.mkdir()
    fill = {"NAME": "web", "DIR": str(config), "URL": str(tmp_path / "repo"), "FLAKE": "/p#x"}
    env |= {"WORK_DIR": str(project), "MICROVM_RUN_NIX_EVAL_JOBS": "/nonexistent/nej"}
    before = sorted(p.name for p in tmp_path.rglob("*"))
    for shown in shown_commands():
        argv = [fill.get(word, word) for word in shown]
        if "--help" not in argv and "--dry-run" not in argv:
            argv.append("--dry-run")
        code, out, err = run(capsys, argv, env)
        assert code == 0, (argv, err)
        assert out, argv
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_install_puts_the_skill_in_each_agents_directory_once(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], tmp_path: Path
) -> None:
    home = Path(env["HOME"])
    env |= {"CODEX_HOME": str(tmp_path / "codex")}
    expected = {
        "claude": home / ".claude/skills/create-agent-vm/SKILL.md",
        "gemini": home / ".gemini/skills/create-agent-vm/SKILL.md",
        "codex": tmp_path / "codex/skills/create-agent-vm/SKILL.md",
        "qwen": home / ".qwen/skills/create-agent-vm/SKILL.md",
    }
    # Every flavor (newvm.AGENTS, held to lib/flavors.nix by test_newvm) has one.
    assert set(expected) == set(newvm.AGENTS) == set(skill_cli.skills_dirs(env))
    for agent, path in expected.items():
        code, out, _ = run(capsys, ["skill", "install", "--agent", agent], env)
        assert code == 0
        assert f"installed {path}" in out
        assert path.read_bytes() == SKILL.read_bytes()
        code, out, _ = run(capsys, ["skill", "install", "--agent", agent], env)
        assert code == 0 and "up to date" in out


def test_an_edited_copy_is_kept_unless_forced(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], tmp_path: Path
) -> None:
    dest = tmp_path / "skills"
    assert run(capsys, ["skill", "install", "--dir", str(dest)], env)[0] == 0
    installed = dest / "create-agent-vm" / "SKILL.md"
    installed.write_text("mine\n")
    code, _, err = run(capsys, ["skill", "install", "--dir", str(dest)], env)
    assert code == 1 and "--force" in err
    assert installed.read_text() == "mine\n"
    assert run(capsys, ["skill", "install", "--dir", str(dest), "--force"], env)[0] == 0
    assert installed.read_bytes() == SKILL.read_bytes()


def test_bad_input_is_exit_2(capsys: pytest.CaptureFixture[str], env: dict[str, str]) -> None:
    code, out, err = run(capsys, ["skill", "install", "--agent", "copilot"], env)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert run(capsys, ["skill"], env)[0] == 2


def test_show_prints_the_shipped_skill(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], tmp_path: Path
) -> None:
    shipped = tmp_path / "share" / "create-agent-vm"
    shipped.mkdir(parents=True)
    (shipped / "SKILL.md").write_text("shipped\n")
    code, out, _ = run(capsys, ["skill", "show"], env | {"MICROVM_RUN_SKILLS": str(shipped.parent)})
    assert (code, out) == (0, "shipped\n")
