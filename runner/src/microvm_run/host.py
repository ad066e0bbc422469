"""Facts about the host, gathered before planning (reads only, no processes)."""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from microvm_run import home, localdirs

TYPE_CHECKING = False  # typing's, without importing typing (3 ms): see tests/unit/test_startup.py
if TYPE_CHECKING:
    from microvm_run.plan import HostFacts
    from microvm_run.spec import Spec

# plan (and with it spec, netpolicy, qemu, ...) is imported only by the
# functions that plan: `ps`, `stop` and `gc` use this module's directory
# helpers and stay quick.


class HostError(ValueError):
    """What the host has that refuses a launch (the project directory, the
    agent home, the allowlist file); the message is one line for the user."""


def resolve_work_dir(
    raw: str,
    user_home: Path | None,
    allow_home: bool,
    runner_dirs: Sequence[tuple[str, Path]] = (),
) -> Path:
    """The project directory, resolved; refuse what must never be shared.

    ``runner_dirs``: (what, path) of the runner's own files (its state with
    the dev-shell consent, its config with the allowlists, ...): the guest
    writes the project, so a project that holds them would let the agent
    rewrite what the user allowed.
    """
    path = Path(raw).expanduser()
    try:
        resolved = path.resolve(strict=True)
    except FileNotFoundError:
        raise HostError(f"WORK_DIR {raw} does not exist") from None
    except (OSError, RuntimeError) as err:
        raise HostError(f"WORK_DIR {raw} cannot be resolved: {err}") from None
    if not resolved.is_dir():
        raise HostError(f"WORK_DIR {raw} is not a directory")
    owner = resolved.stat().st_uid
    if owner != os.getuid():
        # The guest writes it as you; someone else's directory is not yours to hand over.
        raise HostError(f"WORK_DIR {raw} is owned by uid {owner}, not by you")
    if not os.access(resolved, os.R_OK | os.X_OK):
        raise HostError(f"WORK_DIR {raw} is not readable")
    if resolved == Path("/"):
        raise HostError("WORK_DIR is /: refusing to share the whole file system")
    if user_home is not None and resolved == user_home.resolve() and not allow_home:
        raise HostError(
            f"WORK_DIR is your home directory {resolved}: refusing to share it "
            "(keys, tokens, history); pass --allow-home to do it anyway"
        )
    if (
        user_home is not None
        and resolved != user_home.resolve()
        and user_home.resolve().is_relative_to(resolved)
    ):
        raise HostError(f"WORK_DIR {resolved} contains your home directory: refusing to share it")
    for what, directory in runner_dirs:
        inside = directory.resolve()
        if inside.is_relative_to(resolved):
            raise HostError(
                f"WORK_DIR {resolved} contains the runner's {what} {inside}: the agent could "
                "rewrite what you allowed; run from the project directory, or move it "
                "(XDG_STATE_HOME, XDG_CONFIG_HOME, XDG_CACHE_HOME, XDG_RUNTIME_DIR)"
            )
    return resolved


def runner_dirs(environ: Mapping[str, str], uid: int) -> tuple[tuple[str, Path], ...]:
    """The runner's own directories, which no project may be or contain."""
    return (
        ("state dir", state_home(environ) / "microvm-run"),
        ("config dir", config_home(environ) / "microvm-run"),
        ("cache dir", cache_home(environ) / "microvm-run"),
        ("runtime dir", runtime_base(environ, uid)),
    )


def resolve_agent_home(spec: Spec, work_dir: Path, environ: Mapping[str, str]) -> Path:
    """The agent home, resolved now (as the project is): a symlink on its
    path, which the agent could later swap if it lies in a share, is
    refused at launch (shareroots), and a home inside the project is refused."""
    override = environ.get("AGENT_HOME")
    if not override:
        return home.agent_home(spec.agent, work_dir, data_home(environ).resolve())
    given = Path(os.path.normpath(Path(override).expanduser().absolute()))
    # The directories on the way, not the home itself: a home that is a
    # symlink is refused, never followed.
    resolved = given.parent.resolve() / given.name
    if resolved.is_relative_to(work_dir):
        raise HostError(
            f"AGENT_HOME {resolved} lies inside the project {work_dir}: the agent could replace "
            "it with a link to any of your directories; set it elsewhere"
        )
    return resolved


def _xdg(environ: Mapping[str, str], variable: str, *default: str) -> Path:
    """An XDG base directory from ``environ``: the variable when it is an
    absolute path, else the spec's default under HOME.  Not xdg-base-dirs:
    it reads os.environ only, and every lookup here takes the environment
    it is given (the tests' and the subcommands' own)."""
    value = environ.get(variable)
    if value and Path(value).is_absolute():
        return Path(value)
    return Path(environ.get("HOME") or Path.home()).joinpath(*default)


def data_home(environ: Mapping[str, str]) -> Path:
    return _xdg(environ, "XDG_DATA_HOME", ".local", "share")


