"""Plan a launch as plain data: spec + options + host facts -> LaunchPlan.

Pure: no file system access, no processes, no clock, no randomness.  Every
fact about the host (uid, resolved paths, whether a systemd user manager
answers, the instance id) comes in as an argument, so the plan is what
``--dry-run`` prints and what the tests check.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from microvm_run import contract, home, live, localdirs, netpolicy, presets, qemu, virtiofsd
from microvm_run.agentgit import GitPlan
from microvm_run.netmode import NET_ALIASES, NetMode
from microvm_run.netpolicy import EgressConfig, KeyRoute, PolicyError
from microvm_run.qemu import Accel
from microvm_run.spec import Share, Spec
from microvm_run.virtiofsd import Supervisor

# What the guest sees instead of an API key the host-side proxy adds.
KEY_PLACEHOLDER = netpolicy.KEY_PLACEHOLDER
# --supervisor: a Supervisor, or "auto" (systemd when a user manager runs).
SUPERVISOR_CHOICES = ("auto", *(s.value for s in Supervisor))
# sun_path is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107
# Passed through from the host so the agent's TUI renders and reads keys as
# it does there: TERM_PROGRAM and LC_TERMINAL (with their versions) are how
# TUIs tell which terminal speaks which keyboard protocol (Shift+Enter as
# CSI-u or modifyOtherKeys; LC_TERMINAL passes ssh's default AcceptEnv LC_*).
TERMINAL_VARS = (
    "TERM",
    "COLORTERM",
    "LANG",
    "LC_ALL",
    "TERM_PROGRAM",
    "TERM_PROGRAM_VERSION",
    "LC_TERMINAL",
    "LC_TERMINAL_VERSION",
)


class PlanError(ValueError):
    """Input that cannot be launched; the message is one line for the user."""


@dataclass(frozen=True)
class RunOptions:
    """What the user asked for (CLI flags and their environment variables)."""

    accel: str = "kvm"
    net: str = "open"
    allow: tuple[str, ...] = ()  # --allow HOST, MICROVM_ALLOW
    # --allow-private HOST, MICROVM_ALLOW_PRIVATE: may resolve to loopback/LAN
    allow_private: tuple[str, ...] = ()
    allow_presets: tuple[str, ...] = ()  # --allow-preset NAME|auto, MICROVM_ALLOW_PRESET
    ports: tuple[str, ...] = ()  # -p [HOST_ADDR:]HOST_PORT:GUEST_PORT
    inject_keys: bool | None = None  # None: on when the flavor supports it
    supervisor: str = "auto"
    boot_timeout_s: float = 60.0
    memory_mib: int | None = None
    vcpus: int | None = None
    agent_args: tuple[str, ...] = ()
    # virtiofsd's cache mode for /work and the home (virtiofsd.FS_CACHE_MODES)
    fs_cache: str = virtiofsd.DEFAULT_FS_CACHE
    # Directories of /work on the guest's own disk: None = what the project's
    # lockfiles imply (localdirs.RULES), () = none (--no-local-dirs).
    local_dirs: tuple[str, ...] | None = None
    local_dirs_size_gib: int = localdirs.DEFAULT_SIZE_GIB


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
    # The dev shell: MICROVM_DEVSHELL for the guest (None: none), and one
    # line on what becomes of it (cli.py: evaluated, or foreseen by --dry-run).
    devshell_guest_file: str | None = None
    devshell: str = ""
    # The runner's own per-project state and the container storage root:
    # host-only places, never inside the guest-writable agent home.
    state_dir: Path = Path("/nonexistent/microvm-run-state")
    cri_storage: Path = Path("/nonexistent/microvm-run-cri-storage")
    # The per-project allowlist file (outside the project: the agent can
    # write there) and its entries, if it exists.
    project_allow_file: Path | None = None
    project_allow: tuple[str, ...] = ()
    # Names at the project's top level that presets look for (host.project_lockfiles).
    project_lockfiles: tuple[str, ...] = ()
    egress_log: Path = Path("/dev/null")
    terminal_size: tuple[int, int] | None = None  # (rows, columns) of the runner's tty
    tsc_khz: int | None = None  # the host's TSC frequency (a TCG guest's TSC ticks at it)
    python: Path = Path("/usr/bin/python3")  # runs relay.py for guestfwd
    relay: Path = Path("relay.py")
    # The project's git as the guest sees it (agentgit.plan_git); None: no git.
    git: GitPlan | None = None
    gitmask: Path = Path("gitmask.py")  # hides the user's .git from the work share
    # localdirs.implied(work_dir), and the first disk slot no running QEMU holds
    implied_local_dirs: tuple[str, ...] = ()
    local_slot: int = 0


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
    supervisor: Supervisor
    supervisor_reason: str
    accel: Accel
    net: NetMode
    boot_timeout_s: float
    port_forwards: tuple[str, ...]
    egress: EgressConfig | None  # None with --net none
    presets: tuple[presets.PresetUse, ...]  # asked for, or suggested by the project's files
    inject_keys: bool
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
    # Every API key variable of the flavor: no child process gets any of
    # them, whether the key goes to the guest or stays with the key proxy.
    secret_vars: tuple[str, ...] = ()
    git: GitPlan | None = None
    devshell: str = ""  # HostFacts.devshell
    # The local-directories disk (localdirs.py): the dirs, its image and size.
    local_dirs: tuple[str, ...] = ()
    local_image: Path | None = None
    local_size_bytes: int = 0
    qemu_argv: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = _jsonable(asdict(self))
        return data


@dataclass(frozen=True)
class Choices:
    """What the options and host facts decide, every bad input refused on the
    way.  Nothing here depends on what only a launch fixes (the disk slot it
    claims, the dev shell it evaluates), so the launch decides before it acts
    and then builds its one plan with what it found (cli.py)."""

    accel: Accel
    net: NetMode
    supervisor: Supervisor
    supervisor_reason: str
    cri: tuple[str, ...]
    runtime_dir: Path
    daemons: tuple[VirtiofsdPlan, ...]
    inject: bool
    credentials: tuple[tuple[str, Path], ...]
    forwards: tuple[netpolicy.PortForward, ...]
    presets: tuple[presets.PresetUse, ...]
    egress: EgressConfig | None
    local_dirs: tuple[str, ...]
    status_socket: Path
    qmp_socket: Path


def decide(spec: Spec, options: RunOptions, facts: HostFacts) -> Choices:
    """Every choice and refusal of the plan (PlanError), without building it."""
    if options.fs_cache not in virtiofsd.FS_CACHE_MODES:
        modes = ", ".join(virtiofsd.FS_CACHE_MODES)
        raise PlanError(f"--fs-cache must be one of {modes}, not {options.fs_cache!r}")
    if options.accel not in tuple(Accel):
        raise PlanError(f"--accel must be one of {', '.join(Accel)}, not {options.accel!r}")
    accel = Accel(options.accel)
    raw_net = NET_ALIASES.get(options.net, options.net)
    if raw_net not in tuple(NetMode):
        raise PlanError(f"--net must be one of {', '.join(NetMode)}, not {options.net!r}")
    net = NetMode(raw_net)
    supervisor, reason = _choose_supervisor(options.supervisor, facts)
    cri = _cri_runtimes(spec, facts.environ.get("ENABLE_CRI", ""))
    runtime_dir = facts.runtime_base / facts.instance_id
    basename = home.project_basename(facts.work_dir)

    sources = {
        # --worktree: the runner's working tree for NAME, not the project.
        "work": facts.git.share_root if facts.git is not None else facts.work_dir,
        "home": facts.agent_home,
        "nix-store": Path("/nix/store"),
        "cri-storage": facts.cri_storage,
    }
    daemons = tuple(
        _daemon(
            spec,
            share,
            sources[share.source],
            runtime_dir=runtime_dir,
            basename=basename,
            facts=facts,
            fs_cache=virtiofsd.FsCache(options.fs_cache),
        )
        for share in spec.shares
    )
    inject = _inject_keys(spec, options, net)
    injected = {p.var for p in spec.key_proxies} if inject else set()
    credentials = tuple(
        (var, runtime_dir / "credentials" / var)
        for var in spec.api_key_vars
        if facts.environ.get(var) and var not in injected
    )
    forwards = _port_forwards(options.ports, net)
    try:
        preset_uses = presets.resolve(options.allow_presets, facts.project_lockfiles)
    except ValueError as err:
        raise PlanError(str(err)) from None
    preset_hosts = tuple(h for use in preset_uses if use.applied for h in use.hosts)
    egress = _egress(
        spec,
        options,
        facts=facts,
        net=net,
        runtime_dir=runtime_dir,
        inject=inject,
        preset_hosts=preset_hosts,
    )
    local_dirs = chosen_local_dirs(options, facts)
    if local_dirs and "," in str(localdirs.image_dir(facts.state_dir)):
        raise PlanError(f"the state dir {facts.state_dir} has a comma, which QEMU cannot take")
    return Choices(
        accel=accel,
        net=net,
        supervisor=supervisor,
        supervisor_reason=reason,
        cri=cri,
        runtime_dir=runtime_dir,
        daemons=daemons,
        inject=inject,
        credentials=credentials,
        forwards=forwards,
        presets=preset_uses,
        egress=egress,
        local_dirs=local_dirs,
        status_socket=_socket(runtime_dir / "status.sock"),
        qmp_socket=_socket(runtime_dir / "qmp.sock"),
    )


def build_plan(spec: Spec, options: RunOptions, facts: HostFacts) -> LaunchPlan:
    chosen = decide(spec, options, facts)
    runtime_dir, egress, local_dirs = chosen.runtime_dir, chosen.egress, chosen.local_dirs
    local_image = (
        localdirs.image_dir(facts.state_dir) / f"{facts.local_slot}.img" if local_dirs else None
    )
    guest_env = _guest_env(facts, chosen.cri)
    if local_dirs:
        guest_env["PYTHONPYCACHEPREFIX"] = contract.LOCAL_PYCACHE
    if egress is not None:
        guest_env |= _proxy_env(spec, egress, facts)
    launch_file = runtime_dir / "launch.sh"
    launch_data = contract.render_launch(
        facts.instance_id,
        [(s.tag, s.mount_point) for s in spec.shares],
        guest_env,
        [*spec.command, *options.agent_args],
        net=chosen.net,
        tty_size=facts.terminal_size,
        local_dirs=local_dirs,
    ).decode()
    memory_mib = options.memory_mib or spec.memory_mib
    vcpus = options.vcpus or spec.vcpus
    argv = qemu.qemu_argv(
        spec,
        qemu.QemuInputs(
            accel=chosen.accel,
            memory_mib=memory_mib,
            vcpus=vcpus,
            netdev=_netdev(chosen.net, egress, chosen.forwards, facts),
            name=f"{home.project_basename(facts.work_dir)}-{spec.agent}-vm-{facts.instance_id}",
            fs_sockets=[(d.tag, d.socket) for d in chosen.daemons],
            status_socket=chosen.status_socket,
            qmp_socket=chosen.qmp_socket,
            launch_file=launch_file,
            credential_files=chosen.credentials,
            tsc_khz=facts.tsc_khz,
            local_image=local_image,
        ),
    )
    return LaunchPlan(
        agent=spec.agent,
        spec=spec.path,
        instance_id=facts.instance_id,
        work_dir=facts.work_dir,
        agent_home=facts.agent_home,
        runtime_dir=runtime_dir,
        supervisor=chosen.supervisor,
        supervisor_reason=chosen.supervisor_reason,
        accel=chosen.accel,
        net=chosen.net,
        boot_timeout_s=options.boot_timeout_s,
        port_forwards=tuple(str(f) for f in chosen.forwards),
        egress=egress,
        presets=chosen.presets,
        inject_keys=chosen.inject,
        memory_mib=memory_mib,
        vcpus=vcpus,
        dirs_to_create=private_dirs(spec, facts),
        virtiofsd=chosen.daemons,
        status_socket=chosen.status_socket,
        qmp_socket=chosen.qmp_socket,
        launch_file=launch_file,
        launch_data=launch_data,
        credentials=chosen.credentials,
        secret_vars=spec.api_key_vars,
        git=facts.git,
        devshell=facts.devshell,
        local_dirs=local_dirs,
        local_image=local_image,
        local_size_bytes=options.local_dirs_size_gib << 30 if local_dirs else 0,
        qemu_argv=tuple(argv),
    )


def private_dirs(spec: Spec, facts: HostFacts) -> tuple[Path, ...]:
    """The share roots the runner makes and owns: the agent home, the container storage."""
    if spec.share_by_source("cri-storage"):
        return (facts.agent_home, facts.cri_storage)
    return (facts.agent_home,)


def chosen_local_dirs(options: RunOptions, facts: HostFacts) -> tuple[str, ...]:
    """The /work directories on the guest's own disk (every spec shares /work)."""
    if not 1 <= options.local_dirs_size_gib <= localdirs.MAX_SIZE_GIB:
        raise PlanError(
            f"--local-dirs-size must be 1..{localdirs.MAX_SIZE_GIB} GiB, "
            f"not {options.local_dirs_size_gib}"
        )
    if options.local_dirs is None:
        return facts.implied_local_dirs
    return options.local_dirs


