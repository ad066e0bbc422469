"""What the command-line tests share: run ``microvm-run`` in-process as a
user would, and the arguments and git origin that `new --host-config` takes."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from microvm_run.cli import main


def run(
    capsys: pytest.CaptureFixture[str], argv: list[str], env: dict[str, str]
) -> tuple[int, str, str]:
    """``microvm-run ARGV`` with ``env`` as its whole environment: (status, stdout, stderr)."""
    code = main(argv, env)
    out, err = capsys.readouterr()
    return code, out, err


def host_roots(state: Path) -> list[str]:
    """`new --host-config`'s workspace root and user, under ``state``."""
    return ["--workspace-root", str(state / "workspaces"), "--user", "alice"]


def origin_repo(path: Path, files: dict[str, str]) -> Path:
    """A git repository at ``path`` with ``files`` in one commit (what `new --clone` clones)."""
    path.mkdir()
    for name, text in files.items():
        (path / name).write_text(text)
    git = ["git", "-C", str(path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git[:3], "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "x"], check=True)
    return path
