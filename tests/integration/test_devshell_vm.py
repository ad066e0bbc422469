"""DIRENV_ALLOW=1 end to end: the guest's agent sees the project's dev shell.

Debian's Nix has no daemon here, so only root can evaluate: this launch runs
as root (which also covers the runner's root path: no virtiofsd ID maps).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.devshell_fixture import copy_fixture

from .conftest import VM, make_root_vm, wait_until_clean

pytestmark = pytest.mark.integration


@pytest.fixture
def root_vm(venv_python: Path, runner_copy: Path, guest_spec: Path, scratch: Path) -> VM:
    return make_root_vm(venv_python, runner_copy, guest_spec, scratch, "root")


def test_the_agent_sees_the_projects_dev_shell(root_vm: VM) -> None:
    work = root_vm.project()
    copy_fixture("simple", work)
    command = (
        'printf "%s\\n" "$MY_PROJECT_VAR" "$HOME" "$PATH" > /work/seen; '
        'printf "%s" "$TRICKY_VAR" > /work/tricky'
    )
    first = root_vm.run(work, command, DIRENV_ALLOW="1")
    assert first.returncode == 0, first.stderr
    assert "dev shell ready" in first.stderr
    var, home, path = (work / "seen").read_text().splitlines()
    assert var == "hello-from-devshell"
    assert home == "/home/agent"  # the guest's own, not the shell's
    assert path.startswith("/fixture/bin:/fixture/sbin:")
    assert path.endswith(":/bin") or "/bin" in path.split(":")  # the guest's PATH stays
    assert (work / "tricky").read_text() == 'it\'s "quoted" $HOME `id`\nsecond line'

    second = root_vm.run(work, command, DIRENV_ALLOW="1")
    assert second.returncode == 0, second.stderr
    assert "dev shell" not in second.stderr  # a cache hit is quiet

    without = root_vm.run(work, 'printf "%s" "$MY_PROJECT_VAR" > /work/seen')
    assert without.returncode == 0, without.stderr
    assert (work / "seen").read_text() == ""  # no consent, no dev shell
    assert root_vm.runtime_dir is not None
    assert wait_until_clean(root_vm.user, [root_vm.runtime_dir]) == []


def test_a_broken_dev_shell_boots_without_it_and_leaves_the_error(root_vm: VM) -> None:
    work = root_vm.project()
    copy_fixture("broken", work)
    result = root_vm.run(
        work, 'test -s "$HOME/.microvm-devshell.err" && echo booted > /work/ok', DIRENV_ALLOW="1"
    )
    assert result.returncode == 0, result.stderr
    assert "dev shell evaluation failed" in result.stderr
    assert (work / "ok").read_text() == "booted\n"