def _daemon(
    spec: Spec,
    share: Share,
    shared_dir: Path,
    *,
    runtime_dir: Path,
    basename: str,
    facts: HostFacts,
    fs_cache: virtiofsd.FsCache,
) -> VirtiofsdPlan:
    socket = _socket(runtime_dir / f"fs-{share.tag}.sock")
    masked = share.source == "work" and facts.git is not None
    argv = virtiofsd.virtiofsd_argv(
        spec.virtiofsd,
        shared_dir=shared_dir,
        socket=socket,
        # Behind gitmask.py virtiofsd runs as 0 of a namespace that maps
        # only the user: the mapping its --uid-map would make.
        uid=0 if masked else facts.uid,
        gid=0 if masked else facts.gid,
        read_only=share.read_only,
        source=share.source,
        cache=fs_cache,
    )
    if masked:
        assert facts.git is not None
        binds = [str(part) for bind in facts.git.binds for part in bind]
        argv = [
            str(facts.python), "-I", "-S", str(facts.gitmask), str(facts.uid), str(facts.gid),
            *binds, "--", *argv,
        ]  # fmt: skip
    return VirtiofsdPlan(
        tag=share.tag,
        source=share.source,
        shared_dir=shared_dir,
        socket=socket,
        log=runtime_dir / f"virtiofsd-{share.tag}.log",
        unit=virtiofsd.unit_name(basename, spec.agent, share.tag, facts.instance_id),
        argv=tuple(argv),
    )


