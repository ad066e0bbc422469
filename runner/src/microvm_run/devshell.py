"""The project's dev shell, evaluated on the host and cached in the runner's state.

With DIRENV_ALLOW=1 the runner evaluates the dev shell of the project in
WORK_DIR (a flake, a flake-based devenv or a plain devenv) with
``print-dev-env --json``, turns the exported variables into a plain POSIX sh
file of ``export NAME='value'`` lines and caches it in the runner's own
per-project state dir, which the guest never sees.  Each launch gives the
guest a copy by value (``~/.microvm-devshell.sh``, written over whatever is
there without following it), so the guest never evaluates Nix, and a later
launch with unchanged project files starts no process at all.

Evaluating a project's Nix code runs the project's code, so nothing here
happens without ``allow`` (the user's explicit DIRENV_ALLOW), and only for
the content the user allowed (consent.py): the agent writes the project.
Project files are read with safefs (no symlink followed, no FIFO or device
opened, bounded).  Commands are argv lists started through
:mod:`microvm_run.process`; nothing is ever built into a shell string or
``eval``-ed, on the host or in the guest.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import hashlib
import json
import os
import re
import shlex
import stat
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TextIO

from microvm_run import consent, contract, host, process, safefs
from microvm_run.atomic import make_private_dir, write_atomic

# The files whose contents decide the dev shell.  Order and names are part of
# the cache key, so moving content from one file to another changes the key.
KEY_FILES = (
    "flake.nix",
    "flake.lock",
    ".devenv.flake.nix",
    "devenv.nix",
    "devenv.yaml",
    "devenv.local.yaml",
    "devenv.lock",
)
# Bumped whenever the env file format or the filtering changes, so an old
# runner's cache is never sourced by a new guest module (and vice versa).
CACHE_FORMAT = "microvm-devshell/1"
# In the runner's per-project state dir, never in a guest-writable tree.
CACHE_SUBDIR = Path("devshell")
# In the agent home, written by value on each launch; never read back.
ERROR_FILE = ".microvm-devshell.err"
GUEST_ENV_FILE = ".microvm-devshell.sh"
# Bounds for reading the project's files (the guest wrote them).
MAX_KEY_FILE_BYTES = 16 * 1024 * 1024
MAX_NIX_FILES = 100_000
# Not walked for *.nix files: Git's own data at the top (no .nix files there).
# Only there: a .git deeper down is the agent's to fill with Nix code.
_SKIP_TOP = frozenset({".git"})
KEEP_ENTRIES = 5
# Temp files left by a SIGKILLed runner; live ones are never this old.
STALE_TEMP_SECONDS = 24 * 3600
NIX_FEATURES = ("--extra-experimental-features", "nix-command flakes")

# Exported variables of the dev shell that stay the guest's own.  Everything
# not listed here passes through, as `nix develop` does.
GUEST_OWN_VARS = frozenset(
    {
        # who and where the agent is: the guest sets these for its own user
        "HOME", "USER", "LOGNAME", "SHELL", "PWD", "OLDPWD", "SHLVL", "HOSTNAME",
        "MAIL", "XDG_RUNTIME_DIR",
        # the terminal and display: the launch fragment carries the host's
        "TERM", "COLORTERM", "TERMINFO", "DISPLAY", "WAYLAND_DISPLAY", "TZ",
        # the host build sandbox's scratch space and plumbing, meaningless later
        "TMPDIR", "TMP", "TEMP", "TEMPDIR", "NIX_BUILD_TOP", "NIX_LOG_FD",
        "NIX_ENFORCE_PURITY", "NIX_REMOTE", "NIX_ATTRS_JSON_FILE", "NIX_ATTRS_SH_FILE",
        # bash internals that declare -p may list as exported
        "BASHOPTS", "SHELLOPTS", "PPID", "UID", "EUID",
        # Nix points these at /no-cert-file.crt inside builds; the guest has its own CAs
        "SSL_CERT_FILE", "NIX_SSL_CERT_FILE",
        # code, not data: the guest never runs the project's bash hooks
        "shellHook", "builder",
    }
)  # fmt: skip
# Search paths the guest's system sets too: the dev shell's entries go first,
# the guest's stay after them (for PATH: the guest's own tools stay reachable).
PREPENDED_VARS = ("PATH", "XDG_DATA_DIRS", "XDG_CONFIG_DIRS", "TERMINFO_DIRS")
_SH_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class ProjectKind(enum.Enum):
    FLAKE = "flake"
    FLAKE_DEVENV = "flake-based devenv"
    DEVENV = "devenv"


@dataclass(frozen=True)
class DevshellResult:
    """What the launch flow needs: plain data, decided once per launch."""

    status: Literal["disabled", "none", "hit", "evaluated", "failed", "refused"]
    env_file: Path | None  # host path of the cached env file, in the runner's state
    guest_env_file: str | None  # the same file in the guest, for MICROVM_DEVSHELL
    message: str | None  # one line for the host user, already written to progress


@dataclass(frozen=True)
class CachePaths:
    """Where one cache key's files live in the runner's state dir."""

    directory: Path
    key: str

    @property
    def env_file(self) -> Path:
        return self.directory / f"{self.key}.sh"

    @property
    def log_file(self) -> Path:
        return self.directory / f"{self.key}.log"

    @property
    def profile(self) -> Path:
        # A Nix profile is a GC root: the host's garbage collector keeps the
        # shell's closure while its env file is cached (the guest sees the
        # host's /nix/store, so a collected path would vanish from its PATH).
        return self.directory / f"{self.key}.profile"


class _EvaluationFailed(Exception):
    def __init__(self, summary: str, details: str) -> None:
        super().__init__(summary)
        self.summary = summary
        self.details = details


def detect(work_dir: Path) -> ProjectKind | None:
    """The kind of dev shell WORK_DIR declares, from its files alone."""
    with safefs.opened_dir(work_dir) as fd:
        return _detect(fd)


def _detect(work_fd: int) -> ProjectKind | None:
    def has(name: str) -> bool:
        # Present as anything but a directory: a symlink or FIFO counts, and
        # shell_files() then refuses it instead of evaluating.
        try:
            info = os.stat(name, dir_fd=work_fd, follow_symlinks=False)
        except OSError:
            return False
        return not stat.S_ISDIR(info.st_mode)

    if has("flake.nix"):
        return ProjectKind.FLAKE_DEVENV if has("devenv.nix") else ProjectKind.FLAKE
    if has(".devenv.flake.nix") or has("devenv.nix"):
        return ProjectKind.DEVENV
    return None


def evaluation_command(
    kind: ProjectKind, work_dir: Path, *, nix: str = "nix", devenv: str = "devenv"
) -> tuple[str, ...]:
    """The argv that prints the dev shell as JSON (part of the cache key)."""
    if kind is ProjectKind.DEVENV:
        # devenv >= 1.0 has --json; older ones only print bash code, which we
        # never source (it runs functions and the shellHook).
        return (devenv, "print-dev-env", "--json")
    # --no-write-lock-file: launching an agent must not edit the project (and a
    # lock written mid-launch would change the key: the next launch would miss).
    # A flake without a lock file has its inputs resolved at each evaluation.
    command: tuple[str, ...] = (
        nix,
        *NIX_FEATURES,
        "print-dev-env",
        "--json",
        "--no-write-lock-file",
    )
    if kind is ProjectKind.FLAKE_DEVENV:
        # devenv's flake module reads PWD to find the project root.
        command += ("--impure",)
    # path:, never a bare path: with a .git in the project Nix would use its
    # git fetcher, which runs git on the host (the agent writes .git/config:
    # core.fsmonitor is a command) and evaluates the committed files instead
    # of the working tree the consent digest hashed.
    return (*command, f"path:{work_dir}")


def shell_files(work_fd: int) -> dict[str, str]:
    """What defines the dev shell: name -> sha256 of the content (or "absent").

    The key files (absent ones too) and every ``*.nix`` file in the
    project: a flake that imports ``./shell.nix`` is defined by it as much as
    by flake.nix.  Every other symlink counts by its target's name (never
    followed).  Read through safefs, walked without recursion: a key or
    ``*.nix`` file that is a symlink (Nix would follow it to content the
    digest never saw), FIFO or device, and a directory that cannot be read
    (its ``*.nix`` files would go unseen), are refused (UnsafeFile).
    """
    files: dict[str, str] = {}
    for name in KEY_FILES:
        data = safefs.read_regular(work_fd, name, MAX_KEY_FILE_BYTES)
        files[name] = "absent" if data is None else hashlib.sha256(data).hexdigest()
    count = 0
    for step in safefs.walk_tree(work_fd, skip_top=_SKIP_TOP):
        for link in step.links:
            # Never followed, but counted: Nix code that probes a path
            # (pathExists, readDir, an import) would see what a new or
            # changed link leads to, so the link is part of the content.
            # Links into the store (`result` of nix build, direnv's
            # profiles) change with every build and lead to immutable
            # content no guest wrote: they do not ask for consent again.
            relative = os.path.normpath(os.path.join(step.relative, link))
            if relative in files or link.endswith(".nix"):
                continue
            target = os.readlink(link, dir_fd=step.fd)
            if not target.startswith("/nix/store/") or ".." in target:
                files[relative] = "symlink:" + hashlib.sha256(os.fsencode(target)).hexdigest()
        for name in () if step.leaving else step.names:
            if not name.endswith(".nix"):
                continue
            relative = os.path.normpath(os.path.join(step.relative, name))
            if relative in files:
                continue
            count += 1
            if count > MAX_NIX_FILES:
                raise safefs.UnsafeFile(0, f"more than {MAX_NIX_FILES} .nix files in the project")
            digest = _file_digest(step.fd, name, relative)
            if digest is not None:
                files[relative] = digest
    return files


def _file_digest(dir_fd: int, name: str, relative: str) -> str | None:
    """The sha256 of a regular ``*.nix`` file; None for a real directory
    (the walk enters it); UnsafeFile for anything else."""
    try:
        info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    if stat.S_ISDIR(info.st_mode):
        return None
    if not stat.S_ISREG(info.st_mode):
        kind = "a symlink" if stat.S_ISLNK(info.st_mode) else "not a regular file"
        raise safefs.UnsafeFile(errno.EINVAL, f"{safefs.shown(relative)} is {kind}")
    try:
        data = safefs.read_regular(dir_fd, name, MAX_KEY_FILE_BYTES)
    except safefs.UnsafeFile as error:
        raise safefs.UnsafeFile(error.errno, f"{safefs.shown(relative)}: cannot read it") from None
    return "absent" if data is None else hashlib.sha256(data).hexdigest()


def cache_key(files: Mapping[str, str], command: Sequence[str]) -> str:
    """sha256 over the shell's files (names and digests) and the command.

    Every field is length-prefixed, so no two different inputs can produce
    the same byte stream (contents cannot move between files unnoticed).
    """
    digest = hashlib.sha256()

    def field(tag: str, data: bytes) -> None:
        digest.update(f"{tag}:{len(data)}:".encode())
        digest.update(data)

    field("format", CACHE_FORMAT.encode())
    for name in sorted(files):
        field("name", os.fsencode(name))
        field("content", files[name].encode())
    for arg in command:
        field("arg", os.fsencode(arg))
    return digest.hexdigest()[:32]


def render_env(dev_env: Mapping[str, Any]) -> str:
    """The POSIX sh env file for a ``print-dev-env --json`` document.

    Only exported string variables survive, minus GUEST_OWN_VARS and the
    derivation's output paths (store paths the guest cannot write to).
    Values are single-quoted, so the file is data even for a hostile project.
    """
    variables = dev_env.get("variables")
    if not isinstance(variables, Mapping):
        raise ValueError('no "variables" object')
    exported = {
        name: spec["value"]
        for name, spec in variables.items()
        if isinstance(spec, Mapping)
        and spec.get("type") == "exported"
        and isinstance(spec.get("value"), str)
        and _SH_NAME.fullmatch(name)
    }
    dropped = GUEST_OWN_VARS | set(exported.get("outputs", "out").split()) | {"outputs"}
    lines = [f"# {CACHE_FORMAT}: dev shell environment written by microvm-run; data only"]
    for name in sorted(exported):
        value = exported[name]
        if name in dropped:
            continue
        if name in PREPENDED_VARS:
            entries = ":".join(entry for entry in value.split(":") if entry)
            if entries:
                # ${VAR:+:$VAR}: no empty entry (for PATH: the cwd) if unset.
                lines.append(f'export {name}={shlex.quote(entries)}"${{{name}:+:${name}}}"')
            continue
        lines.append(f"export {name}={shlex.quote(value)}")
    return "\n".join(lines) + "\n"


def prepare(
    work_dir: Path,
    agent_home: Path,
    *,
    state_dir: Path,
    allow: bool | str,
    progress: TextIO,
    guest_home: str = contract.GUEST_HOME,
    nix: str = "nix",
    devenv: str = "devenv",
    env: Mapping[str, str] | None = None,
    others_running: bool = False,
) -> DevshellResult:
    """Make sure the dev shell's env file is cached; evaluate it on a miss.

    ``allow`` is DIRENV_ALLOW: True or "1" (the content allowed before, or
    the current content the first time), or a digest the runner printed.
    A hit costs a walk for ``*.nix`` files, a few reads and starts no
    process.  ``others_running``: another VM runs on this project, so its
    agent could change the files after they were checked and before Nix
    reads them; only a cache hit (which reads nothing of the project's) is
    used then.  Progress and the outcome line go to ``progress``; ``message``
    repeats that outcome line (without the ``microvm-run:`` prefix) for the
    caller's records: do not print it again.  Ctrl-C during an evaluation
    stops it, leaves no cache entry and re-raises KeyboardInterrupt.
    """
    if not allow:
        return DevshellResult("disabled", None, None, None)
    allow_value = "1" if allow is True else str(allow)
    guest_file = f"{guest_home.rstrip('/')}/{GUEST_ENV_FILE}"
    try:
        with safefs.opened_dir(work_dir) as work_fd:
            kind = _detect(work_fd)
            files = shell_files(work_fd) if kind is not None else {}
        if kind is None:
            _home_remove(agent_home, ERROR_FILE)
            return DevshellResult("none", None, None, None)
        decision = consent.decide(state_dir, files, allow_value, may_record=not others_running)
    except (OSError, ValueError) as error:  # UnicodeError is a ValueError
        # Whatever the agent made of the project: one line, and the VM boots.
        message = f"dev shell not evaluated: {_unsafe_reason(error)}; starting without it"
        return _refused(agent_home, message, progress)
    if not decision.allowed:
        assert decision.message is not None
        return _refused(agent_home, f"{decision.message}; starting without it", progress)
    command = evaluation_command(kind, work_dir, nix=nix, devenv=devenv)
    paths = CachePaths(state_dir / CACHE_SUBDIR, cache_key(files, command))
    if _is_hit(paths.env_file):
        if _is_intact(paths.env_file):
            return _give_guest(
                agent_home, paths, status="hit", guest_file=guest_file, message=None,
                progress=progress,
            )  # fmt: skip
        # Never source a damaged entry in the guest: evaluate it again.
        _remove(paths.env_file)
        _say(progress, f"dev shell cache entry {paths.env_file} was damaged; evaluating again")

    if others_running:
        message = (
            "dev shell not evaluated: another VM runs on this project, and its agent could "
            "change the files while Nix reads them; starting without it"
        )
        return _refused(agent_home, message, progress)
    child_env = {**(env if env is not None else os.environ), "PWD": str(work_dir)}
    try:
        elapsed = _evaluate(
            kind, command, paths, work_dir=work_dir, child_env=child_env, progress=progress
        )
    except (_EvaluationFailed, OSError) as error:
        # Whatever went wrong, the VM boots without the dev shell.
        failure = _as_failure(error)
        _home_write(agent_home, ERROR_FILE, _error_report(command, work_dir, paths, failure))
        message = f"dev shell evaluation failed (log: {paths.log_file}); starting without it"
        if failure.summary:
            message = f"{failure.summary}; {message}"
        _say(progress, message)
        return DevshellResult("failed", None, None, message)
    with contextlib.suppress(OSError):  # housekeeping must not fail a ready shell
        _prune(paths)
    return _give_guest(
        agent_home, paths, status="evaluated", guest_file=guest_file,
        message=f"dev shell ready ({elapsed:.1f} s)", progress=progress,
    )  # fmt: skip


def _unsafe_reason(error: OSError | ValueError) -> str:
    """Why the project's files could not be read, escaped for a terminal."""
    if isinstance(error, safefs.UnsafeFile):
        return str(error.strerror)  # names in it are escaped already
    return safefs.shown(str(error.strerror if isinstance(error, OSError) else error))


def foresee(
    work_dir: Path,
    *,
    state_dir: Path,
    allow: str,
    guest_home: str = contract.GUEST_HOME,
    nix: str = "nix",
    devenv: str = "devenv",
    others_running: bool = False,
) -> tuple[str | None, str]:
    """What :func:`prepare` would do, for ``--dry-run``: the guest file the
    launch would set (None: none) and one line saying why.  Evaluates
    nothing, starts no process and writes nothing (no consent recorded, no
    cache entry refreshed); it reads the project's files as prepare does."""
    guest_file = f"{guest_home.rstrip('/')}/{GUEST_ENV_FILE}"
    try:
        with safefs.opened_dir(work_dir) as work_fd:
            kind = _detect(work_fd)
            files = shell_files(work_fd) if kind is not None else {}
        if kind is None:
            return None, "none: the project declares no dev shell (flake.nix, devenv.nix)"
        decision = consent.decide(
            state_dir, files, allow, may_record=not others_running, write=False
        )
    except (OSError, ValueError) as error:
        return None, f"not evaluated: {_unsafe_reason(error)}"
    if not decision.allowed:
        return None, str(decision.message).removeprefix("dev shell ")
    command = evaluation_command(kind, work_dir, nix=nix, devenv=devenv)
    paths = CachePaths(state_dir / CACHE_SUBDIR, cache_key(files, command))
    if _is_intact(paths.env_file):
        return guest_file, f"cached, no evaluation ({paths.env_file})"
    if others_running:
        return None, "not evaluated: another VM runs on this project (no cached evaluation)"
    label = f"{Path(command[0]).name} print-dev-env"
    return guest_file, f"evaluated at launch ({label}); the VM starts without it if that fails"


def _give_guest(
    agent_home: Path,
    paths: CachePaths,
    *,
    status: Literal["hit", "evaluated"],
    guest_file: str,
    message: str | None,
    progress: TextIO,
) -> DevshellResult:
    """Copy the cached env file into the home by value; the host never reads it back."""
    try:
        data = paths.env_file.read_bytes()
        with _home_fd(agent_home) as home_fd:
            safefs.write_replacing(home_fd, GUEST_ENV_FILE, data, 0o644)
            safefs.remove(home_fd, ERROR_FILE)
    except OSError as error:
        message = f"cannot give the guest its dev shell ({error}); starting without it"
        _say(progress, message)
        return DevshellResult("failed", None, None, message)
    if message is not None:
        _say(progress, message)
    return DevshellResult(status, paths.env_file, guest_file, message)


def _refused(agent_home: Path, message: str, progress: TextIO) -> DevshellResult:
    report = (
        "microvm-run did not evaluate this project's dev shell on the host,\n"
        f"so this VM started without it.\n\nproblem:   {message}\n"
    )
    _home_write(agent_home, ERROR_FILE, report)
    _say(progress, message)
    return DevshellResult("refused", None, None, message)


@contextlib.contextmanager
def _home_fd(agent_home: Path) -> Iterator[int]:
    fd = safefs.check_share_root(agent_home, os.getuid())
    try:
        yield fd
    finally:
        os.close(fd)


def _home_write(agent_home: Path, name: str, text: str) -> None:
    with contextlib.suppress(OSError), _home_fd(agent_home) as fd:
        safefs.write_replacing(fd, name, text.encode(), 0o644)


def _home_remove(agent_home: Path, name: str) -> None:
    with contextlib.suppress(OSError), _home_fd(agent_home) as fd:
        safefs.remove(fd, name)


def _as_failure(error: Exception) -> _EvaluationFailed:
    if isinstance(error, _EvaluationFailed):
        return error
    return _EvaluationFailed(f"cannot write the dev shell cache ({error})", "")


def _is_intact(env_file: Path) -> bool:
    """An entry this runner wrote: our header line first, a newline last."""
    header = f"# {CACHE_FORMAT}: ".encode()
    try:
        data = env_file.read_bytes()
    except OSError:
        return False
    return data.startswith(header) and data.endswith(b"\n")


def _is_hit(env_file: Path) -> bool:
    try:
        # Refresh the mtime: pruning keeps the most recently used entries.
        os.utime(env_file)
    except FileNotFoundError:
        return False
    except OSError:
        return env_file.is_file()  # a read-only agent home still has its cache
    return True


def _evaluate(
    kind: ProjectKind,
    command: tuple[str, ...],
    paths: CachePaths,
    *,
    work_dir: Path,
    child_env: Mapping[str, str],
    progress: TextIO,
) -> float:
    program = host.which(command[0], child_env)
    if program is None:
        raise _EvaluationFailed(_missing_program_summary(kind, command[0]), "")
    argv = [program, *command[1:]]
    if kind is not ProjectKind.DEVENV:
        argv[-1:-1] = ["-L", "--profile", str(paths.profile)]
    make_private_dir(paths.directory)
    label = f"{Path(command[0]).name} print-dev-env"
    _say(progress, f"evaluating the dev shell ({label} in {work_dir}), log: {paths.log_file}")
    started = time.monotonic()
    with _temp_file(paths.directory, paths.key, ".json") as (json_path, json_out):
        returncode = _run_with_progress(
            argv,
            cwd=work_dir,
            env=child_env,
            stdout=json_out,
            log_file=paths.log_file,
            progress=progress,
        )
        if returncode != 0:
            raise _EvaluationFailed("", f"{label} exited with status {returncode}")
        try:
            text = render_env(json.loads(json_path.read_text(encoding="utf-8")))
        except ValueError as error:
            summary = f"{label} --json printed no dev shell ({error})"
            if kind is ProjectKind.DEVENV:
                summary += "; devenv 1.0 or newer is needed"
            raise _EvaluationFailed(summary, "") from None
    _write_atomically(paths.env_file, text)
    return time.monotonic() - started


def _run_with_progress(
    argv: Sequence[str],
    *,
    cwd: Path,
    env: Mapping[str, str],
    stdout: TextIO,
    log_file: Path,
    progress: TextIO,
) -> int:
    ticker = Progress(progress)
    # stdin is /dev/null: Nix must not stop to ask about a flake's nixConfig
    # while its prompt goes to the log file.
    with open(os.devnull, "rb") as stdin, open(log_file, "wb") as log:
        try:
            child = process.spawn(argv, env=env, cwd=cwd, stdin=stdin, stdout=stdout, stderr=log)
        except process.ProcessError as error:
            raise _EvaluationFailed(str(error), "") from None
        try:
            while not child.exited(0.05):
                ticker.tick()
            returncode = child.wait()
        finally:
            # Ctrl-C (or any error) while Nix runs: stop it before the caller
            # goes on, so no evaluation outlives the launch that wanted it.
            child.stop()
            child.close()
            ticker.close()
    return returncode


class Progress:
    """Elapsed time while an evaluation runs: one updating line on a TTY,
    else a line every ``line_every`` seconds (logs stay short)."""

    def __init__(
        self,
        stream: TextIO,
        *,
        tty_every: float = 1.0,
        line_every: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stream = stream
        self._clock = clock
        self._started = clock()
        self._tty = _isatty(stream)
        self._every = tty_every if self._tty else line_every
        self._next = self._every
        self._drawn = False

    def tick(self) -> None:
        elapsed = self._clock() - self._started
        if elapsed < self._next:
            return
        self._next = (elapsed // self._every + 1) * self._every
        if self._tty:
            self._stream.write(f"\rmicrovm-run: evaluating the dev shell... {elapsed:.0f} s")
            self._drawn = True
        else:
            self._stream.write(f"microvm-run: still evaluating the dev shell ({elapsed:.0f} s)\n")
        self._stream.flush()

    def close(self) -> None:
        if self._drawn:
            self._stream.write("\r\x1b[K")
            self._stream.flush()
            self._drawn = False


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _say(progress: TextIO, message: str) -> None:
    progress.write(f"microvm-run: {message}\n")
    progress.flush()


def _missing_program_summary(kind: ProjectKind, program: str) -> str:
    if kind is ProjectKind.DEVENV:
        return (
            f"this project uses devenv without a flake, but {program!r} is not on the "
            "host's PATH (install devenv 1.0 or newer)"
        )
    return f"this project has a {kind.value}, but {program!r} is not on the host's PATH"


def _error_report(
    command: Sequence[str], work_dir: Path, paths: CachePaths, failure: _EvaluationFailed
) -> str:
    # shlex.join is for reading only: the command is never run from text.
    lines = [
        "microvm-run could not evaluate this project's dev shell on the host,",
        "so this VM started without it (DIRENV_ALLOW=1).",
        "",
        f"command:   {shlex.join(command)}",
        f"directory: {work_dir}",
    ]
    if failure.summary:
        lines.append(f"problem:   {failure.summary}")
    if failure.details:
        lines.append(f"result:    {failure.details}")
    log = _tail(paths.log_file)
    if log:
        lines += [f"log:       {paths.log_file} (host)", "", "--- last lines of the log ---", log]
    return "\n".join(lines).rstrip("\n") + "\n"


def _tail(path: Path, limit: int = 64 * 1024) -> str:
    try:
        with open(path, "rb") as file:
            file.seek(0, os.SEEK_END)
            file.seek(max(0, file.tell() - limit))
            return file.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


@contextlib.contextmanager
def _temp_file(directory: Path, key: str, suffix: str) -> Iterator[tuple[Path, TextIO]]:
    """A unique temp file in ``directory``, always removed on the way out."""
    fd, name = tempfile.mkstemp(dir=directory, prefix=f".{key}.", suffix=f"{suffix}.tmp")
    path = Path(name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            yield path, file
    finally:
        _remove(path)


def _write_atomically(target: Path, text: str) -> None:
    """Readers see the old entry or the whole new one (atomic.write_atomic)."""
    make_private_dir(target.parent)
    write_atomic(target, text.encode("utf-8"), shared=True)


def _prune(current: CachePaths) -> None:
    """Keep the KEEP_ENTRIES most recently used keys, drop stale temp files."""
    groups: dict[str, list[Path]] = {}
    now = time.time()
    for path in current.directory.iterdir():
        if path.name.startswith("."):
            if path.name.endswith(".tmp") and _age(path, now) > STALE_TEMP_SECONDS:
                _remove(path)
            continue
        groups.setdefault(path.name.split(".", 1)[0], []).append(path)

    def last_used(key: str) -> float:
        # A hit refreshes its .sh; an evaluation in progress has a fresh log.
        return -min(_age(path, now) for path in groups[key])

    kept = set(sorted(groups, key=last_used, reverse=True)[:KEEP_ENTRIES]) | {current.key}
    for key, files in groups.items():
        if key not in kept:
            for path in files:
                _remove(path)


def _age(path: Path, now: float) -> float:
    try:
        return now - path.lstat().st_mtime
    except OSError:
        return float("inf")


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