def runtime_base(environ: Mapping[str, str], uid: int) -> Path:
    value = environ.get("XDG_RUNTIME_DIR")
    if value and Path(value).is_absolute():
        return Path(value) / "microvm-run"
    # No runtime dir (containers, some CI): a per-user dir under /tmp whose
    # ownership and mode launch.py checks before use.  Anyone can create
    # that name first; then the runner's own state dir takes its place, so
    # another local user cannot block launch, ps or gc (all decide the same).
    shared = Path("/tmp") / f"microvm-run-{uid}"
    try:
        info = shared.lstat()
    except FileNotFoundError:
        return shared
    except OSError:
        return state_home(environ) / "microvm-run" / "runtime"
    if stat.S_ISDIR(info.st_mode) and info.st_uid == uid:
        return shared
    return state_home(environ) / "microvm-run" / "runtime"


def user_manager(environ: Mapping[str, str]) -> tuple[bool, str]:
    """Does a systemd user manager answer?  Connect to its private socket.

    systemd-run --user and systemctl --user reach the manager through
    $XDG_RUNTIME_DIR/systemd/private when there is no session bus, so a
    successful connect there is the honest, cheap test (no process started).
    """
    if which("systemd-run", environ) is None or which("systemctl", environ) is None:
        return False, "systemd-run/systemctl not on PATH"
    runtime = environ.get("XDG_RUNTIME_DIR")
    if not runtime:
        return False, "XDG_RUNTIME_DIR is not set"
    private = Path(runtime) / "systemd" / "private"
    # _socket is the C module socket.py wraps, with the same socket type:
    # importing socket.py (its enums, selectors) costs about 3 ms of every
    # launch and --dry-run (bench/startup).
    import _socket  # noqa: PLC0415 - `ps` and `gc` without instances never get here

    probe = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(private))
    except OSError as err:
        return False, f"no user manager at {private} ({err.strerror or err})"
    finally:
        probe.close()
    return True, f"user manager at {private}"


def which(program: str, environ: Mapping[str, str]) -> str | None:
    """Where ``environ``'s PATH finds an executable ``program`` (a name with a
    / is taken as it is), or None.  The runner's one PATH lookup.  Not
    shutil.which: it reads the runner's own PATH unless told, and importing
    shutil costs more than this."""
    if os.sep in program:
        return program if _executable(program) else None
    for entry in environ.get("PATH", os.defpath).split(os.pathsep):
        candidate = os.path.join(entry or ".", program)
        if _executable(candidate):
            return candidate
    return None


def _executable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def state_home(environ: Mapping[str, str]) -> Path:
    return _xdg(environ, "XDG_STATE_HOME", ".local", "state")


def cache_home(environ: Mapping[str, str]) -> Path:
    return _xdg(environ, "XDG_CACHE_HOME", ".cache")


def project_key(work_dir: Path) -> str:
    """``<basename>-<hash>``: how the runner's own per-project files are named."""
    return f"{home.project_basename(work_dir)}-{home.project_hash(work_dir)}"


def project_state_dir(work_dir: Path, environ: Mapping[str, str]) -> Path:
    """The runner's own state for a project: never shared with the guest.

    The dev-shell cache, its logs and the user's consent live here, outside
    anything the guest can write (the project, the agent home).
    """
    return state_home(environ) / "microvm-run" / "projects" / project_key(work_dir)


def cri_storage_dir(agent: str, work_dir: Path, environ: Mapping[str, str]) -> Path:
    """Container storage of one agent on one project: a share root of its own.

    Not inside the agent home: the guest could replace a share root there
    with a symlink, and the next launch would share the symlink's target.
    """
    return cache_home(environ) / "microvm-run" / "cri-storage" / agent / project_key(work_dir)


def config_home(environ: Mapping[str, str]) -> Path:
    return _xdg(environ, "XDG_CONFIG_HOME", ".config")


def project_allow_file(agent: str, work_dir: Path, environ: Mapping[str, str]) -> Path:
    """The per-project allowlist: in the user's config, never in the project.

    The agent can write to the project; a list it could extend itself would
    be no list.  Named like the agent home: <agent>/<basename>-<hash>.allow.
    """
    name = f"{home.project_basename(work_dir)}-{home.project_hash(work_dir)}.allow"
    return config_home(environ) / "microvm-run" / "allow" / agent / name


def read_project_allow(path: Path) -> tuple[str, ...]:
    from microvm_run import netpolicy  # noqa: PLC0415 - see the note at the imports

    try:
        text = path.read_text()
    except FileNotFoundError:
        return ()
    except (OSError, UnicodeDecodeError) as err:
        raise HostError(f"cannot read the project allowlist {path}: {err}") from None

    try:
        # Checked here, where the file and line are known.
        netpolicy.parse_allow_file(text, str(path))
    except netpolicy.PolicyError as err:
        raise HostError(str(err)) from None
    return tuple(entry for _, entry in netpolicy.allow_file_entries(text))


