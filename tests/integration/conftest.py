"""Real VMs: real QEMU, real Rust virtiofsd, the busybox test guest, TCG.

The tests run as root (they create users and start a user manager), but
every microvm-run they start runs as the unprivileged test user, as a
developer would.  Prerequisites come from ``scripts/setup-host``; without
them the tests skip, or fail when MICROVM_RUN_REQUIRE_INTEGRATION=1 (CI).
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.nixenv import NIX_TEST_ENV
from tests.support.prereq import require

REPO = Path(__file__).resolve().parents[2]
PREFIX = Path(os.environ.get("AMVM_TEST_PREFIX", "/opt/agent-microvm-test"))
VM_TIMEOUT_S = 180


def _read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        name, sep, value = line.removeprefix("export ").partition("=")
        if sep and name.strip() and not name.startswith("#"):
            values[name.strip()] = value.strip().strip("'\"")
    return values


@dataclass(frozen=True)
class HostUser:
    name: str
    uid: int
    gid: int
    home: Path

    @property
    def runtime_dir(self) -> Path:
        return Path(f"/run/user/{self.uid}")


@dataclass
class VM:
    """How to start microvm-run as the test user, and what to check afterwards."""

    user: HostUser
    python: Path
    pythonpath: Path
    spec: Path
    scratch: Path
    runtime_dir: Path | None
    extra_env: dict[str, str] = field(default_factory=dict)

    def env(self, **extra: str) -> dict[str, str]:
        env = {
            "HOME": str(self.user.home),
            "USER": self.user.name,
            "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
            "PYTHONPATH": str(self.pythonpath),
            "LANG": "C.UTF-8",
            "TERM": "dumb",
        }
        if self.runtime_dir is not None:
            env["XDG_RUNTIME_DIR"] = str(self.runtime_dir)
        env.update(self.extra_env)
        env.update(extra)
        return env

    def argv(self, work_dir: Path, command: str, *options: str) -> list[str]:
        return [
            str(self.python), "-m", "microvm_run",
            "--spec", str(self.spec), "--accel", "tcg", "--work-dir", str(work_dir),
            *options, "--", command,
        ]  # fmt: skip

    def as_user(self, argv: Sequence[str]) -> list[str]:
        # The environment goes through execve, never argv: a key in `env
        # K=V` would be visible in /proc/*/cmdline, the leak tests look for.
        return [
            "setpriv", f"--reuid={self.user.uid}", f"--regid={self.user.gid}", "--init-groups",
            *argv,
        ]  # fmt: skip

    def run(
        self, work_dir: Path, command: str, *options: str, **extra_env: str
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.as_user(self.argv(work_dir, command, *options)),
            env=self.env(**extra_env),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=VM_TIMEOUT_S,
            check=False,
        )

    def start(
        self, work_dir: Path, command: str, *options: str, **extra_env: str
    ) -> subprocess.Popen[str]:
        return subprocess.Popen(
            self.as_user(self.argv(work_dir, command, *options)),
            env=self.env(**extra_env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def ops(self, *args: str, timeout: float = VM_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
        """A subcommand (ps, stop, gc, doctor) as the test user."""
        return subprocess.run(
            self.as_user([str(self.python), "-m", "microvm_run", *args]),
            env=self.env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def project(self, name: str = "proj") -> Path:
        """A fresh project dir owned by the test user."""
        path = Path(tempfile.mkdtemp(prefix="work-", dir=self.scratch)) / name
        path.mkdir()
        os.chown(path.parent, self.user.uid, self.user.gid)
        os.chown(path, self.user.uid, self.user.gid)
        return path

    def agent_home(self, work_dir: Path) -> Path:
        from microvm_run.home import agent_home  # noqa: PLC0415

        return agent_home("testagent", work_dir.resolve(), self.user.home / ".local" / "share")


def leftovers(user: HostUser, runtime_dirs: Sequence[Path]) -> list[str]:
    """Processes, units, sockets and runtime dirs a launch may have left.

    With runtime dirs given, only processes whose command line names one
    count, so unrelated VMs of the same user (root) cannot fail a test.
    """
    found = []
    where = "|".join(str(d) for d in runtime_dirs)
    pattern = f"(qemu-system|virtiofsd).*({where})" if where else "qemu-system|virtiofsd"
    procs = subprocess.run(
        ["pgrep", "-a", "-u", str(user.uid), "-f", pattern],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    found += [f"process: {line}" for line in procs.stdout.splitlines()]
    for base in runtime_dirs:
        run = base / "microvm-run"
        if run.is_dir():
            found += [f"runtime dir: {p}" for p in run.iterdir()]
    units = _user_units(user)
    found += [f"unit: {u}" for u in units if "-vm-virtiofsd-" in u]
    return found


def _user_units(user: HostUser) -> list[str]:
    private = user.runtime_dir / "systemd" / "private"
    if not private.exists():
        return []
    out = subprocess.run(
        ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--init-groups",
         "env", "-i", f"XDG_RUNTIME_DIR={user.runtime_dir}",
         "systemctl", "--user", "list-units", "--all", "--plain", "--no-legend"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return [line.split()[0] for line in out.stdout.splitlines() if line.strip()]


def wait_until_clean(
    user: HostUser, runtime_dirs: Sequence[Path], timeout: float = 10
) -> list[str]:
    """Units are collected asynchronously: allow systemd a moment, no more."""
    deadline = time.monotonic() + timeout
    while True:
        found = leftovers(user, runtime_dirs)
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def make_root_vm(venv_python: Path, runner_copy: Path, spec: Path, scratch: Path, name: str) -> VM:
    """microvm-run as root, for the dev-shell boots: Debian's Nix has no daemon,
    so only root evaluates. The suite's Nix configuration (no substituters,
    sandbox on); MICROVM_RUN_ALLOW_ROOT, since root is refused otherwise."""
    require(shutil.which("nix") is not None, "nix (Debian's nix-bin)")
    home = scratch / f"{name}-home"
    home.mkdir(exist_ok=True)
    runtime = scratch / f"{name}-runtime"
    runtime.mkdir(mode=0o700, exist_ok=True)
    vm = VM(HostUser("root", 0, 0, home), venv_python, runner_copy, spec, scratch, runtime)
    vm.extra_env = {
        **NIX_TEST_ENV,
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "MICROVM_RUN_ALLOW_ROOT": "1",
    }
    return vm


# -- session fixtures ------------------------------------------------------------


@pytest.fixture(scope="session")
def host_env() -> dict[str, str]:
    env_file = PREFIX / "env"
    require(env_file.is_file(), f"{env_file} (sudo scripts/setup-host)")
    values = _read_env_file(env_file)
    for tool in ("qemu-system-x86_64", "setpriv", "cpio"):
        require(shutil.which(tool) is not None, tool)
    require(os.geteuid() == 0, "root (the tests create users and a user manager)")
    require(Path(values.get("AMVM_VIRTIOFSD", "")).is_file(), "virtiofsd from setup-host")
    return values


@pytest.fixture(scope="session")
def test_user(host_env: dict[str, str]) -> HostUser:
    name = os.environ.get("AMVM_TEST_USER") or host_env.get("AMVM_TEST_USER", "amvm-test")
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        require(False, f"test user {name} (scripts/setup-host creates it)")
        raise
    return HostUser(name, entry.pw_uid, entry.pw_gid, Path(entry.pw_dir))


@pytest.fixture(scope="session")
def scratch(test_user: HostUser) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="amvm-it-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def venv_python(host_env: dict[str, str]) -> Path:
    python = PREFIX / "venv" / "bin" / "python"
    require(python.exists(), f"{python} (make venv)")
    return python


@pytest.fixture(scope="session")
def runner_copy(scratch: Path) -> Path:
    """The runner's source where the unprivileged user can read it."""
    target = scratch / "runner-src"
    shutil.copytree(REPO / "runner" / "src", target, ignore=shutil.ignore_patterns("__pycache__"))
    for path in [target, *target.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return target


def _build_guest(scratch: Path, machine: str) -> Path:
    out = scratch / f"guest-{machine}"
    subprocess.run(
        [str(REPO / "tests" / "guest" / "build"), str(out), "--machine", machine],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    for path in [out, *out.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return out / "spec.toml"


@pytest.fixture(scope="session")
def guest_spec(host_env: dict[str, str], scratch: Path) -> Path:
    return _build_guest(scratch, "microvm")


@pytest.fixture(scope="session")
def guest_spec_q35(host_env: dict[str, str], scratch: Path) -> Path:
    return _build_guest(scratch, "q35")


@pytest.fixture(scope="session")
def user_manager(test_user: HostUser) -> Iterator[Path]:
    script = REPO / "tests" / "support" / "user-manager"
    started = subprocess.run(
        [str(script), "start", test_user.name], capture_output=True, text=True, check=False
    )
    require(
        started.returncode == 0,
        f"a systemd user manager for {test_user.name}: {started.stderr.strip()}",
    )
    yield test_user.runtime_dir
    subprocess.run([str(script), "stop", test_user.name], check=False)


# -- per-test fixtures -------------------------------------------------------------


def _vm(
    test_user: HostUser,
    venv_python: Path,
    runner_copy: Path,
    spec: Path,
    scratch: Path,
    runtime_dir: Path,
) -> Iterator[VM]:
    vm = VM(test_user, venv_python, runner_copy, spec, scratch, runtime_dir)
    dirs = [runtime_dir]
    before = leftovers(test_user, dirs)
    assert not before, f"left over by an earlier test: {before}"
    yield vm
    assert wait_until_clean(test_user, dirs) == []


@pytest.fixture
def vm(
    test_user: HostUser,
    venv_python: Path,
    runner_copy: Path,
    guest_spec: Path,
    scratch: Path,
    user_manager: Path,
) -> Iterator[VM]:
    """microvm-run with a reachable systemd user manager (the usual desktop case)."""
    yield from _vm(test_user, venv_python, runner_copy, guest_spec, scratch, user_manager)


@pytest.fixture
def vm_no_manager(
    test_user: HostUser,
    venv_python: Path,
    runner_copy: Path,
    guest_spec: Path,
    scratch: Path,
) -> Iterator[VM]:
    """microvm-run where no user manager answers (containers, CI): the fallback."""
    runtime = scratch / f"runtime-{os.urandom(3).hex()}"
    runtime.mkdir(mode=0o700)
    os.chown(runtime, test_user.uid, test_user.gid)
    yield from _vm(test_user, venv_python, runner_copy, guest_spec, scratch, runtime)
