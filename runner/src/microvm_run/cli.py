"""Command line: parse, validate, then print the plan (--dry-run) or launch.

A launch plans once: bad input is refused (plan.decide) and the host
checked (preflight.py) before anything is created; then the launch gathers
what only it can (the local-directories slot it claims, the dev shell it
evaluates) and builds the plan it runs.  --dry-run builds the same plan
with the slot free now and the dev shell as foreseen (devshell.foresee).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from microvm_run import contract, usage

TYPE_CHECKING = False  # typing's, without importing typing (3 ms): see tests/unit/test_startup.py
if TYPE_CHECKING:
    from microvm_run.agentgit import GitPlan
    from microvm_run.devshell import DevshellResult
    from microvm_run.git_cli import Session
    from microvm_run.plan import HostFacts, LaunchPlan, RunOptions
    from microvm_run.spec import Spec

# The subcommands (ps, stop, ...) and `help` need none of the launch path's
# modules (plan, spec, host, agentgit and what they import): those are
# imported where a launch or --dry-run needs them, which keeps `ps` quick.

EPILOG_TAIL = """\
environment:
  WORK_DIR               project directory shared at /work (default: the current directory)
  WORK_WORKTREE          default for --worktree
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

# The one rule for words on the command line: a first bare word is a
# subcommand; anything for the agent goes after `--`.  The flavor wrappers
# (`claude-microvm`, ...) are this program with MICROVM_RUN_SPEC preset and
# follow the same rule.
AGENT_ARGS_RULE = "agent arguments go after --"

SubcommandFn = Callable[[list[str], dict[str, str]], int]


@dataclass(frozen=True)
class Subcommand:
    """One subcommand: ``run`` gets argv from the subcommand's name on, and the environment."""

    summary: str  # one line for `microvm-run help`
    run: SubcommandFn


def _module(name: str) -> SubcommandFn:
    """A subcommand whose module has ``main(argv, environ) -> int``; imported only when used."""

    def run(argv: list[str], environ: dict[str, str]) -> int:
        main_fn: SubcommandFn = importlib.import_module(name).main
        return main_fn(argv, environ)

    return run


def _ops(argv: list[str], environ: dict[str, str]) -> int:
    from microvm_run import ops_cli  # noqa: PLC0415 - the launch path never needs it

    return ops_cli.main(argv, environ, boot=lambda spec, accel: _boot_check(environ, spec, accel))


def _help(argv: list[str], environ: dict[str, str]) -> int:
    """`microvm-run help [SUBCOMMAND]`: the list, or one subcommand's usage."""
    if argv[1:] in (["-h"], ["--help"]):
        argv = argv[:1]
    if len(argv) > 2:
        return usage.bad_input(f"help takes at most one subcommand, not {' '.join(argv[1:])!r}")
    if len(argv) == 2:
        word = argv[1]
        if word not in SUBCOMMANDS:
            return usage.bad_input(_unknown_word(word))
        if word == "help":
            print(subcommand_list(), end="")
            return 0
        return SUBCOMMANDS[word].run([word, "--help"], environ)
    print("usage: microvm-run [OPTIONS] [-- AGENT ARGS...]   (microvm-run --help: the options)")
    print("       microvm-run SUBCOMMAND [ARGS...]          (microvm-run SUBCOMMAND --help)")
    print()
    print(subcommand_list(), end="")
    return 0


