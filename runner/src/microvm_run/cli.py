"""Command line: parse, validate, plan, then either print the plan or launch."""

from __future__ import annotations

import argparse
import contextlib
import os
import stat
import sys
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from microvm_run import contract, host
from microvm_run.netpolicy import NET_ALIASES
from microvm_run.plan import (
    ACCELS,
    NETS,
    SUPERVISORS,
    LaunchPlan,
    PlanError,
    RunOptions,
    build_plan,
)
from microvm_run.spec import MAX_MEMORY_MIB, MAX_VCPUS, Spec, SpecError, load_spec

EPILOG = """\
subcommands (see `microvm-run ps --help` etc.):
  ps [--json]            running instances
  stop ID... | --all     clean power-off, then force after a deadline
  gc [--prune]           remove what dead instances left; list homes of vanished projects
  doctor [--boot]        check this host (KVM, virtiofsd, qemu, user manager, dirs, disk)

environment:
  WORK_DIR               project directory shared at /work (default: the current directory)
  AGENT_HOME             the agent's persistent home (default: per project, see README)
  MICROVM_RUN_SPEC       the flavor's spec (set by the flavor packages; --spec overrides)
  MICROVM_ACCEL, MICROVM_NET, MICROVM_BOOT_TIMEOUT, MICROVM_SUPERVISOR,
  MICROVM_MEM, MICROVM_VCPUS, MICROVM_INJECT_KEYS   defaults for the options of the same name
  MICROVM_ALLOW          extra allowlist entries, separated by spaces or commas
  MICROVM_ALLOW_PRIVATE  --allow-private entries, separated by spaces or commas
  DIRENV_ALLOW=1         evaluate the project's dev shell on the host (runs its Nix code)
  ANTHROPIC_API_KEY, GEMINI_API_KEY, OPENAI_API_KEY
                         passed to the agent as credentials (never in argv or on disk in a share)

exit status: the agent's own; 2 bad input; 124 the guest did not come up in time;
125 the guest or the runner failed without an agent exit status.
"""


# Subcommands that manage instances (ops_cli.py); anything else launches.
SUBCOMMANDS = ("ps", "stop", "gc", "doctor")


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    env = dict(os.environ if environ is None else environ)
    words = list(sys.argv[1:] if argv is None else argv)
    if words and words[0] in SUBCOMMANDS:
        from microvm_run import ops_cli  # noqa: PLC0415 - the launch path never needs it

        return ops_cli.main(words, env, boot=lambda spec, accel: _boot_check(env, spec, accel))
    parser = _parser(env)
    args = parser.parse_args(words)
    try:
        spec = _load_spec(args.spec)
        options = _options(args)
        facts = host.gather(spec, env, work_dir_arg=args.work_dir, allow_home=args.allow_home)
        plan = build_plan(spec, options, facts)
    except (SpecError, PlanError) as err:
        print(f"microvm-run: {err}", file=sys.stderr)
        return contract.EXIT_BAD_INPUT
    if args.dry_run:
        if args.json:
            import json  # noqa: PLC0415 - only --json needs it

            print(json.dumps(plan.to_dict(), indent=2))
        else:
            print(_describe(plan))
        return 0
    # The key stays in this process's memory (the key proxy needs it) and in
    # its initial environment: make both unreadable to the user's other
    # processes, the dev-shell evaluation included.
    keep_keys_private()
    try:
        _check_runnable(spec, options.accel)
        _check_dirs(plan)
        _check_not_root(env)
    except PlanError as err:
        print(f"microvm-run: {err}", file=sys.stderr)
        return contract.EXIT_BAD_INPUT
    from microvm_run import launch  # noqa: PLC0415 - keeps --dry-run imports small

    try:
        launch.create_private_dirs(plan)
        devshell_file = _prepare_devshell(spec, plan, facts.state_dir, env)
        if devshell_file is not None:
            plan = build_plan(spec, options, replace(facts, devshell_guest_file=devshell_file))
        return launch.launch(plan, env)
    except launch.LaunchError as err:
        print(f"microvm-run: {err}", file=sys.stderr)
        return contract.EXIT_NO_STATUS


