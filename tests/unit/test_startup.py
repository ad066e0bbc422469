"""The quick paths import only what they use (bench/startup times them)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Run in a fresh interpreter: this test process has imported everything.
PROBE = """
import sys
from microvm_run import cli
status = cli.main(sys.argv[1:], {"HOME": HOME, "XDG_RUNTIME_DIR": RUN, "PATH": "/usr/bin:/bin"})
print(" ".join(sorted(name for name in sys.modules if name.startswith("microvm_run"))))
print(" ".join(sorted(set(sys.modules) & {"shutil", "socket", "json", "typing"})))
sys.exit(status)
"""


def loaded_after(tmp_path: Path, *argv: str) -> tuple[set[str], set[str]]:
    (tmp_path / "run").mkdir(mode=0o700, exist_ok=True)
    code = f"HOME = {str(tmp_path)!r}; RUN = {str(tmp_path / 'run')!r}\n" + PROBE
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS",)}
    done = subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env, check=True
    )
    ours, stdlib = done.stdout.splitlines()[-2:]
    return set(ours.split()), set(stdlib.split())


@pytest.mark.parametrize("command", [["ps"], ["help"]])
def test_ps_and_help_do_not_import_the_planner(tmp_path: Path, command: list[str]) -> None:
    ours, stdlib = loaded_after(tmp_path, *command)
    planner = {"microvm_run.plan", "microvm_run.spec", "microvm_run.agentgit"}
    assert not ours & planner, ours & planner
    assert not ours & {"microvm_run.doctor", "microvm_run.git_cli", "microvm_run.launch"}
    # argparse would import shutil for the terminal width; QMP needs socket and json.
    assert "shutil" not in stdlib
    assert "socket" not in stdlib


def option_lines(columns: str) -> list[str]:
    env = {**os.environ, "COLUMNS": columns}
    done = subprocess.run(
        [sys.executable, "-m", "microvm_run", "--help"],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    # Help text continued on its own line, wrapped by argparse at the width.
    options = done.stdout.split("\nsubcommands (")[0]  # the epilog is not wrapped
    return [line for line in options.splitlines() if line.startswith(" " * 20)]


def test_the_help_is_as_wide_as_columns_says() -> None:
    assert max(len(line) for line in option_lines("60")) <= 58
    assert max(len(line) for line in option_lines("200")) > 60