def _choose_supervisor(wanted: str, facts: HostFacts) -> tuple[Supervisor, str]:
    if wanted not in SUPERVISOR_CHOICES:
        choices = ", ".join(SUPERVISOR_CHOICES)
        raise PlanError(f"--supervisor must be one of {choices}, not {wanted!r}")
    if wanted == Supervisor.CHILD:
        return Supervisor.CHILD, "requested (--supervisor child)"
    if facts.user_manager:
        return Supervisor.SYSTEMD, facts.user_manager_reason
    if wanted == Supervisor.SYSTEMD:
        raise PlanError(
            f"--supervisor systemd: no systemd user manager ({facts.user_manager_reason})"
        )
    return (
        Supervisor.CHILD,
        f"fallback: {facts.user_manager_reason}; virtiofsd runs as child processes",
    )


def _cri_runtimes(spec: Spec, raw: str) -> tuple[str, ...]:
    """ENABLE_CRI, checked on the host so a typo never costs a boot."""
    names = tuple(name for name in raw.replace(",", " ").split() if name)
    if names and not spec.cri_runtimes:
        raise PlanError(
            f"ENABLE_CRI is set but this flavor has no container runtimes; "
            f"use the {spec.agent}-cri flavor"
        )
    unknown = [name for name in names if name not in spec.cri_runtimes]
    if unknown:
        known = ", ".join(spec.cri_runtimes)
        raise PlanError(f"ENABLE_CRI: unknown runtime {unknown[0]!r} (known: {known})")
    return names


