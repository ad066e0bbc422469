"""What a running instance records about itself, and facts about processes.

Each instance's runtime dir (``<runtime base>/<id>``, 0700) holds a
``state.toml`` that ``ps``, ``stop`` and ``gc`` read.  The runner writes it;
nothing else does.  Readers must survive anything in it (a crash mid-write
of an older version, a hand edit, a newer runner's format), so reading never
raises: it returns the state or one line saying why there is none.

State version 1::

    version = 1
    id = "ab12cd34"                      # the runtime dir's name
    agent = "claude"
    project = "/abs/work/dir"
    agent_home = "/abs/agent/home"
    spec = "/abs/spec.toml"
    started = "2026-11-22T10:00:00+00:00" # ISO 8601, UTC
    runner_pid = 1234
    runner_start = 987654                # /proc/<pid>/stat field 22
    qemu_pid = 0                         # 0 until QEMU has started
    qemu_start = 0
    virtiofsd_pids = [1240, 1241]
    virtiofsd_starts = [987700, 987701]  # one per pid; 0 = unknown
    supervisor = "systemd"               # or "child"
    units = ["...-virtiofsd-work-ab12cd34"]
    memory_mib = 8192
    vcpus = 4
    net = "open"                         # "open", "allowlist" or "none"
    ports = ["127.0.0.1:8080:80"]
    qmp_socket = "/run/user/1000/microvm-run/ab12cd34/qmp.sock"

A pid is only trusted together with its start time: pids are reused, and a
stale state file must never make ``stop`` or ``gc`` signal a stranger.

Agent homes get a sidecar ``<home>.project.toml`` next to them (not inside:
the home is shared into the guest, and the guest must not decide what ``gc``
deletes) naming the project they belong to.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from microvm_run import home
from microvm_run.atomic import write_atomic
from microvm_run.netmode import NetMode
from microvm_run.virtiofsd import Supervisor

TYPE_CHECKING = False  # typing's, without importing typing (3 ms): see tests/unit/test_startup.py
if TYPE_CHECKING:
    from typing import Any

STATE_VERSION = 1
STATE_FILE = "state.toml"
STOP_REQUESTED = "stop-requested"
HOME_RECORD_VERSION = 1
HOME_RECORD_SUFFIX = ".project.toml"
PROC = Path("/proc")
# A state file is a few hundred bytes; anything far larger is not ours.
MAX_STATE_BYTES = 64 * 1024

_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
# systemd unit names; never starting with "-", so one is never an option.
_BRANCH = re.compile(r"(agent/[A-Za-z0-9._-]{1,63})?")
_UNIT = re.compile(r"[A-Za-z0-9:_.\\@][A-Za-z0-9:_.\\@-]{0,255}")
# /proc/<pid>/stat after the ")" that ends comm: field 3 (state) is index 0.
_STAT_STATE = 0
_STAT_STARTTIME = 22 - 3


@dataclass(frozen=True)
class InstanceState:
    id: str
    agent: str
    project: Path
    agent_home: Path
    spec: Path
    started: str  # ISO 8601, UTC
    runner_pid: int
    runner_start: int
    qmp_socket: Path
    qemu_pid: int = 0
    qemu_start: int = 0
    virtiofsd_pids: tuple[int, ...] = ()
    virtiofsd_starts: tuple[int, ...] = ()
    supervisor: Supervisor = Supervisor.CHILD
    units: tuple[str, ...] = ()
    memory_mib: int = 0
    vcpus: int = 0
    net: NetMode = NetMode.OPEN
    ports: tuple[str, ...] = ()
    branch: str = ""  # the agent's branch (agentgit.py); "" when no git

    def virtiofsd(self) -> list[tuple[int, int]]:
        """(pid, start time) of each virtiofsd; start 0 when not recorded."""
        starts = list(self.virtiofsd_starts) + [0] * len(self.virtiofsd_pids)
        return list(zip(self.virtiofsd_pids, starts, strict=False))

    def to_toml(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "id": self.id,
            "agent": self.agent,
            "project": str(self.project),
            "agent_home": str(self.agent_home),
            "spec": str(self.spec),
            "started": self.started,
            "runner_pid": self.runner_pid,
            "runner_start": self.runner_start,
            "qemu_pid": self.qemu_pid,
            "qemu_start": self.qemu_start,
            "virtiofsd_pids": list(self.virtiofsd_pids),
            "virtiofsd_starts": list(self.virtiofsd_starts),
            "supervisor": str(self.supervisor),
            "units": list(self.units),
            "memory_mib": self.memory_mib,
            "vcpus": self.vcpus,
            "net": str(self.net),
            "ports": list(self.ports),
            "branch": self.branch,
            "qmp_socket": str(self.qmp_socket),
        }


@dataclass(frozen=True)
class StateRead:
    """A state file's content, or why there is none (exactly one is set)."""

    state: InstanceState | None
    problem: str | None


