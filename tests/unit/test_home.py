from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

from microvm_run.home import agent_home, project_basename, project_hash


def test_basename_keeps_only_safe_characters_and_12_of_them() -> None:
    assert project_basename(Path("/src/my project!")) == "myproject"
    assert project_basename(Path("/src/a-very_long.name.here")) == "a-very_longn"
    assert project_basename(Path("/src/ünï")) == "n"


def test_basename_of_an_unnameable_dir_is_root() -> None:
    assert project_basename(Path("/")) == "root"
    assert project_basename(Path("/src/...")) == "root"


def test_hash_is_sha256_of_the_path_without_newline() -> None:
    path = Path("/home/alice/src/app")
    assert project_hash(path) == hashlib.sha256(b"/home/alice/src/app").hexdigest()[:12]


def test_hash_matches_the_reference_shell_formula() -> None:
    # The reference setup: echo -n "$WORK" | sha256sum | cut -c1-12
    path = "/home/alice/src/app with space"
    shell = subprocess.run(
        ["sh", "-c", 'printf %s "$1" | sha256sum | cut -c1-12', "sh", path],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert project_hash(Path(path)) == shell.stdout.strip()


def test_agent_home_layout() -> None:
    home = agent_home("gemini", Path("/w/proj"), Path("/data"))
    assert home == Path("/data/gemini-microvm") / f"proj-{project_hash(Path('/w/proj'))}"