# Every subcommand, one line each; anything else before `--` is an error.
# A new subcommand in its own module registers here with one line:
#   "name": Subcommand("what it does", _module("microvm_run.name_cli")),
SUBCOMMANDS: dict[str, Subcommand] = {
    "ps": Subcommand("list running instances (and the VMs declared on a NixOS host)", _ops),
    "stop": Subcommand("power off instances (ID... or --all), then force", _ops),
    "gc": Subcommand("remove what dead instances left; --prune homes of vanished projects", _ops),
    "doctor": Subcommand("check this host (KVM, virtiofsd, qemu, user manager, dirs)", _ops),
    "review": Subcommand(
        "the agent's commits: list runs, or one's log, stat and diff",
        _module("microvm_run.git_cli"),
    ),
    "land": Subcommand(
        "put an agent run's commits onto the branch it started from", _module("microvm_run.git_cli")
    ),
    "new": Subcommand(
        "write a new agent VM: a flavor for this project, or --host-config DIR",
        _module("microvm_run.new_cli"),
    ),
    "check": Subcommand(
        "evaluate every agent VM of a flake (nix-eval-jobs): evaluates, valid spec, cache",
        _module("microvm_run.check_cli"),
    ),
    "skill": Subcommand(
        "install the create-agent-vm skill for an agent (skill install --agent claude)",
        _module("microvm_run.skill_cli"),
    ),
    "attach": Subcommand("enter a NixOS host's agent VM", _module("microvm_run.attach_cli")),
    "allow": Subcommand(
        "let a running instance reach a host (--once, --project)", _module("microvm_run.allow_cli")
    ),
    "denied": Subcommand(
        "what a running instance was refused, and how to allow it",
        _module("microvm_run.denied_cli"),
    ),
    "logs": Subcommand(
        "an instance's log (--follow, --json); the list without ID", _module("microvm_run.logs_cli")
    ),
    "help": Subcommand("list the subcommands, or `help SUBCOMMAND` for one's usage", _help),
}


def subcommand_list() -> str:
    width = max(len(name) for name in SUBCOMMANDS)
    lines = ["subcommands (microvm-run SUBCOMMAND --help for each):"]
    lines += [f"  {name.ljust(width)}  {sub.summary}" for name, sub in SUBCOMMANDS.items()]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    try:
        return _main(argv, environ)
    except KeyboardInterrupt:
        # Ctrl-C before QEMU runs (host checks, git, the dev-shell
        # evaluation), or in a subcommand: whatever was started is stopped
        # by then (launch and devshell clean up on the way out).
        return usage.interrupted()


def _main(argv: Sequence[str] | None, environ: Mapping[str, str] | None) -> int:
    env = dict(os.environ if environ is None else environ)
    words = list(sys.argv[1:] if argv is None else argv)
    if words and words[0] in SUBCOMMANDS:
        return SUBCOMMANDS[words[0]].run(words, env)
    from microvm_run import host  # noqa: PLC0415 - see the note at the imports
    from microvm_run.plan import PlanError, build_plan, decide, private_dirs  # noqa: PLC0415
    from microvm_run.spec import SpecError  # noqa: PLC0415

    parser = _parser(env)
    try:
        args, agent_args = _split_words(parser, words)
    except usage.UsageError as err:
        return usage.bad_input(str(err))
    if args.help:
        parser.print_help()
        return 0
    try:
        spec = _load_spec(args.spec)
        options = _options(args, agent_args)
        facts = host.gather(spec, env, work_dir_arg=args.work_dir, allow_home=args.allow_home)
        facts = replace(facts, git=_plan_git(facts, args.worktree, env, trust=args.trust_git))
        if args.dry_run:
            return _dry_run(build_plan(spec, options, _foreseen(spec, facts, env)), args.json)
        from microvm_run import preflight  # noqa: PLC0415 - only a launch checks the host

        # The key stays in this process's memory (the key proxy needs it) and
        # in its initial environment: make both unreadable to the user's
        # other processes, the dev-shell evaluation included.
        keep_keys_private()
        # Bad input and a host that cannot launch are refused before anything
        # is created; the plan waits for what the launch gathers (_launch).
        decide(spec, options, facts)
        preflight.check(
            spec,
            options.accel,
            private_dirs=private_dirs(spec, facts),
            runtime_base=facts.runtime_base,
            work_dir=facts.work_dir,
            environ=env,
            trust_git=args.trust_git,
        )
    except (SpecError, PlanError, host.HostError) as err:
        return usage.bad_input(str(err))
    return _launch(spec, options, facts, env, trust_git=args.trust_git)