def _boot_check(env: Mapping[str, str], spec_path: Path, accel: str) -> int:
    """`doctor --boot`: boot the flavor's guest with `true` in a throw-away project."""
    import tempfile  # noqa: PLC0415 - only doctor --boot needs it

    from microvm_run import launch, process  # noqa: PLC0415

    spec = replace(load_spec(spec_path), command=("true",))
    _check_runnable(spec, accel)
    with tempfile.TemporaryDirectory(prefix="microvm-doctor-") as scratch:
        work = Path(scratch) / "work"
        work.mkdir()
        # No keys, no network, a home that goes away with the check.
        boot_env = {**process.without(env, spec.api_key_vars), "AGENT_HOME": f"{scratch}/home"}
        facts = host.gather(spec, boot_env, work_dir_arg=str(work), allow_home=False)
        plan = build_plan(spec, RunOptions(accel=accel, net="none", inject_keys=False), facts)
        return launch.launch(plan, boot_env)


def _prepare_devshell(
    spec: Spec, plan: LaunchPlan, state_dir: Path, env: Mapping[str, str]
) -> str | None:
    """With DIRENV_ALLOW, the project's dev shell for the guest (cached on the host)."""
    allow = env.get("DIRENV_ALLOW")
    if not allow or allow == "0":
        return None
    from microvm_run import consent  # noqa: PLC0415 - only DIRENV_ALLOW needs it

    if not consent.is_allow_value(allow):
        print(
            f"microvm-run: DIRENV_ALLOW={allow!r} ignored: use 1, or the digest "
            "microvm-run printed",
            file=sys.stderr,
        )
        return None
    home_share = spec.share_by_source("home")
    if home_share is None:
        print("microvm-run: DIRENV_ALLOW=1 ignored: this flavor shares no home", file=sys.stderr)
        return None
    from microvm_run import devshell, process  # noqa: PLC0415 - only DIRENV_ALLOW=1 needs it

    result = devshell.prepare(
        plan.work_dir,
        plan.agent_home,
        state_dir=state_dir,
        allow=allow,
        others_running=_others_running(plan),
        progress=sys.stderr,
        guest_home=home_share.mount_point,
        # The project's Nix code runs here: it gets no API key to copy.
        env=process.without(env, spec.api_key_vars),
    )
    return result.guest_env_file


_PR_SET_DUMPABLE = 4


def keep_keys_private() -> None:
    """Make this process non-dumpable: /proc/<pid>/environ and /proc/<pid>/mem
    become unreadable to the user's other processes (only root may read them).

    Chosen over re-exec'ing without the key (or passing it over a pipe):
    the runner must keep the key in memory for the key proxy, and a re-exec
    would hide only the environment, while a same-user process could still
    read the memory where ptrace rules allow it.  Non-dumpable hides both and
    costs nothing; children get their own dumpable flag back at exec, and
    none of them gets the key (process.without).
    """
    import ctypes  # noqa: PLC0415

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)


def _check_not_root(env: Mapping[str, str]) -> None:
    """Running as root gives the guest root's hands on the shared files.

    virtiofsd refuses ID maps when started by root, so guest files would be
    root's, and anything the guest plants is trusted by root.
    MICROVM_RUN_ALLOW_ROOT=1 is for hosts whose Nix works only as root (and
    this project's own dev-shell tests); README says what it costs.
    """
    if os.geteuid() == 0 and env.get("MICROVM_RUN_ALLOW_ROOT") != "1":
        raise PlanError(
            "refusing to run as root: virtiofsd would write the shares as root (set-uid "
            "root files, any owner); run microvm-run as your own user"
        )


def _others_running(plan: LaunchPlan) -> bool:
    """Does another VM run on this project now?  Its agent could change the
    files between the consent check and Nix reading them."""
    from microvm_run import state  # noqa: PLC0415

    return any(
        entry.state is not None
        and entry.state.project == plan.work_dir
        and state.is_alive(entry.state.runner_pid, entry.state.runner_start)
        for entry in state.scan(plan.runtime_dir.parent)
    )


