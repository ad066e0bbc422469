"""Can this host launch?  Checks before a launch creates anything (reads only).

Each refusal is a PlanError: one line for the user, exit 2, nothing written.
``--dry-run`` skips them: it prints the plan on any host.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path

from microvm_run.plan import PlanError

TYPE_CHECKING = False  # typing's, without importing typing (3 ms): see tests/unit/test_startup.py
if TYPE_CHECKING:
    from microvm_run.spec import Spec

# Sockets, the launch file and logs need little; less than this is "full".
MIN_RUNTIME_FREE = 1024 * 1024


def check(
    spec: Spec,
    accel: str,
    *,
    private_dirs: Sequence[Path],
    runtime_base: Path,
    work_dir: Path,
    environ: Mapping[str, str],
    trust_git: bool,
) -> None:
    """Every check, in the order a user fixes them."""
    check_runnable(spec, accel)
    check_dirs(private_dirs, runtime_base)
    check_not_root(environ)
    if trust_git and others_running(runtime_base, work_dir):
        raise PlanError(
            "--trust-git while another VM runs on this project (or a directory containing "
            "it or inside it): its agent could still change .git; stop it first"
        )


def check_runnable(spec: Spec, accel: str) -> None:
    """The flavor's binaries and, for KVM, /dev/kvm."""
    for what, path in (("qemu", spec.qemu), ("virtiofsd", spec.virtiofsd)):
        if not os.access(path, os.X_OK):
            raise PlanError(f"{what} {path} is missing or not executable")
    for what, path in (("kernel", spec.kernel), ("initrd", spec.initrd)):
        if not os.access(path, os.R_OK):
            raise PlanError(f"{what} {path} is missing or not readable")
    if accel == "kvm":
        kvm = Path("/dev/kvm")
        if not kvm.exists():
            raise PlanError(
                "/dev/kvm does not exist: enable virtualisation (BIOS, kvm_intel/kvm_amd) "
                "or use --accel tcg (slow)"
            )
        if not os.access(kvm, os.R_OK | os.W_OK):
            raise PlanError(
                "/dev/kvm is not accessible: add yourself to its group "
                "(sudo usermod -aG kvm $USER, then log in again) or use --accel tcg"
            )


def check_dirs(private_dirs: Sequence[Path], runtime_base: Path) -> None:
    """The dirs the launch writes to (plan.private_dirs, the runtime base)."""
    from microvm_run import state  # noqa: PLC0415 - only a launch needs it

    for directory in private_dirs:
        _check_share_root(directory)
        existing = _nearest_existing(directory)
        if existing is None or not os.access(existing, os.W_OK | os.X_OK):
            raise PlanError(
                f"AGENT_HOME {directory} is not writable ({existing} is not); "
                "fix its permissions or set AGENT_HOME elsewhere"
            )
    problem = state.base_problem(runtime_base, os.getuid())
    if problem:
        raise PlanError(f"runtime dir: {problem}")
    base = _nearest_existing(runtime_base)
    if base is not None:
        try:
            stats = os.statvfs(base)
        except OSError:
            return
        if stats.f_bavail * stats.f_frsize < MIN_RUNTIME_FREE:
            raise PlanError(
                f"the runtime dir's file system is full ({base}); "
                "free space there, or run microvm-run gc"
            )


def _check_share_root(directory: Path) -> None:
    """A share root that exists must be a real directory of this user.

    The guest may have replaced it by a symlink (its target would be shared
    read-write) or another user may own it.
    """
    try:
        info = directory.lstat()
    except FileNotFoundError:
        return
    except OSError as err:
        raise PlanError(f"cannot inspect {directory}: {err.strerror}") from None
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise PlanError(f"{directory} is not a real directory (a symlink?); remove it")
    if info.st_uid != os.getuid():
        raise PlanError(f"{directory} is owned by uid {info.st_uid}, not by you")


def _nearest_existing(path: Path) -> Path | None:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return None


def check_not_root(environ: Mapping[str, str]) -> None:
    """Running as root gives the guest root's hands on the shared files.

    virtiofsd refuses ID maps when started by root, so guest files would be
    root's, and anything the guest plants is trusted by root.
    MICROVM_RUN_ALLOW_ROOT=1 is for hosts whose Nix works only as root (and
    this project's own dev-shell tests); README says what it costs.
    """
    if os.geteuid() == 0 and environ.get("MICROVM_RUN_ALLOW_ROOT") != "1":
        raise PlanError(
            "refusing to run as root: virtiofsd would write the shares as root (set-uid "
            "root files, any owner); run microvm-run as your own user"
        )


def others_running(runtime_base: Path, work_dir: Path) -> bool:
    """Does another VM run on this project now?  Its agent could change the
    files between a check (the dev shell's consent, --trust-git) and their
    use.  A VM on a directory that contains this project, or lies inside it,
    counts too: its agent writes these files as well."""
    from microvm_run import state  # noqa: PLC0415
    from microvm_run.evalguard import projects_overlap  # noqa: PLC0415

    return any(
        entry.state is not None
        and projects_overlap(entry.state.project, work_dir)
        and state.is_alive(entry.state.runner_pid, entry.state.runner_start)
        for entry in state.scan(runtime_base)
    )