@dataclass(frozen=True)
class Entry:
    """One directory under the runtime base."""

    path: Path
    state: InstanceState | None
    problem: str | None  # why state is None
    mtime: float  # the directory's, for "was it just created?"

    @property
    def id(self) -> str:
        return self.path.name


@dataclass(frozen=True)
class HomeRecord:
    """An agent home under the data home and what its sidecar says."""

    path: Path
    agent: str  # from the <agent>-microvm directory it lives in
    project: Path | None  # None: no usable record
    # False: gone; None: could not tell (permissions, I/O error, no record).
    project_exists: bool | None
    # The record's project hashes to this home's name (home.agent_home).
    matches: bool
    problem: str | None  # why the record is unusable or does not match

    @property
    def record_path(self) -> Path:
        return home_record_path(self.path)


class StateError(ValueError):
    """Why a state or home record cannot be used; one line."""


# -- instance state -------------------------------------------------------------


def now_utc() -> str:
    """The ``started`` value for an instance starting now."""
    from datetime import UTC, datetime  # noqa: PLC0415 - see _read_toml

    return datetime.now(UTC).isoformat(timespec="seconds")


def write_state(runtime_dir: Path, state: InstanceState) -> None:
    """Replace ``state.toml`` atomically: readers see the old or the new file.

    Raises OSError (the runner reports it); a ValueError for a state that
    would not read back, so a bug shows up at the writer.
    """
    import tomli_w  # noqa: PLC0415 - see _read_toml

    _validate(state.to_toml(), expected_id=runtime_dir.name)
    write_atomic(runtime_dir / STATE_FILE, tomli_w.dumps(state.to_toml()).encode())


def read_state(runtime_dir: Path) -> StateRead:
    path = runtime_dir / STATE_FILE
    try:
        data = _read_toml(path)
        return StateRead(_validate(data, expected_id=runtime_dir.name), None)
    except StateError as err:
        return StateRead(None, f"unreadable state: {err}")


def scan(base: Path) -> list[Entry]:
    """Every instance directory under the base, sorted by name.

    Only real directories count: a symlink or file in the base is never
    taken for an instance (gc removes what this returns).
    """
    try:
        names = sorted(os.listdir(base))
    except FileNotFoundError:
        return []
    entries = []
    for name in names:
        path = base / name
        try:
            info = path.lstat()
        except FileNotFoundError:
            continue  # removed while we looked
        if not stat.S_ISDIR(info.st_mode):
            continue
        read = read_state(path)
        entries.append(Entry(path, read.state, read.problem, info.st_mtime))
    return entries


def base_problem(base: Path, uid: int) -> str | None:
    """Why the runtime base must not be trusted (None: it is fine or absent)."""
    try:
        info = base.lstat()
    except FileNotFoundError:
        return None
    except OSError as err:
        return f"cannot inspect {base}: {err.strerror}"
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != uid:
        return f"{base} is not a directory owned by you; remove it"
    return None


def _validate(data: dict[str, Any], *, expected_id: str) -> InstanceState:
    version = data.get("version")
    if type(version) is not int:
        raise StateError("missing or non-integer version")
    if version > STATE_VERSION:
        raise StateError(
            f"version {version} is newer than this microvm-run understands ({STATE_VERSION})"
        )
    if version < 1:
        raise StateError(f"invalid version {version}")
    fields = _Fields(data)
    state = InstanceState(
        id=fields.text("id", _ID),
        agent=fields.text("agent"),
        project=fields.path("project"),
        agent_home=fields.path("agent_home"),
        spec=fields.path("spec"),
        started=fields.timestamp("started"),
        runner_pid=fields.integer("runner_pid", low=1),
        runner_start=fields.integer("runner_start", low=1),
        qemu_pid=fields.integer("qemu_pid"),
        qemu_start=fields.integer("qemu_start"),
        virtiofsd_pids=fields.integers("virtiofsd_pids", low=1),
        virtiofsd_starts=fields.integers("virtiofsd_starts"),
        supervisor=Supervisor(fields.choice("supervisor", tuple(Supervisor))),
        units=fields.texts("units", _UNIT),
        memory_mib=fields.integer("memory_mib"),
        vcpus=fields.integer("vcpus"),
        net=NetMode(fields.choice("net", tuple(NetMode))),
        ports=fields.texts("ports"),
        # Absent in states written before git support: no branch.
        branch=fields.text("branch", _BRANCH) if "branch" in data else "",
        qmp_socket=fields.path("qmp_socket"),
    )
    if state.id != expected_id:
        raise StateError(f"id {state.id!r} is not this directory's ({expected_id!r})")
    if len(state.virtiofsd_starts) != len(state.virtiofsd_pids):
        raise StateError("virtiofsd_starts does not match virtiofsd_pids")
    return state


