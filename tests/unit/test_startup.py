"""The quick paths import only what they use (bench/startup times them)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import tomli_w

# Run in a fresh interpreter: this test process has imported everything.
PROBE = """
import sys
from microvm_run import cli
status = cli.main(sys.argv[1:], {"HOME": HOME, "XDG_RUNTIME_DIR": RUN, "PATH": "/usr/bin:/bin"})
print(" ".join(sorted(name for name in sys.modules if name.startswith("microvm_run"))))
print(" ".join(sorted(set(sys.modules) & HEAVY)))
sys.exit(status)
"""

# Standard modules that cost 1.5-7 ms each to import here (bench/startup)
# and that the quick paths do without: QMP and egress need socket and json,
# stop and gc need subprocess and ctypes (process.py), only an existing
# state needs tomllib, tomli_w and datetime, only a project's home needs
# hashlib (OpenSSL), and typing only the type checker.
HEAVY = frozenset({
    "shutil", "socket", "json", "typing", "subprocess", "ctypes", "threading", "selectors",
    "tomllib", "tomli_w", "datetime", "hashlib", "_hashlib", "plumbum", "asyncio", "inspect",
})  # fmt: skip


def loaded_after(tmp_path: Path, *argv: str) -> tuple[set[str], set[str]]:
    (tmp_path / "run").mkdir(mode=0o700, exist_ok=True)
    code = (
        f"HOME = {str(tmp_path)!r}; RUN = {str(tmp_path / 'run')!r}\n"
        f"HEAVY = {set(HEAVY)!r}\n" + PROBE
    )
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
    # Nor the egress policy (state.py records the --net mode from netmode.py)
    # or the process layer.
    assert not ours & {"microvm_run.netpolicy", "microvm_run.process", "microvm_run.safefs"}
    # argparse would import shutil for the terminal width.  inspect comes
    # with dataclasses, which the runner's records are.  (At most: a newer
    # Python may import less.)
    assert stdlib <= {"inspect"}, stdlib


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


def test_a_dry_run_imports_only_the_heavy_modules_it_uses(
    tmp_path: Path, sample: dict[str, Any]
) -> None:
    spec = tmp_path / "spec.toml"
    spec.write_bytes(tomli_w.dumps(sample).encode())
    work = tmp_path / "work"
    work.mkdir()
    ours, stdlib = loaded_after(
        tmp_path, "--spec", str(spec), "--accel", "tcg", "--work-dir", str(work), "--dry-run"
    )
    assert "microvm_run.plan" in ours  # it did plan
    assert not ours & {"microvm_run.process", "microvm_run.launch", "microvm_run.egress"}
    # The spec is TOML (tomllib brings typing and datetime), the home is
    # named by a SHA-256 (hashlib and its OpenSSL); the user-manager probe
    # uses _socket, not socket.
    assert stdlib <= {"inspect", "tomllib", "typing", "datetime", "hashlib", "_hashlib"}, stdlib