def project_lockfiles(work_dir: Path) -> tuple[str, ...]:
    """Names at the project's top level that an allowlist preset looks for.

    Names only (one directory listing): nothing in the project is opened.
    """
    from microvm_run import presets  # noqa: PLC0415

    try:
        with os.scandir(work_dir) as entries:
            return tuple(sorted(e.name for e in entries if presets.is_lockfile(e.name)))
    except OSError:
        return ()


def terminal_size() -> tuple[int, int] | None:
    """(rows, columns) of the runner's terminal, if it has one."""
    for stream in (sys.stdin, sys.stdout):
        try:
            size = os.get_terminal_size(stream.fileno())
        except (OSError, ValueError, AttributeError):
            continue
        if size.lines > 0 and size.columns > 0:
            return size.lines, size.columns
    return None


# A TSC frequency outside this range is a misread, not a CPU.
_TSC_KHZ_RANGE = (100_000, 10_000_000)


def tsc_khz(
    sysfs: Path = Path("/sys/devices/system/cpu/cpu0/tsc_freq_khz"),
    cpuinfo: Path = Path("/proc/cpuinfo"),
) -> int | None:
    """The host's TSC frequency in kHz, or None if it cannot be read.

    Some kernels export it in sysfs; otherwise /proc/cpuinfo has it.
    """
    try:
        with sysfs.open("rb") as file:
            value = int(file.read(64).decode().strip())
        if _TSC_KHZ_RANGE[0] <= value <= _TSC_KHZ_RANGE[1]:
            return value
    except (OSError, ValueError, UnicodeDecodeError):
        pass
    try:
        with cpuinfo.open("rb") as file:
            # The first CPU's block is enough; many-core hosts have long files.
            text = file.read(16384).decode(errors="replace")
    except OSError:
        return None
    return tsc_khz_from_cpuinfo(text)


def tsc_khz_from_cpuinfo(text: str) -> int | None:
    """The TSC kHz from the first CPU of /proc/cpuinfo (x86).

    ``bogomips`` is twice the TSC frequency in MHz on x86: the kernel sets
    loops_per_jiffy from tsc_khz (tsc.c get_loops_per_jiffy) and prints it
    as bogomips (lpj / (500000 / HZ)).  ``cpu MHz`` is the current clock
    under frequency scaling, not the TSC's, so it is only the last resort.
    """
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break  # the end of the first CPU's block
            continue
        name, sep, value = line.partition(":")
        if sep:
            fields.setdefault(name.strip(), value.strip())
    if "tsc" not in fields.get("flags", "").split():
        return None
    for name, khz_per_unit in (("bogomips", 500), ("cpu MHz", 1000)):
        try:
            khz = round(float(fields[name]) * khz_per_unit)
        except (KeyError, ValueError):
            continue
        if _TSC_KHZ_RANGE[0] <= khz <= _TSC_KHZ_RANGE[1]:
            return khz
    return None


def new_instance_id() -> str:
    # 32 random bits: collisions are also caught by the exclusive mkdir.
    return os.urandom(4).hex()


def gather(
    spec: Spec,
    environ: Mapping[str, str],
    *,
    work_dir_arg: str | None,
    allow_home: bool,
    instance_id: str | None = None,
) -> HostFacts:
    from microvm_run.plan import HostFacts  # noqa: PLC0415 - see the note at the imports

    raw_work = work_dir_arg or environ.get("WORK_DIR") or os.getcwd()
    user_home = Path(environ["HOME"]) if environ.get("HOME") else None
    uid, gid = os.getuid(), os.getgid()
    work_dir = resolve_work_dir(raw_work, user_home, allow_home, runner_dirs(environ, uid))
    manager, reason = user_manager(environ)
    allow_file = project_allow_file(spec.agent, work_dir, environ)
    return HostFacts(
        uid=uid,
        gid=gid,
        work_dir=work_dir,
        agent_home=resolve_agent_home(spec, work_dir, environ),
        state_dir=project_state_dir(work_dir, environ),
        cri_storage=cri_storage_dir(spec.agent, work_dir, environ),
        runtime_base=runtime_base(environ, uid),
        instance_id=instance_id or new_instance_id(),
        environ=environ,
        user_manager=manager,
        user_manager_reason=reason,
        project_allow_file=allow_file,
        project_allow=read_project_allow(allow_file),
        project_lockfiles=project_lockfiles(work_dir),
        egress_log=state_home(environ) / "microvm-run" / "egress.log",
        terminal_size=terminal_size(),
        tsc_khz=tsc_khz() if spec.machine == "microvm" else None,
        python=Path(sys.executable),
        relay=Path(__file__).with_name("relay.py"),
        gitmask=Path(__file__).with_name("gitmask.py"),
        implied_local_dirs=localdirs.implied(work_dir),
        local_slot=localdirs.free_slot(project_state_dir(work_dir, environ)),
    )