def _dry_run(plan: LaunchPlan, as_json: bool) -> int:
    if as_json:
        import json  # noqa: PLC0415 - only --json needs it

        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print(_describe(plan))
    return 0


def _launch(
    spec: Spec, options: RunOptions, facts: HostFacts, env: dict[str, str], *, trust_git: bool
) -> int:
    """Gather what only a launch can (the local-directories slot, the dev
    shell), build the one plan, and launch it; the agent's exit status."""
    from microvm_run import git_cli, launch, openfiles  # noqa: PLC0415 - keeps --dry-run imports small
    from microvm_run.plan import PlanError, build_plan, chosen_local_dirs, private_dirs  # noqa: PLC0415

    too_many = openfiles.warning(facts.work_dir, openfiles.hard_limit())
    if too_many is not None:
        print(f"microvm-run: warning: {too_many}", file=sys.stderr)
    slot_lock = None
    try:
        try:
            if chosen_local_dirs(options, facts):
                # Held until the VM has ended: no other instance mounts this disk.
                slot, slot_lock = _claim_local_slot(facts)
                facts = replace(facts, local_slot=slot)
            launch.create_private_dirs(private_dirs(spec, facts))
            facts = _prepare_devshell(spec, facts, env)
            plan = build_plan(spec, options, facts)
            session = git_cli.before_run(plan.git, env, project=plan.work_dir, trust_git=trust_git)
        except (launch.LaunchError, git_cli.GitError) as err:
            print(f"microvm-run: {err}", file=sys.stderr)
            return contract.EXIT_NO_STATUS
        return _launch_logged(plan, env, session)
    except PlanError as err:
        return usage.bad_input(str(err))
    finally:
        if slot_lock is not None:
            os.close(slot_lock)


def _launch_logged(plan: LaunchPlan, env: Mapping[str, str], session: Session | None) -> int:
    """Launch, import the agent's commits, and keep the instance's log (instancelog.py)."""
    from microvm_run import git_cli, instancelog, launch  # noqa: PLC0415

    log = instancelog.InstanceLog(instancelog.log_path(env, plan.instance_id))
    log.open()
    started = time.monotonic()
    code = contract.EXIT_NO_STATUS
    error = ""
    try:
        code = launch.launch(plan, env, log)
    except launch.LaunchError as err:
        error = str(err)
        print(f"microvm-run: {err}", file=sys.stderr)
    finally:
        # Again at the end: a --trust-git given while this VM ran must not
        # outlast what its agent wrote meanwhile.
        with contextlib.suppress(git_cli.GitError):
            git_cli.mark_run(env, plan.work_dir, git_hidden=plan.git is not None)
        imported = git_cli.after_run(session, env)
        if imported is not None:
            log.event("git", branch=imported.branch, commits=imported.commits, head=imported.head)
        log.event("stop", exit=code, seconds=round(time.monotonic() - started, 1), error=error)
        log.close()
    return code


def _claim_local_slot(facts: HostFacts) -> tuple[int, int]:
    from microvm_run import localdirs  # noqa: PLC0415
    from microvm_run.plan import PlanError  # noqa: PLC0415

    try:
        return localdirs.claim_slot(facts.state_dir)
    except localdirs.LocalDirsError as err:
        raise PlanError(str(err)) from None
    except OSError as err:
        raise PlanError(f"the local-directories disk: {err}") from None


