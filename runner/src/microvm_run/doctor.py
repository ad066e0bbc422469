"""microvm-run doctor: check the host's prerequisites, one line per check.

Each check says ok, warn (works, but worse than it could) or FAIL (a launch
will not work), what it looked at, and for anything not ok how to fix it.
Paths into /dev and /proc come in through DoctorPaths so tests can point
them at files of their own.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from microvm_run import host, openfiles, process, state
from microvm_run.qemu import Accel
from microvm_run.spec import Spec, SpecError, load_spec

OK = "ok"
WARN = "warn"
FAIL = "FAIL"
MIN_FREE_BYTES = 1 << 30
VERSION_TIMEOUT_S = 10.0

# Launches the flavor at this spec with this accelerator, running `true`
# instead of the agent, and returns the exit status (cli.py provides it).
BootFn = Callable[[Path, str], int]


@dataclass(frozen=True)
class Check:
    status: str  # OK, WARN or FAIL
    name: str
    detail: str
    fix: str = ""

    def line(self) -> str:
        text = f"{self.status:<4}  {self.name}: {self.detail}"
        if self.fix and self.status != OK:
            text += f"  — {self.fix}"
        return text


@dataclass(frozen=True)
class DoctorPaths:
    kvm: Path = Path("/dev/kvm")
    proc_sys: Path = Path("/proc/sys")


def iter_checks(
    environ: Mapping[str, str],
    *,
    spec_path: str | None,
    accel: Accel = Accel.KVM,
    boot: BootFn | None = None,
    uid: int | None = None,
    paths: DoctorPaths | None = None,
) -> Iterator[Check]:
    """The checks one by one, so each line shows before a slow one (--boot) runs."""
    where = paths or DoctorPaths()
    user = os.getuid() if uid is None else uid
    yield check_kvm(where.kvm, accel)
    if accel == Accel.TCG:
        yield check_tsc(host.tsc_khz())
    yield from check_userns(where.proc_sys, environ, user)
    spec_checks, spec = check_spec(spec_path)
    yield from spec_checks
    if spec is not None:
        yield from check_versions(spec, environ)
    yield check_user_manager(environ)
    yield from check_runtime_dir(environ, user)
    data_home = host.data_home(environ)
    yield check_writable("agent homes", data_home, "set XDG_DATA_HOME or AGENT_HOME")
    yield check_free_space("free space for agent homes", data_home)
    yield check_free_space("free space for runtime files", host.runtime_base(environ, user))
    yield check_open_files(Path(environ.get("WORK_DIR") or os.getcwd()), openfiles.hard_limit())
    if boot is not None:
        yield check_boot(boot, spec, accel)


def exit_status(checks: list[Check]) -> int:
    return 1 if any(check.status == FAIL for check in checks) else 0


def check_kvm(kvm: Path, accel: Accel) -> Check:
    # Without KVM, TCG still works: then a missing /dev/kvm is worth a warning only.
    bad = FAIL if accel == Accel.KVM else WARN
    try:
        info = kvm.stat()
    except FileNotFoundError:
        return Check(
            bad,
            str(kvm),
            "does not exist",
            "enable VT-x/AMD-V in the firmware and load kvm_intel or kvm_amd, "
            "or use --accel tcg (slow)",
        )
    except OSError as err:
        return Check(bad, str(kvm), f"cannot inspect: {err.strerror}", "use --accel tcg (slow)")
    if not stat.S_ISCHR(info.st_mode):
        return Check(bad, str(kvm), "is not a character device", "reload the kvm module")
    if not os.access(kvm, os.R_OK | os.W_OK):
        return Check(
            bad,
            str(kvm),
            "exists but you cannot read and write it",
            "sudo usermod -aG kvm $USER, then log in again; or use --accel tcg",
        )
    return Check(OK, str(kvm), "readable and writable")


def check_userns(proc_sys: Path, environ: Mapping[str, str], uid: int) -> list[Check]:
    """Unprivileged user namespaces and newuidmap/newgidmap.

    virtiofsd runs with --sandbox=namespace and, unless run by root, maps
    the user with --uid-map/--gid-map, which needs both: without them it
    exits before creating its socket.
    """
    name = "user namespaces"
    if uid == 0:
        return [Check(OK, name, "not needed as root (virtiofsd runs without ID maps)")]
    checks = []
    clone = _read_int(proc_sys / "kernel" / "unprivileged_userns_clone")
    limit = _read_int(proc_sys / "user" / "max_user_namespaces")
    if clone == 0:
        checks.append(
            Check(
                FAIL,
                name,
                "kernel.unprivileged_userns_clone = 0; virtiofsd's sandbox needs them",
                "sudo sysctl kernel.unprivileged_userns_clone=1",
            )
        )
    elif limit == 0:
        checks.append(
            Check(
                FAIL,
                name,
                "user.max_user_namespaces = 0; virtiofsd's sandbox needs them",
                "sudo sysctl user.max_user_namespaces=15000",
            )
        )
    else:
        checks.append(Check(OK, name, "unprivileged user namespaces allowed"))
    if _read_int(proc_sys / "kernel" / "apparmor_restrict_unprivileged_userns") == 1:
        checks.append(
            Check(
                WARN,
                "AppArmor",
                "restricts unprivileged user namespaces; virtiofsd may fail to start",
                "give virtiofsd an AppArmor profile that allows userns, or "
                "sudo sysctl kernel.apparmor_restrict_unprivileged_userns=0",
            )
        )
    missing = [tool for tool in ("newuidmap", "newgidmap") if host.which(tool, environ) is None]
    if missing:
        checks.append(
            Check(
                FAIL,
                "newuidmap",
                f"{' and '.join(missing)} not on PATH; virtiofsd's --uid-map needs them",
                "install the uidmap package (Debian/Ubuntu) or shadow",
            )
        )
    else:
        checks.append(Check(OK, "newuidmap", "newuidmap and newgidmap on PATH"))
    return checks


def check_spec(spec_path: str | None) -> tuple[list[Check], Spec | None]:
    if not spec_path:
        fix = "pass --spec FILE or set MICROVM_RUN_SPEC (the flavor packages do)"
        return [Check(FAIL, "spec", "none given", fix)], None
    try:
        spec = load_spec(Path(spec_path))
    except SpecError as err:
        return [Check(FAIL, "spec", str(err), "rebuild the flavor or fix --spec")], None
    checks = [Check(OK, "spec", f"{spec.path} ({spec.agent}, {spec.machine})")]
    for what, path, mode in (
        ("qemu", spec.qemu, os.X_OK),
        ("virtiofsd", spec.virtiofsd, os.X_OK),
        ("kernel", spec.kernel, os.R_OK),
        ("initrd", spec.initrd, os.R_OK),
    ):
        if os.access(path, mode):
            checks.append(Check(OK, what, str(path)))
        else:
            adjective = "executable" if mode == os.X_OK else "readable"
            fix = "the spec points into a store path that is gone: rebuild the flavor"
            checks.append(Check(FAIL, what, f"{path} is missing or not {adjective}", fix))
    return checks, spec


def check_versions(spec: Spec, environ: Mapping[str, str]) -> list[Check]:
    env = process.without(environ, spec.api_key_vars)
    checks = []
    for what, program in (("qemu --version", spec.qemu), ("virtiofsd --version", spec.virtiofsd)):
        if not os.access(program, os.X_OK):
            continue  # already reported by check_spec
        try:
            result = process.run([str(program), "--version"], env=env, timeout=VERSION_TIMEOUT_S)
        except process.ProcessError as err:
            checks.append(Check(FAIL, what, str(err), "reinstall it or rebuild the flavor"))
            continue
        output = (result.stdout.strip() or result.stderr.strip()).splitlines()
        first = output[0] if output else "no output"
        if result.returncode != 0:
            detail = f"exit status {result.returncode}: {first}"
            checks.append(Check(FAIL, what, detail, "reinstall it or rebuild the flavor"))
        else:
            checks.append(Check(OK, what, first))
    return checks


def check_user_manager(environ: Mapping[str, str]) -> Check:
    reachable, reason = host.user_manager(environ)
    if reachable:
        return Check(OK, "systemd user manager", reason)
    return Check(
        WARN,
        "systemd user manager",
        f"{reason}; virtiofsd will run as child processes of microvm-run "
        "(works; systemctl --user will not show them)",
        "log in through a systemd session, or loginctl enable-linger $USER",
    )


def check_runtime_dir(environ: Mapping[str, str], uid: int) -> list[Check]:
    name = "XDG_RUNTIME_DIR"
    base = host.runtime_base(environ, uid)
    fix = "log in through a systemd/logind session, or point XDG_RUNTIME_DIR at a 0700 dir you own"
    value = environ.get("XDG_RUNTIME_DIR")
    checks = []
    if not value or not Path(value).is_absolute():
        why = "not set" if not value else f"{value!r} is not absolute"
        detail = f"{why}; runtime files (and the API key until boot) go to {base}, maybe on disk"
        checks.append(Check(WARN, name, detail, fix))
    else:
        try:
            info = Path(value).stat()
        except OSError as err:
            checks.append(Check(WARN, name, f"{value}: {err.strerror}", fix))
        else:
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != uid:
                checks.append(Check(WARN, name, f"{value} is not a directory you own", fix))
            elif stat.S_IMODE(info.st_mode) != 0o700:
                mode = oct(stat.S_IMODE(info.st_mode))
                checks.append(Check(WARN, name, f"{value} has mode {mode}, not 0o700", fix))
            else:
                checks.append(Check(OK, name, f"{value} (yours, 0700)"))
    problem = state.base_problem(base, uid)
    if problem:
        checks.append(Check(FAIL, "runtime base", problem, "remove it; microvm-run recreates it"))
    return checks


def check_writable(name: str, path: Path, fix: str) -> Check:
    existing = _nearest_existing(path)
    if existing is None:
        return Check(FAIL, name, f"no existing parent of {path}", fix)
    if not existing.is_dir():
        return Check(FAIL, name, f"{existing} is not a directory", fix)
    if not os.access(existing, os.W_OK | os.X_OK):
        return Check(FAIL, name, f"{existing} is not writable", fix)
    if existing == path:
        return Check(OK, name, f"{path} is writable")
    return Check(OK, name, f"{path} can be created")


def check_free_space(name: str, path: Path) -> Check:
    existing = _nearest_existing(path)
    if existing is None:
        return Check(WARN, name, f"cannot find a file system for {path}")
    try:
        info = os.statvfs(existing)
    except OSError as err:
        return Check(WARN, name, f"statvfs {existing}: {err.strerror}")
    free = info.f_bavail * info.f_frsize
    detail = f"{free / (1 << 30):.1f} GiB free at {existing}"
    if free < MIN_FREE_BYTES:
        return Check(WARN, name, detail, "free some space: agents and their caches need room")
    return Check(OK, name, detail)


def check_tsc(khz: int | None) -> Check:
    """Under TCG the guest's TSC is the host's; the runner tells the guest its rate."""
    name = "guest clock"
    if khz is None:
        return Check(
            WARN,
            name,
            "cannot read the host's TSC frequency; a TCG guest's clock may run fast or slow",
            "use KVM, where the guest calibrates its own clock",
        )
    return Check(OK, name, f"host TSC {khz / 1000:.3f} MHz, passed to TCG guests")


def check_open_files(work_dir: Path, limit: int | None) -> Check:
    """virtiofsd keeps a descriptor per file the guest has seen: enough for this project?"""
    name = "open files"
    if limit is None:
        return Check(OK, name, "no hard limit")
    room = openfiles.budget(limit)
    seen = openfiles.count_entries(work_dir, room + 1)
    if seen > room:
        return Check(
            WARN,
            name,
            f"{work_dir} has more than {room} files and directories, more than virtiofsd "
            f"can keep open (hard limit {limit}); the guest would see files vanish",
            openfiles.FIX,
        )
    return Check(OK, name, f"hard limit {limit}; {work_dir} has {seen} files and directories")


def check_boot(
    boot: BootFn, spec: Spec | None, accel: str, clock: Callable[[], float] = time.monotonic
) -> Check:
    name = "boot"
    if spec is None:
        return Check(FAIL, name, "skipped: the spec did not load", "fix the spec first")
    started = clock()
    try:
        code = boot(spec.path, accel)
    except Exception as err:
        return Check(FAIL, name, f"the launch failed: {err}", "run the flavor by hand to see why")
    took = clock() - started
    if code != 0:
        return Check(
            FAIL,
            name,
            f"exit status {code} after {took:.1f} s (accel {accel})",
            "see the messages above; with KVM trouble try --accel tcg",
        )
    return Check(OK, name, f"booted and ran `true` in {took:.1f} s (accel {accel})")


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _nearest_existing(path: Path) -> Path | None:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return None