def _inject_keys(spec: Spec, options: RunOptions, net: NetMode) -> bool:
    if options.inject_keys and net is NetMode.NONE:
        raise PlanError("--inject-keys needs the key proxy, which --net none does not have")
    if options.inject_keys is False or net is NetMode.NONE:
        return False
    if not spec.key_proxies:
        if options.inject_keys:
            raise PlanError(f"--inject-keys: the {spec.agent} flavor has no key proxy routes")
        return False
    return True


def _port_forwards(raw: tuple[str, ...], net: NetMode) -> tuple[netpolicy.PortForward, ...]:
    if raw and net is NetMode.NONE:
        raise PlanError("-p needs a network: it cannot be combined with --net none")
    try:
        forwards = tuple(netpolicy.parse_port_forward(text) for text in raw)
        netpolicy.check_unique_forwards(forwards)
    except PolicyError as err:
        raise PlanError(str(err)) from None
    return forwards


def _egress(
    spec: Spec,
    options: RunOptions,
    *,
    facts: HostFacts,
    net: NetMode,
    runtime_dir: Path,
    inject: bool,
    preset_hosts: tuple[str, ...] = (),
) -> EgressConfig | None:
    if net is NetMode.NONE:
        return None
    try:
        rules = tuple(
            netpolicy.parse_allow(entry)
            for entry in (*spec.allow, *facts.project_allow, *preset_hosts, *options.allow)
        ) + tuple(netpolicy.parse_allow(entry, private=True) for entry in options.allow_private)
    except PolicyError as err:
        raise PlanError(str(err)) from None
    routes = tuple(
        KeyRoute(
            prefix=netpolicy.key_route_prefix(p.var),
            var=p.var,
            upstream=p.upstream,
            header=p.header,
            methods=p.methods,
            paths=p.paths,
        )
        for p in spec.key_proxies
        if inject
    )
    return EgressConfig(
        mode=net,
        rules=tuple(dict.fromkeys(rules)),
        socket=_socket(runtime_dir / "egress.sock"),
        log=facts.egress_log,
        instance_id=facts.instance_id,
        key_routes=routes,
        live_allow=runtime_dir / live.LIVE_FILE,
    )