def _split_words(
    parser: argparse.ArgumentParser, words: list[str]
) -> tuple[argparse.Namespace, list[str]]:
    """Our options, and the agent's arguments: everything after the first `--`, untouched."""
    if "--" in words:
        cut = words.index("--")
        ours, agent_args = words[:cut], words[cut + 1 :]
    else:
        ours, agent_args = words, []
    if ours and not ours[0].startswith("-"):
        # Before parsing, so `nosuch --help` is an error too, not the launch help.
        raise usage.UsageError(_unknown_word(ours[0]))
    args, extra = parser.parse_known_args(ours)
    if extra and extra[0].startswith("-"):
        raise usage.UsageError(
            f"unknown option {extra[0]}: {AGENT_ARGS_RULE} (`-- {' '.join(extra)}`; "
            "`nix run` takes the first -- itself: `nix run FLAKE -- -- ARGS`)"
        )
    if extra:
        raise usage.UsageError(_unknown_word(extra[0]))
    return args, agent_args


def _unknown_word(word: str) -> str:
    """One line for a bare word that is not a subcommand, with the closest one if any."""
    if word in SUBCOMMANDS:  # after an option: `microvm-run --json ps`
        return f"the subcommand {word} comes first (microvm-run {word} ...); {AGENT_ARGS_RULE}"
    import difflib  # noqa: PLC0415 - only a mistyped word needs it

    close = difflib.get_close_matches(word, SUBCOMMANDS, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    return f"{word!r} is not a subcommand ({hint}microvm-run help lists them; {AGENT_ARGS_RULE})"


def _plan_git(
    facts: HostFacts, worktree: str | None, env: Mapping[str, str], *, trust: bool
) -> GitPlan | None:
    from microvm_run import agentgit, host  # noqa: PLC0415
    from microvm_run.plan import PlanError  # noqa: PLC0415

    try:
        plan = agentgit.plan_git(
            facts.work_dir,
            host.state_home(env),
            worktree=worktree or None,
            instance_id=facts.instance_id,
            trust_git=trust,
        )
        if plan is None:
            return None
        if plan.project.is_relative_to(facts.agent_home):
            # The home share would show the project's .git unmasked.
            raise PlanError(f"AGENT_HOME {facts.agent_home} contains the project; set it elsewhere")
        return agentgit.with_submodules(plan, env)
    except (ValueError, agentgit.GitError) as err:
        raise PlanError(str(err)) from None


def _boot_check(env: Mapping[str, str], spec_path: Path, accel: str) -> int:
    """`doctor --boot`: boot the flavor's guest with `true` in a throw-away project."""
    import tempfile  # noqa: PLC0415 - only doctor --boot needs it

    from microvm_run import host, launch, preflight, process  # noqa: PLC0415
    from microvm_run.plan import RunOptions, build_plan  # noqa: PLC0415
    from microvm_run.spec import load_spec  # noqa: PLC0415

    spec = replace(load_spec(spec_path), command=("true",))
    preflight.check_runnable(spec, accel)
    with tempfile.TemporaryDirectory(prefix="microvm-doctor-") as scratch:
        work = Path(scratch) / "work"
        work.mkdir()
        # No keys, no network, a home that goes away with the check.
        boot_env = {**process.without(env, spec.api_key_vars), "AGENT_HOME": f"{scratch}/home"}
        facts = host.gather(spec, boot_env, work_dir_arg=str(work), allow_home=False)
        plan = build_plan(spec, RunOptions(accel=accel, net="none", inject_keys=False), facts)
        return launch.launch(plan, boot_env)


def _devshell_request(spec: Spec, env: Mapping[str, str]) -> tuple[str, str] | str | None:
    """DIRENV_ALLOW: (its value, the guest's home) to evaluate the dev shell
    for, a line on why it is ignored, or None when not asked for."""
    allow = env.get("DIRENV_ALLOW")
    if not allow or allow == "0":
        return None
    from microvm_run import consent  # noqa: PLC0415 - only DIRENV_ALLOW needs it

    if not consent.is_allow_value(allow):
        return f"DIRENV_ALLOW={allow!r} ignored: use 1, or the digest microvm-run printed"
    home_share = spec.share_by_source("home")
    if home_share is None:
        return "DIRENV_ALLOW=1 ignored: this flavor shares no home"
    return allow, home_share.mount_point


def _foreseen(spec: Spec, facts: HostFacts, env: Mapping[str, str]) -> HostFacts:
    """--dry-run: the dev shell as the launch would find it, nothing evaluated."""
    request = _devshell_request(spec, env)
    if request is None:
        return facts
    if isinstance(request, str):
        return replace(facts, devshell=request)
    from microvm_run import devshell, preflight  # noqa: PLC0415 - only DIRENV_ALLOW=1

    allow, guest_home = request
    guest_file, line = devshell.foresee(
        facts.work_dir,
        state_dir=facts.state_dir,
        allow=allow,
        guest_home=guest_home,
        others_running=preflight.others_running(facts.runtime_base, facts.work_dir),
    )
    return replace(facts, devshell_guest_file=guest_file, devshell=line)


def _prepare_devshell(spec: Spec, facts: HostFacts, env: Mapping[str, str]) -> HostFacts:
    """With DIRENV_ALLOW, the project's dev shell for the guest (cached on the host)."""
    request = _devshell_request(spec, env)
    if request is None:
        return facts
    if isinstance(request, str):
        print(f"microvm-run: {request}", file=sys.stderr)
        return replace(facts, devshell=request)
    from microvm_run import devshell, evalguard, preflight, process  # noqa: PLC0415 - only DIRENV_ALLOW=1

    allow, guest_home = request
    base = facts.runtime_base
    with contextlib.ExitStack() as announced:
        # Announced before looking for VMs, held until Nix is done: a VM
        # that starts meanwhile waits for it (evalguard).
        try:
            announced.enter_context(evalguard.evaluating(base, facts.work_dir))
            others_running = preflight.others_running(base, facts.work_dir)
        except OSError as err:
            print(
                f"microvm-run: the dev shell is not evaluated: cannot lock it in {base}: "
                f"{err.strerror or err}",
                file=sys.stderr,
            )
            others_running = True
        result = devshell.prepare(
            facts.work_dir,
            facts.agent_home,
            state_dir=facts.state_dir,
            allow=allow,
            others_running=others_running,
            progress=sys.stderr,
            guest_home=guest_home,
            # The project's Nix code runs here: it gets no API key to copy.
            env=process.without(env, spec.api_key_vars),
        )
    return replace(
        facts, devshell_guest_file=result.guest_env_file, devshell=_devshell_line(result)
    )


def _devshell_line(result: DevshellResult) -> str:
    """What became of the dev shell (devshell.DevshellResult), for the plan."""
    if result.status == "hit":
        return f"cached, no evaluation ({result.env_file})"
    return str(result.message or result.status)


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


def _parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    from microvm_run.localdirs import DEFAULT_SIZE_GIB  # noqa: PLC0415
    from microvm_run.netmode import NET_ALIASES, NetMode  # noqa: PLC0415
    from microvm_run.plan import SUPERVISOR_CHOICES  # noqa: PLC0415
    from microvm_run.qemu import Accel  # noqa: PLC0415
    from microvm_run.virtiofsd import DEFAULT_FS_CACHE, FS_CACHE_MODES  # noqa: PLC0415

    parser = usage.Parser(
        prog="microvm-run",
        usage="microvm-run [OPTIONS] [-- AGENT ARGS...]\n       microvm-run SUBCOMMAND [ARGS...]",
        description="Start the agent in a throw-away microVM with WORK_DIR shared at /work.",
        epilog=subcommand_list() + "\n" + EPILOG_TAIL,
        formatter_class=usage.quick_formatter(argparse.RawDescriptionHelpFormatter),
        # Our own --help: a stray word before it must be an error, not the help.
        add_help=False,
    )
    add = parser.add_argument
    add("-h", "--help", action="store_true", help="show this help and exit")
    add("--spec", default=env.get("MICROVM_RUN_SPEC"), help="the flavor's guest spec (TOML)")
    add("--work-dir", help="project directory (default: $WORK_DIR or the current directory)")
    add(
        "--accel",
        default=env.get("MICROVM_ACCEL", "kvm"),
        choices=[a.value for a in Accel],
        help="kvm (default) or tcg (software emulation: slow, works without KVM)",
    )
    add(
        "--net",
        default=env.get("MICROVM_NET", "open"),
        choices=[*(n.value for n in NetMode), *NET_ALIASES],
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
        "--allow-preset",
        metavar="NAME",
        action="append",
        default=_words(env.get("MICROVM_ALLOW_PRESET", "")),
        help="with --net allowlist: also allow an ecosystem's package hosts "
        "(npm, cargo, go, python, nix), or auto: those the project's lockfiles name; repeatable",
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
        choices=SUPERVISOR_CHOICES,
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
    add(
        "--worktree",
        metavar="NAME",
        default=env.get("WORK_WORKTREE") or None,
        help="work in the runner's own working tree NAME on branch agent/NAME "
        "(created from HEAD, kept until landed; see microvm-run review/land)",
    )
    add(
        "--trust-git",
        action="store_true",
        help="treat the project's .git as yours though it appeared after an agent could "
        "write the project (check it first)",
    )
    add(
        "--fs-cache",
        default=env.get("MICROVM_FS_CACHE", DEFAULT_FS_CACHE),
        choices=FS_CACHE_MODES,
        help="virtiofsd's cache for /work and the home: auto (default: host edits seen "
        "within 1 s), always (faster metadata; host edits may stay unseen), never",
    )
    add(
        "--local-dirs",
        metavar="DIR,...",
        help="keep these /work directories on the guest's own disk (default: what the "
        "project's lockfiles imply: node_modules, target, .venv, ...; see README)",
    )
    add(
        "--no-local-dirs",
        action="store_true",
        help="keep every directory of /work on the share (no guest-local disk)",
    )
    add(
        "--local-dirs-size",
        metavar="GIB",
        default=str(DEFAULT_SIZE_GIB),
        help=f"size of a new local-directories disk, sparse (default {DEFAULT_SIZE_GIB})",
    )
    add("--allow-home", action="store_true", help="allow WORK_DIR to be your home directory")
    add("--dry-run", action="store_true", help="print the launch plan and start nothing")
    add("--json", action="store_true", help="with --dry-run: print the plan as JSON")
    return parser  # fmt: skip


def _words(raw: str) -> list[str]:
    return [word for word in raw.replace(",", " ").split() if word]


def _flag(raw: str | None) -> bool | None:
    if raw is None or raw == "":
        return None
    return raw.lower() in {"1", "yes", "true", "on"}


def _load_spec(path: str | None) -> Spec:
    from microvm_run.spec import SpecError, load_spec  # noqa: PLC0415

    if not path:
        raise SpecError(
            "no spec: pass --spec FILE or set MICROVM_RUN_SPEC (the flavor packages do)"
        )
    return load_spec(Path(path))


def _options(args: argparse.Namespace, agent_args: Sequence[str]) -> RunOptions:
    from microvm_run.localdirs import DEFAULT_SIZE_GIB, MAX_SIZE_GIB  # noqa: PLC0415
    from microvm_run.plan import PlanError, RunOptions  # noqa: PLC0415
    from microvm_run.spec import MAX_MEMORY_MIB, MAX_VCPUS  # noqa: PLC0415

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
        allow_presets=tuple(args.allow_preset),
        ports=tuple(args.publish),
        inject_keys=args.inject_keys,
        supervisor=args.supervisor,
        boot_timeout_s=boot_timeout,
        memory_mib=_bounded("--mem", args.mem, 64, MAX_MEMORY_MIB),
        vcpus=_bounded("--vcpus", args.vcpus, 1, min(MAX_VCPUS, os.cpu_count() or 1)),
        agent_args=tuple(agent_args),
        fs_cache=args.fs_cache,
        local_dirs=_local_dirs(args),
        local_dirs_size_gib=_bounded("--local-dirs-size", args.local_dirs_size, 1, MAX_SIZE_GIB)
        or DEFAULT_SIZE_GIB,
    )


def _local_dirs(args: argparse.Namespace) -> tuple[str, ...] | None:
    from microvm_run import localdirs  # noqa: PLC0415
    from microvm_run.plan import PlanError  # noqa: PLC0415

    if args.no_local_dirs:
        if args.local_dirs is not None:
            raise PlanError("--local-dirs and --no-local-dirs contradict each other")
        return ()
    if args.local_dirs is None:
        return None
    try:
        return localdirs.parse(args.local_dirs)
    except localdirs.LocalDirsError as err:
        raise PlanError(str(err)) from None


def _bounded(flag: str, raw: str | None, low: int, high: int) -> int | None:
    from microvm_run.plan import PlanError  # noqa: PLC0415

    if raw is None or raw == "":
        return None
    if not raw.isdigit():
        raise PlanError(f"{flag} must be a whole number, not {raw!r}")
    value = int(raw)
    if not low <= value <= high:
        raise PlanError(f"{flag} {value} is out of range {low}..{high}")
    return value


def _describe(plan: LaunchPlan) -> str:
    from microvm_run.virtiofsd import Supervisor  # noqa: PLC0415 - see the note at the imports

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
        where = f"unit {daemon.unit}" if plan.supervisor == Supervisor.SYSTEMD else "child process"
        lines.append(f"  share {daemon.tag}: {daemon.shared_dir} ({where})")
        lines.append(f"    {' '.join(daemon.argv)}")
    lines += _describe_egress(plan)
    if plan.git is not None:
        git = plan.git
        lines.append(f"git          {git.mode}: agent branch {git.branch}, state {git.run_dir}")
        for flag, source, target in git.binds:
            lines.append(f"  {flag} {source} -> {target} (in virtiofsd's namespace)")
    if plan.devshell:
        lines.append(f"dev shell    {plan.devshell}")
    if plan.local_dirs:
        lines.append(
            f"local dirs   {' '.join(plan.local_dirs)} on {plan.local_image} "
            f"({plan.local_size_bytes >> 30} GiB, sparse)"
        )
    for forward in plan.port_forwards:
        lines.append(f"forward      {forward} (host address:port:guest port)")
    for var, _ in plan.credentials:
        lines.append(f"credential   {var} (from the environment, passed via fw_cfg)")
    lines.append("launch data")
    lines += [f"  {line}" for line in plan.launch_data.splitlines()]
    lines.append("qemu")
    lines.append("  " + " ".join(plan.qemu_argv))
    return "\n".join(lines)


def _describe_egress(plan: LaunchPlan) -> list[str]:
    from microvm_run.egresslog import printable  # noqa: PLC0415 - only --dry-run needs it

    if plan.egress is None:
        return []
    rules = ", ".join(str(rule) for rule in plan.egress.rules) or "none"
    egress = plan.egress
    lines = [f"egress       {egress.mode} via proxy {egress.socket} (log {egress.log})"]
    if plan.egress.mode == "allowlist":
        lines.append(f"  allowlist: {rules}")
        for use in plan.presets:
            found = f" ({printable(use.found, spaces=True)})" if use.found else ""
            how = "" if use.applied else f" -- not applied: --allow-preset {use.name} or auto"
            lines.append(f"  preset {use.name}{found}: {', '.join(use.hosts)}{how}")
    else:
        inward = [str(rule) for rule in plan.egress.rules if rule.private]
        if inward:
            lines.append(f"  allow-private: {', '.join(inward)}")
    for route in plan.egress.key_routes:
        lines.append(f"  key proxy: {route.var} -> {route.upstream} ({route.header})")
    return lines