def _parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="microvm-run",
        description="Start the agent in a throw-away microVM with WORK_DIR shared at /work.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--spec", default=env.get("MICROVM_RUN_SPEC"), help="the flavor's guest spec (TOML)")
    add("--work-dir", help="project directory (default: $WORK_DIR or the current directory)")
    add(
        "--accel",
        default=env.get("MICROVM_ACCEL", "kvm"),
        choices=ACCELS,
        help="kvm (default) or tcg (software emulation: slow, works without KVM)",
    )
    add(
        "--net",
        default=env.get("MICROVM_NET", "open"),
        choices=(*NETS, *NET_ALIASES),
        help="open (default): public hosts only, never the host's loopback or LAN; "
        "allowlist: only allowlisted hosts; none: no network device",
    )
    add(
        "--allow",
        metavar="HOST",
        action="append",
        default=_words(env.get("MICROVM_ALLOW", "")),
        help="with --net allowlist: also allow HOST (*.suffix and HOST:PORT work); repeatable",
    )
    add(
        "--allow-private",
        metavar="HOST",
        action="append",
        default=_words(env.get("MICROVM_ALLOW_PRIVATE", "")),
        help="allow HOST even where it resolves to loopback, the LAN or this host "
        "(no other rule does, in any mode; HOST:PORT for other ports than 80/443); repeatable",
    )
    add(
        "-p",
        "--publish",
        metavar="[ADDR:]HOST_PORT:GUEST_PORT",
        action="append",
        default=[],
        help="forward a host port to the guest (bound to 127.0.0.1 unless ADDR); repeatable",
    )
    add(
        "--inject-keys",
        action=argparse.BooleanOptionalAction,
        default=_flag(env.get("MICROVM_INJECT_KEYS")),
        help="keep API keys on the host: the guest gets a placeholder and a proxy URL "
        "(default: on where the flavor supports it)",
    )
    add(
        "--boot-timeout",
        metavar="SECONDS",
        default=env.get("MICROVM_BOOT_TIMEOUT", "60"),
        help="stop the VM if the guest has not come up by then (default 60)",
    )
    add(
        "--supervisor",
        default=env.get("MICROVM_SUPERVISOR", "auto"),
        choices=SUPERVISORS,
        help="how virtiofsd runs: systemd user units, child processes, or auto (default)",
    )
    add(
        "--mem",
        metavar="MIB",
        default=env.get("MICROVM_MEM"),
        help="guest memory in MiB (default: the flavor's)",
    )
    add(
        "--vcpus",
        metavar="N",
        default=env.get("MICROVM_VCPUS"),
        help="guest vCPUs (default: the flavor's)",
    )
    add("--allow-home", action="store_true", help="allow WORK_DIR to be your home directory")
    add("--dry-run", action="store_true", help="print the launch plan and start nothing")
    add("--json", action="store_true", help="with --dry-run: print the plan as JSON")
    add("agent_args", nargs="*", metavar="-- ARGS", help="extra arguments for the agent")
    return parser  # fmt: skip


def _words(raw: str) -> list[str]:
    return [word for word in raw.replace(",", " ").split() if word]


def _flag(raw: str | None) -> bool | None:
    if raw is None or raw == "":
        return None
    return raw.lower() in {"1", "yes", "true", "on"}


def _load_spec(path: str | None) -> Spec:
    if not path:
        raise SpecError(
            "no spec: pass --spec FILE or set MICROVM_RUN_SPEC (the flavor packages do)"
        )
    return load_spec(Path(path))


