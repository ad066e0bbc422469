"""devshell with real Nix (Debian's nix-bin is enough) on input-less fixture flakes.

No VM: these prove the host half (evaluate, cache, hit, invalidate, fail,
interrupt) and that the env file gives a POSIX shell the project's variables.
The fixtures build their dev shells from builtins.derivation with a static
bash from the project as the builder, so nothing is fetched, nothing needs
nixpkgs, and Nix's build sandbox stays on. Every Nix here runs with the
suite's own configuration (tests/support/nix-conf), none of the machine's.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from microvm_run.devshell import DevshellResult, prepare
from tests.support.devshell_fixture import copy_fixture
from tests.support.interrupt import PREPARE_CHILD, wait_for
from tests.support.nixenv import NIX_TEST_ENV
from tests.support.prereq import require

COUNTING_NIX = """#!/bin/sh
echo call >> "$NIX_CALLS"
exec {nix} "$@"
"""


def real_nix() -> str:
    nix = shutil.which("nix")
    require(nix is not None, "nix on PATH (Debian: apt-get install nix-bin)")
    assert nix is not None
    usable = os.access("/nix/store", os.W_OK) or Path("/nix/var/nix/daemon-socket/socket").exists()
    require(usable, "a writable /nix/store or a running nix-daemon")
    return nix


class Host:
    """A project copied from a fixture, an agent home, and nix behind a counter."""

    def __init__(self, tmp_path: Path, fixture: str) -> None:
        self.work = tmp_path / "project"
        self.home = tmp_path / "home"
        self.state = tmp_path / "state"
        copy_fixture(fixture, self.work)
        self.home.mkdir()
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        self.calls = tmp_path / "nix-calls"
        (bin_dir / "nix").write_text(COUNTING_NIX.format(nix=real_nix()))
        (bin_dir / "nix").chmod(0o755)
        self.env = {
            "PATH": f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "NIX_CALLS": str(self.calls),
            **NIX_TEST_ENV,
        }

    def prepare(self, **kwargs: Any) -> DevshellResult:
        options: dict[str, Any] = {
            "allow": True, "progress": io.StringIO(), "env": self.env, "state_dir": self.state,
        }  # fmt: skip
        options.update(kwargs)
        return prepare(self.work, self.home, **options)

    def nix_calls(self) -> int:
        return len(self.calls.read_text().splitlines()) if self.calls.exists() else 0

    def cache_files(self) -> list[str]:
        directory = self.state / "devshell"
        return sorted(path.name for path in directory.iterdir()) if directory.exists() else []


def source(env_file: Path, names: list[str], shell: str = "sh") -> dict[str, str]:
    script = '. "$1"; shift; for n in "$@"; do eval "printf \'%s\\0\' \\"\\${$n-<unset>}\\""; done'
    out = subprocess.run(
        [*shell.split(), "-c", script, "sh", str(env_file), *names],
        env={"PATH": "/usr/bin:/bin", "HOME": "/home/agent", "TMPDIR": "/tmp"},
        capture_output=True, check=True,
    ).stdout  # fmt: skip
    return dict(zip(names, out.decode().split("\0")[:-1], strict=True))


def test_first_run_evaluates_and_caches_second_is_a_hit(tmp_path: Path) -> None:
    host = Host(tmp_path, "simple")
    first = host.prepare()
    assert first.status == "evaluated", (host.home / ".microvm-devshell.err").read_text()
    assert first.env_file is not None and first.env_file.is_file()
    assert host.nix_calls() == 1
    second = host.prepare()
    assert (second.status, second.env_file, second.message) == ("hit", first.env_file, None)
    assert host.nix_calls() == 1


def test_a_hit_needs_no_nix_at_all(tmp_path: Path) -> None:
    host = Host(tmp_path, "simple")
    host.prepare()
    result = host.prepare(env={**host.env, "PATH": str(tmp_path / "empty")})
    assert result.status == "hit"


def test_changing_flake_lock_needs_consent_again_then_invalidates(tmp_path: Path) -> None:
    host = Host(tmp_path, "simple")
    first = host.prepare()
    (host.work / "flake.lock").write_text('{"nodes": {"root": {}}, "root": "root", "version": 7}\n')
    refused = host.prepare()
    assert refused.status == "refused" and host.nix_calls() == 1
    assert refused.message is not None
    digest = refused.message.rsplit("DIRENV_ALLOW=", 1)[1].split(";", 1)[0]
    second = host.prepare(allow=digest)
    assert second.status == "evaluated" and second.env_file != first.env_file
    assert host.nix_calls() == 2
    assert host.prepare().status == "hit"


def test_the_guest_shell_sees_the_project_variables(tmp_path: Path) -> None:
    host = Host(tmp_path, "simple")
    result = host.prepare()
    assert result.env_file is not None
    names = ["MY_PROJECT_VAR", "TRICKY_VAR", "PATH", "HOME", "TMPDIR", "IN_NIX_SHELL", "out"]
    shells = ["dash", "busybox ash", "bash"]
    for shell in (s for s in shells if shutil.which(s.split()[0])):
        seen = source(result.env_file, names, shell)
        assert seen == {
            "MY_PROJECT_VAR": "hello-from-devshell",
            "TRICKY_VAR": 'it\'s "quoted" $HOME `id`\nsecond line',
            "PATH": "/fixture/bin:/fixture/sbin:/usr/bin:/bin",
            "HOME": "/home/agent",
            "TMPDIR": "/tmp",
            "IN_NIX_SHELL": "impure",
            "out": "<unset>",
        }, shell


def test_the_shell_closure_is_a_gc_root(tmp_path: Path) -> None:
    host = Host(tmp_path, "simple")
    result = host.prepare()
    assert result.env_file is not None
    profile = result.env_file.with_suffix(".profile")
    assert profile.resolve().is_relative_to("/nix/store") and profile.resolve().exists()


def test_broken_flake_boots_without_the_shell_and_leaves_the_error(tmp_path: Path) -> None:
    host = Host(tmp_path, "broken")
    result = host.prepare()
    error_file = host.home / ".microvm-devshell.err"
    assert (result.status, result.env_file, result.guest_env_file) == ("failed", None, None)
    assert result.message is not None
    assert result.message.startswith("dev shell evaluation failed (log: ")
    report = error_file.read_text()
    assert "this dev shell is broken on purpose" in report
    assert "print-dev-env" in report and str(host.work) in report
    assert not [name for name in host.cache_files() if name.endswith(".sh")]
    # Fixing the flake (and allowing the fix) clears the error on the next launch.
    copy_fixture("simple", host.work)
    refused = host.prepare()
    assert refused.status == "refused" and refused.message is not None
    digest = refused.message.rsplit("DIRENV_ALLOW=", 1)[1].split(";", 1)[0]
    assert host.prepare(allow=digest).status == "evaluated"
    assert not error_file.exists()


def test_flake_based_devenv_is_evaluated_impure_in_the_project(tmp_path: Path) -> None:
    host = Host(tmp_path, "devenv-flake")
    result = host.prepare()
    assert result.status == "evaluated", (host.home / ".microvm-devshell.err").read_text()
    assert result.env_file is not None
    assert source(result.env_file, ["FIXTURE_ROOT"]) == {"FIXTURE_ROOT": str(host.work)}


def test_ctrl_c_mid_evaluation_leaves_no_cache_and_the_next_run_evaluates(
    tmp_path: Path,
) -> None:
    host = Host(tmp_path, "slow")
    # Unique per run: pytest reuses tmp dir names across sessions, and a
    # derivation built once is never built (and so never held) again.  The
    # hold is a FIFO (the builder waits on it with bash's `read -t`), in a
    # directory the sandbox is given through extra-sandbox-paths.
    hold_dir = Path(tempfile.mkdtemp(prefix="amvm-hold-"))
    hold_dir.chmod(0o755)
    hold = hold_dir / f"hold-{os.urandom(8).hex()}"
    os.mkfifo(hold)
    host.env["NIX_CONFIG"] = f"extra-sandbox-paths = {hold_dir}"
    flake = host.work / "flake.nix"
    flake.write_text(flake.read_text().replace("@HOLD@", str(hold)))
    child = subprocess.Popen(
        [sys.executable, "-c", PREPARE_CHILD, str(host.work), str(host.home), str(host.state)]
        + [f"{name}={value}" for name, value in host.env.items()],
        stderr=subprocess.PIPE,
    )
    try:
        log = host.state / "devshell"
        # The builder announces itself in the log while it holds.

        def holding() -> bool:
            return any("holding while" in p.read_text() for p in log.glob("*.log"))

        wait_for(holding, timeout=60)
        child.send_signal(signal.SIGINT)
        _, stderr = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert b"KeyboardInterrupt" in stderr
    assert not [name for name in host.cache_files() if name.endswith((".sh", ".tmp"))]
    hold.unlink()
    hold_dir.rmdir()
    del host.env["NIX_CONFIG"]  # the sandbox path is gone with it
    result = host.prepare()
    assert result.status == "evaluated", (host.home / ".microvm-devshell.err").read_text()
    assert result.env_file is not None
    assert source(result.env_file, ["SLOW_VAR"]) == {"SLOW_VAR": "finally"}


def _git(work: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-C", str(work), "-c", "user.name=agent", "-c", "user.email=a@example.org", *args],
        check=True, capture_output=True,
    )  # fmt: skip


def test_a_git_hook_in_the_project_config_never_runs_on_the_host(tmp_path: Path) -> None:
    # The agent writes .git/config: if Nix used its git fetcher, `git status`
    # would run the fsmonitor command on the host during the evaluation.
    require(shutil.which("git") is not None, "git on PATH")
    host = Host(tmp_path, "simple")
    _git(host.work, "init", "-q")
    _git(host.work, "add", "-A")
    _git(host.work, "commit", "-q", "-m", "init")
    marker = tmp_path / "fsmonitor-ran"
    _git(host.work, "config", "core.fsmonitor", f"touch {marker}; false")
    result = host.prepare()
    assert result.status == "evaluated", (host.home / ".microvm-devshell.err").read_text()
    assert not marker.exists()


def test_the_working_tree_is_evaluated_not_the_committed_flake(tmp_path: Path) -> None:
    # A malicious flake.nix committed, a harmless copy in the working tree that
    # git is told to ignore: the consent hashes the working tree, so Nix must
    # evaluate exactly that, never HEAD.
    require(shutil.which("git") is not None, "git on PATH")
    host = Host(tmp_path, "simple")
    flake = host.work / "flake.nix"
    harmless = flake.read_text()
    _git(host.work, "init", "-q")
    flake.write_text(harmless.replace("hello-from-devshell", "from-the-commit"))
    _git(host.work, "add", "-A")
    _git(host.work, "commit", "-q", "-m", "init")
    flake.write_text(harmless)
    _git(host.work, "update-index", "--assume-unchanged", "flake.nix")
    result = host.prepare()
    assert result.status == "evaluated", (host.home / ".microvm-devshell.err").read_text()
    assert result.env_file is not None
    assert source(result.env_file, ["MY_PROJECT_VAR"]) == {"MY_PROJECT_VAR": "hello-from-devshell"}