def _proxy_env(spec: Spec, egress: EgressConfig, facts: HostFacts) -> dict[str, str]:
    """Point the agent at the egress proxy and, with --inject-keys, the key proxy."""
    proxy = f"http://{netpolicy.EGRESS_ADDR}:{netpolicy.PROXY_PORT}"
    no_proxy = f"localhost,127.0.0.1,{netpolicy.EGRESS_ADDR}"
    env = {
        "http_proxy": proxy,
        "https_proxy": proxy,
        "HTTP_PROXY": proxy,
        "HTTPS_PROXY": proxy,
        "no_proxy": no_proxy,
        "NO_PROXY": no_proxy,
    }
    routes = {route.var: route for route in egress.key_routes}
    for key_proxy in spec.key_proxies:
        route = routes.get(key_proxy.var)
        if route is None or not facts.environ.get(key_proxy.var):
            continue
        env[key_proxy.var] = KEY_PLACEHOLDER
        env[key_proxy.base_url_var] = (
            f"http://{netpolicy.EGRESS_ADDR}:{netpolicy.KEY_PROXY_PORT}/{route.prefix}"
            + key_proxy.base_url_path
        )
    return env


def _netdev(
    net: NetMode,
    egress: EgressConfig | None,
    forwards: tuple[netpolicy.PortForward, ...],
    facts: HostFacts,
) -> str | None:
    """QEMU user networking that reaches nothing but the egress proxy."""
    if net is NetMode.NONE or egress is None:
        return None
    parts = ["user", "id=net0", "restrict=on"]
    ports = [*netpolicy.BASE_PORTS, *netpolicy.extra_ports(egress.rules)]
    if egress.key_routes:
        ports.append(netpolicy.KEY_PROXY_PORT)
    for port in ports:
        command = " ".join(
            shlex.quote(str(arg))
            for arg in (facts.python, "-I", "-S", facts.relay, port, egress.socket)
        )
        parts.append(f"guestfwd=tcp:{netpolicy.EGRESS_ADDR}:{port}-cmd:{_qemu_escape(command)}")
    parts += [
        f"hostfwd=tcp:{f.host_addr}:{f.host_port}-{netpolicy.GUEST_ADDR}:{f.guest_port}"
        for f in forwards
    ]
    return ",".join(parts)


def _qemu_escape(value: str) -> str:
    # QEMU option values: a literal comma is written twice.
    return value.replace(",", ",,")


def _guest_env(facts: HostFacts, cri: tuple[str, ...]) -> dict[str, str]:
    env = {name: facts.environ[name] for name in TERMINAL_VARS if facts.environ.get(name)}
    if facts.devshell_guest_file:
        env[contract.LAUNCH_VAR_DEVSHELL] = facts.devshell_guest_file
    if cri:
        env[contract.LAUNCH_VAR_ENABLE_CRI] = ",".join(cri)
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
