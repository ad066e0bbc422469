"""Plan a launch as plain data: spec + options + host facts -> LaunchPlan.

Pure: no file system access, no processes, no clock, no randomness.  Every
fact about the host (uid, resolved paths, whether a systemd user manager
answers, the instance id) comes in as an argument, so the plan is what
``--dry-run`` prints and what the tests check.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from microvm_run import contract, home, qemu, virtiofsd
from microvm_run.spec import Share, Spec

ACCELS = ("kvm", "tcg")
NETS = ("user", "none")
SUPERVISORS = ("auto", "systemd", "child")
# sun_path is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107
# Passed through from the host so the agent's TUI renders as it does there.
TERMINAL_VARS = ("TERM", "COLORTERM", "LANG", "LC_ALL")
# Container runtimes the cri guest module can start (modules/cri.nix).
CRI_RUNTIMES = ("docker", "podman", "containerd", "crun", "cri-o")


class PlanError(ValueError):
    """Input that cannot be launched; the message is one line for the user."""


@dataclass(frozen=True)
class RunOptions:
    """What the user asked for (CLI flags and their environment variables)."""

    accel: str = "kvm"
    net: str = "user"
    supervisor: str = "auto"
    boot_timeout_s: float = 60.0
    memory_mib: int | None = None
    vcpus: int | None = None
    agent_args: tuple[str, ...] = ()


@dataclass(frozen=True)
class HostFacts:
    """What the runner found out about the host before planning."""

    uid: int
    gid: int
    work_dir: Path  # resolved
    agent_home: Path  # AGENT_HOME or the default, absolute
    runtime_base: Path  # $XDG_RUNTIME_DIR/microvm-run or its fallback
    instance_id: str
    environ: Mapping[str, str]
    user_manager: bool  # a systemd user manager answers
    user_manager_reason: str  # why (not), for --dry-run
    devshell_guest_file: str | None = None


@dataclass(frozen=True)
class VirtiofsdPlan:
    tag: str
    source: str
    shared_dir: Path
    socket: Path
    log: Path
    unit: str
    argv: tuple[str, ...]


@dataclass(frozen=True)
class LaunchPlan:
    agent: str
    spec: Path
    instance_id: str
    work_dir: Path
    agent_home: Path
    runtime_dir: Path
    supervisor: str  # "systemd" or "child"
    supervisor_reason: str
    accel: str
    net: str
    boot_timeout_s: float
    memory_mib: int
    vcpus: int
    dirs_to_create: tuple[Path, ...]
    virtiofsd: tuple[VirtiofsdPlan, ...]
    status_socket: Path
    qmp_socket: Path
    launch_file: Path
    launch_data: str
    # Names and host files only: values are read from the environment when
    # the files are written, so a plan can be printed without leaking keys.
    credentials: tuple[tuple[str, Path], ...]
    qemu_argv: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(asdict(self))


def build_plan(spec: Spec, options: RunOptions, facts: HostFacts) -> LaunchPlan:
    if options.accel not in ACCELS:
        raise PlanError(f"--accel must be one of {', '.join(ACCELS)}, not {options.accel!r}")
    if options.net not in NETS:
        raise PlanError(f"--net must be one of {', '.join(NETS)}, not {options.net!r}")
    supervisor, reason = _choose_supervisor(options.supervisor, facts)
    cri = _cri_runtimes(spec, facts.environ.get("ENABLE_CRI", ""))
    runtime_dir = facts.runtime_base / facts.instance_id
    basename = home.project_basename(facts.work_dir)

    sources = {
        "work": facts.work_dir,
        "home": facts.agent_home,
        "nix-store": Path("/nix/store"),
        "cri-storage": facts.agent_home / "cri-storage",
    }
    daemons = tuple(
        _daemon(
            spec,
            share,
            sources[share.source],
            runtime_dir=runtime_dir,
            basename=basename,
            facts=facts,
        )
        for share in spec.shares
    )
    dirs = [facts.agent_home]
    if spec.share_by_source("cri-storage"):
        dirs.append(sources["cri-storage"])

    credentials = tuple(
        (var, runtime_dir / "credentials" / var)
        for var in spec.api_key_vars
        if facts.environ.get(var)
    )
    launch_file = runtime_dir / "launch.sh"
    launch_data = contract.render_launch(
        facts.instance_id,
        [(s.tag, s.mount_point) for s in spec.shares],
        _guest_env(facts, cri),
        [*spec.command, *options.agent_args],
    ).decode()
    memory_mib = options.memory_mib or spec.memory_mib
    vcpus = options.vcpus or spec.vcpus
    status_socket = _socket(runtime_dir / "status.sock")
    qmp_socket = _socket(runtime_dir / "qmp.sock")
    argv = qemu.qemu_argv(
        spec,
        qemu.QemuInputs(
            accel=options.accel,
            memory_mib=memory_mib,
            vcpus=vcpus,
            net=options.net,
            name=f"{basename}-{spec.agent}-vm-{facts.instance_id}",
            fs_sockets=[(d.tag, d.socket) for d in daemons],
            status_socket=status_socket,
            qmp_socket=qmp_socket,
            launch_file=launch_file,
            credential_files=credentials,
        ),
    )
    return LaunchPlan(
        agent=spec.agent,
        spec=spec.path,
        instance_id=facts.instance_id,
        work_dir=facts.work_dir,
        agent_home=facts.agent_home,
        runtime_dir=runtime_dir,
        supervisor=supervisor,
        supervisor_reason=reason,
        accel=options.accel,
        net=options.net,
        boot_timeout_s=options.boot_timeout_s,
        memory_mib=memory_mib,
        vcpus=vcpus,
        dirs_to_create=tuple(dirs),
        virtiofsd=daemons,
        status_socket=status_socket,
        qmp_socket=qmp_socket,
        launch_file=launch_file,
        launch_data=launch_data,
        credentials=credentials,
        qemu_argv=tuple(argv),
    )


def _daemon(
    spec: Spec,
    share: Share,
    shared_dir: Path,
    *,
    runtime_dir: Path,
    basename: str,
    facts: HostFacts,
) -> VirtiofsdPlan:
    socket = _socket(runtime_dir / f"fs-{share.tag}.sock")
    argv = virtiofsd.virtiofsd_argv(
        spec.virtiofsd,
        shared_dir=shared_dir,
        socket=socket,
        uid=facts.uid,
        gid=facts.gid,
        read_only=share.read_only,
        source=share.source,
    )
    return VirtiofsdPlan(
        tag=share.tag,
        source=share.source,
        shared_dir=shared_dir,
        socket=socket,
        log=runtime_dir / f"virtiofsd-{share.tag}.log",
        unit=virtiofsd.unit_name(basename, spec.agent, share.tag, facts.instance_id),
        argv=tuple(argv),
    )


def _choose_supervisor(wanted: str, facts: HostFacts) -> tuple[str, str]:
    if wanted not in SUPERVISORS:
        raise PlanError(f"--supervisor must be one of {', '.join(SUPERVISORS)}, not {wanted!r}")
    if wanted == "child":
        return "child", "requested (--supervisor child)"
    if facts.user_manager:
        return "systemd", facts.user_manager_reason
    if wanted == "systemd":
        raise PlanError(
            f"--supervisor systemd: no systemd user manager ({facts.user_manager_reason})"
        )
    return "child", f"fallback: {facts.user_manager_reason}; virtiofsd runs as child processes"


def _cri_runtimes(spec: Spec, raw: str) -> tuple[str, ...]:
    """ENABLE_CRI, checked on the host so a typo never costs a boot."""
    names = tuple(name for name in raw.replace(",", " ").split() if name)
    unknown = [name for name in names if name not in CRI_RUNTIMES]
    if unknown:
        raise PlanError(
            f"ENABLE_CRI: unknown runtime {unknown[0]!r} (known: {', '.join(CRI_RUNTIMES)})"
        )
    if names and spec.share_by_source("cri-storage") is None:
        raise PlanError(
            f"ENABLE_CRI is set but this flavor has no container runtimes; "
            f"use the {spec.agent}-cri flavor"
        )
    return names


def _guest_env(facts: HostFacts, cri: tuple[str, ...]) -> dict[str, str]:
    env = {name: facts.environ[name] for name in TERMINAL_VARS if facts.environ.get(name)}
    if facts.devshell_guest_file:
        env["MICROVM_DEVSHELL"] = facts.devshell_guest_file
    if cri:
        env["ENABLE_CRI"] = ",".join(cri)
    return env


def _socket(path: Path) -> Path:
    if "," in str(path):
        # QEMU splits -chardev/-qmp/-fw_cfg option values at commas.
        raise PlanError(
            f"runtime path {path} contains a comma, which QEMU cannot take; "
            "set XDG_RUNTIME_DIR to a directory without one"
        )
    if len(str(path).encode()) > MAX_SOCKET_PATH:
        raise PlanError(
            f"socket path {path} is longer than {MAX_SOCKET_PATH} bytes; "
            "set XDG_RUNTIME_DIR to a shorter directory"
        )
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