def _options(args: argparse.Namespace) -> RunOptions:
    try:
        boot_timeout = float(args.boot_timeout)
    except ValueError:
        raise PlanError(
            f"--boot-timeout must be a number of seconds, not {args.boot_timeout!r}"
        ) from None
    if not 0 < boot_timeout < float("inf"):
        raise PlanError(f"--boot-timeout must be positive, not {args.boot_timeout}")
    return RunOptions(
        accel=args.accel,
        net=args.net,
        allow=tuple(args.allow),
        allow_private=tuple(args.allow_private),
        ports=tuple(args.publish),
        inject_keys=args.inject_keys,
        supervisor=args.supervisor,
        boot_timeout_s=boot_timeout,
        memory_mib=_bounded("--mem", args.mem, 64, MAX_MEMORY_MIB),
        vcpus=_bounded("--vcpus", args.vcpus, 1, min(MAX_VCPUS, os.cpu_count() or 1)),
        agent_args=tuple(args.agent_args),
    )


def _bounded(flag: str, raw: str | None, low: int, high: int) -> int | None:
    if raw is None or raw == "":
        return None
    if not raw.isdigit():
        raise PlanError(f"{flag} must be a whole number, not {raw!r}")
    value = int(raw)
    if not low <= value <= high:
        raise PlanError(f"{flag} {value} is out of range {low}..{high}")
    return value


def _check_runnable(spec: Spec, accel: str) -> None:
    """Host prerequisites that only matter when actually launching."""
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


# Sockets, the launch file and logs need little; less than this is "full".
MIN_RUNTIME_FREE = 1024 * 1024


def _check_dirs(plan: LaunchPlan) -> None:
    """The dirs the launch writes to: checked before anything is created."""
    for directory in plan.dirs_to_create:
        _check_share_root(directory)
        existing = _nearest_existing(directory)
        if existing is None or not os.access(existing, os.W_OK | os.X_OK):
            raise PlanError(
                f"AGENT_HOME {directory} is not writable ({existing} is not); "
                "fix its permissions or set AGENT_HOME elsewhere"
            )
    from microvm_run import state  # noqa: PLC0415

    problem = state.base_problem(plan.runtime_dir.parent, os.getuid())
    if problem:
        raise PlanError(f"runtime dir: {problem}")
    base = _nearest_existing(plan.runtime_dir.parent)
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


def _describe(plan: LaunchPlan) -> str:
    lines = [
        f"agent        {plan.agent} (spec {plan.spec})",
        f"instance     {plan.instance_id}",
        f"work dir     {plan.work_dir} -> /work",
        f"agent home   {plan.agent_home}",
        f"runtime dir  {plan.runtime_dir}",
        f"resources    {plan.memory_mib} MiB, {plan.vcpus} vCPU, accel {plan.accel}, "
        f"net {plan.net}, boot timeout {plan.boot_timeout_s:g} s",
        f"virtiofsd    {plan.supervisor} ({plan.supervisor_reason})",
    ]
    for daemon in plan.virtiofsd:
        where = f"unit {daemon.unit}" if plan.supervisor == "systemd" else "child process"
        lines.append(f"  share {daemon.tag}: {daemon.shared_dir} ({where})")
        lines.append(f"    {' '.join(daemon.argv)}")
    if plan.egress is not None:
        rules = ", ".join(str(rule) for rule in plan.egress.rules) or "none"
        lines.append(
            f"egress       {plan.egress.mode} via proxy {plan.egress.socket} "
            f"(log {plan.egress.log})"
        )
        if plan.egress.mode == "allowlist":
            lines.append(f"  allowlist: {rules}")
        else:
            inward = [str(rule) for rule in plan.egress.rules if rule.private]
            if inward:
                lines.append(f"  allow-private: {', '.join(inward)}")
        for route in plan.egress.key_routes:
            lines.append(f"  key proxy: {route.var} -> {route.upstream} ({route.header})")
    for forward in plan.port_forwards:
        lines.append(f"forward      {forward} (host address:port:guest port)")
    for var, _ in plan.credentials:
        lines.append(f"credential   {var} (from the environment, passed via fw_cfg)")
    lines.append("launch data")
    lines += [f"  {line}" for line in plan.launch_data.splitlines()]
    lines.append("qemu")
    lines.append("  " + " ".join(plan.qemu_argv))
    return "\n".join(lines)