class _Fields:
    """Typed access to a decoded TOML table; every failure is a StateError."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data

    def _get(self, key: str, kind: type, what: str) -> Any:
        if key not in self.data:
            raise StateError(f"missing {key}")
        value = self.data[key]
        # type() and not isinstance(): TOML's true must not pass for 1.
        if type(value) is not kind:
            raise StateError(f"{key} must be {what}, not {type(value).__name__}")
        return value

    def text(self, key: str, pattern: re.Pattern[str] | None = None) -> str:
        value: str = self._get(key, str, "a string")
        if pattern is not None and not pattern.fullmatch(value):
            raise StateError(f"{key} {value!r} is malformed")
        return value

    def path(self, key: str) -> Path:
        value = self.text(key)
        if not value.startswith("/") or "\0" in value:
            raise StateError(f"{key} {value!r} is not an absolute path")
        return Path(value)

    def timestamp(self, key: str) -> str:
        from datetime import datetime  # noqa: PLC0415 - see _read_toml

        value = self.text(key)
        try:
            datetime.fromisoformat(value)
        except ValueError:
            raise StateError(f"{key} {value!r} is not an ISO 8601 time") from None
        return value

    def integer(self, key: str, low: int = 0) -> int:
        value: int = self._get(key, int, "an integer")
        if value < low:
            raise StateError(f"{key} {value} is out of range")
        return value

    def choice(self, key: str, choices: tuple[StrEnum, ...]) -> str:
        value = self.text(key)
        if value not in choices:
            raise StateError(f"{key} {value!r} is not one of {', '.join(choices)}")
        return value

    def integers(self, key: str, low: int = 0) -> tuple[int, ...]:
        items: list[Any] = self._get(key, list, "a list")
        if any(type(item) is not int or item < low for item in items):
            raise StateError(f"{key} must be a list of integers >= {low}")
        return tuple(items)

    def texts(self, key: str, pattern: re.Pattern[str] | None = None) -> tuple[str, ...]:
        items: list[Any] = self._get(key, list, "a list")
        for item in items:
            if type(item) is not str or (pattern is not None and not pattern.fullmatch(item)):
                raise StateError(f"{key} has a malformed entry {item!r}")
        return tuple(items)


# -- processes --------------------------------------------------------------------


def process_start_time(pid: int, proc: Path = PROC) -> int | None:
    """Field 22 of /proc/<pid>/stat (clock ticks after boot); None if gone.

    comm (field 2) is in parentheses and may itself contain spaces and
    parentheses, so the fields are counted from the last ")".  A zombie has
    exited: it counts as gone.
    """
    fields = _stat_fields(pid, proc)
    if fields is None or fields[_STAT_STATE] in ("Z", "X"):
        return None
    try:
        return int(fields[_STAT_STARTTIME])
    except (IndexError, ValueError):
        return None


def is_alive(pid: int, start: int, proc: Path = PROC) -> bool:
    """The process runs and is the one recorded (same start time)."""
    return pid > 0 and start > 0 and process_start_time(pid, proc) == start


def rss_kib(pid: int, proc: Path = PROC) -> int | None:
    """Resident memory from /proc/<pid>/status; None if gone or unknown."""
    if pid <= 0:
        return None
    try:
        text = (proc / str(pid) / "status").read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                return int(parts[1])
    return None  # kernel threads and zombies have no VmRSS


def open_verified(pid: int, start: int, proc: Path = PROC) -> int | None:
    """A pidfd for the recorded process, or None if it is gone or the pid reused.

    The start time is checked after the pidfd is open: from then on the fd
    names that one process, so a signal sent through it cannot hit a
    process that got the pid later.
    """
    if pid <= 0 or start <= 0:
        return None
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:  # gone (ESRCH), or no pidfd support
        return None
    if process_start_time(pid, proc) != start:
        os.close(pidfd)
        return None
    return pidfd


def _stat_fields(pid: int, proc: Path) -> list[str] | None:
    if pid <= 0:
        return None
    try:
        raw = (proc / str(pid) / "stat").read_bytes()
    except OSError:
        return None
    _, paren, rest = raw.rpartition(b")")
    if not paren:
        return None
    return rest.decode("ascii", errors="replace").split()


# -- agent homes --------------------------------------------------------------------


def home_record_path(agent_home: Path) -> Path:
    return agent_home.with_name(agent_home.name + HOME_RECORD_SUFFIX)


def write_home_record(agent_home: Path, project: Path, agent: str) -> None:
    """Record which project a home belongs to, beside it (raises OSError)."""
    if not project.is_absolute():
        raise ValueError(f"project {project} is not absolute")
    import tomli_w  # noqa: PLC0415 - see _read_toml

    data = {"version": HOME_RECORD_VERSION, "agent": agent, "project": str(project)}
    write_atomic(home_record_path(agent_home), tomli_w.dumps(data).encode())


def scan_homes(
    data_home: Path,
    exists: Callable[[Path], bool | None] | None = None,
) -> list[HomeRecord]:
    """Every home under ``<data_home>/<agent>-microvm/``, with what its record says.

    ``exists`` answers whether a project is still there (True/False, None
    when it cannot tell); tests pass their own.
    """
    check = exists or project_exists
    records = []
    for agent_dir in _subdirs(data_home):
        if not agent_dir.name.endswith("-microvm"):
            continue
        agent = agent_dir.name.removesuffix("-microvm")
        for path in _subdirs(agent_dir):
            records.append(_home_record(path, agent, data_home, check))
    return records


def project_exists(project: Path) -> bool | None:
    """False only when the path is certainly gone: an unreadable or
    unmounted disk must never make a home look orphaned."""
    try:
        os.stat(project)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError:
        return None
    return True


def _home_record(
    path: Path, agent: str, data_home: Path, exists: Callable[[Path], bool | None]
) -> HomeRecord:
    try:
        data = _read_toml(home_record_path(path))
        fields = _Fields(data)
        version = data.get("version")
        if type(version) is not int or version != HOME_RECORD_VERSION:
            raise StateError(f"unsupported record version {version!r}")
        project = fields.path("project")
        recorded_agent = fields.text("agent")
    except StateError as err:
        return HomeRecord(path, agent, None, None, False, f"record: {err}")
    if recorded_agent != agent or home.agent_home(agent, project, data_home) != path:
        problem = f"record names {project} ({recorded_agent}), whose home is elsewhere"
        return HomeRecord(path, agent, project, None, False, problem)
    return HomeRecord(path, agent, project, exists(project), True, None)


def _subdirs(directory: Path) -> list[Path]:
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    found = []
    for name in names:
        path = directory / name
        with contextlib.suppress(OSError):
            if stat.S_ISDIR(path.lstat().st_mode):
                found.append(path)
    return found


# -- files ----------------------------------------------------------------------------


def _read_toml(path: Path) -> dict[str, Any]:
    # tomllib, tomli_w and datetime are imported where a state is read or
    # written: `ps` and `gc` without instances need none of them (bench/startup).
    import tomllib  # noqa: PLC0415

    try:
        with path.open("rb") as file:
            raw = file.read(MAX_STATE_BYTES + 1)
    except FileNotFoundError:
        raise StateError(f"no {path.name}") from None
    except OSError as err:
        raise StateError(f"cannot read {path.name}: {err.strerror}") from None
    if len(raw) > MAX_STATE_BYTES:
        raise StateError(f"{path.name} is larger than {MAX_STATE_BYTES} bytes")
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise StateError(f"{path.name} is not UTF-8") from None
    except tomllib.TOMLDecodeError as err:
        raise StateError(f"{path.name} is not valid TOML ({err})") from None
    except RecursionError:
        # tomllib recurses per nesting level: a file of "[[[[..." deep enough
        # exhausts the stack.  Nothing this runner writes nests at all.
        raise StateError(f"{path.name} is nested too deeply to be ours") from None
