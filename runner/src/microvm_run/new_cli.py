"""``microvm-run new NAME``: observe, plan (newvm.py, pure), then carry the plan out.

Exit status: 0 done or nothing to do; 1 refused (an entry changed by hand, a
file new did not make, a workspace in the way, a failed clone); 2 bad input.
Bad input and refusals are found before anything is written.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import ipaddress
import os
import pwd
import re
import shutil
import stat
import sys
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import NoReturn

from microvm_run import newvm, process, safefs
from microvm_run.contract import EXIT_BAD_INPUT
from microvm_run.newvm import (
    AGENTS,
    Clone,
    MakeDir,
    NewError,
    NewRefused,
    Observed,
    Plan,
    Request,
    WriteFile,
)

EXIT_REFUSED = 1
MAX_FILE = 1 << 20  # agent.nix, agent-vms.nix, flake.nix, .git/config
_ORIGIN_RE = re.compile(r'^\s*\[remote\s+"origin"\]\s*$')
_URL_RE = re.compile(r"^\s*url\s*=\s*(\S+)\s*$")
_SECTION_RE = re.compile(r"^\s*\[")


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _UsageError(message)


def parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="microvm-run new",
        description=(
            "Write a new agent VM: a flavor for this project (agent.nix with lib.mkAgentVM, "
            "and a flake.nix when there is none), or with --host-config DIR a VM declared "
            "on a NixOS host (DIR/agent-vms.nix). Packages are detected from the project "
            "(go.mod, package.json, Cargo.toml, pyproject.toml). Run it again: it changes "
            "nothing, and never replaces an entry you edited."
        ),
        epilog="exit status: 0 done or nothing to do; 1 refused; 2 bad input.",
    )
    p.add_argument("name", metavar="NAME", help="the VM's name (a-z, 0-9, -)")
    p.add_argument("--agent", default="claude", help=f"one of {', '.join(AGENTS)} (claude)")
    p.add_argument("--cri", action="store_true", help="with container runtimes (the -cri flavor)")
    p.add_argument("--memory", type=int, metavar="MIB", help="guest memory in MiB")
    p.add_argument("--vcpus", type=int, metavar="N", help="guest vCPUs")
    p.add_argument(
        "--package",
        action="append",
        default=[],
        metavar="ATTR",
        help="a nixpkgs package for the guest, besides the detected ones (repeatable)",
    )
    p.add_argument("--no-detect", action="store_true", help="add no detected packages")
    p.add_argument("--replace", action="store_true", help="rewrite NAME's entry if new wrote it")
    p.add_argument("--dry-run", action="store_true", help="print what would change; write nothing")
    flavor = p.add_argument_group("a flavor for a project (the default)")
    flavor.add_argument("--work-dir", help="the project (default: $WORK_DIR or .)")
    flavor.add_argument(
        "--flake-url",
        default=newvm.DEFAULT_FLAKE_URL,
        help=f"agent-microvm's flake in a new flake.nix ({newvm.DEFAULT_FLAKE_URL})",
    )
    host = p.add_argument_group("a VM declared on a NixOS host")
    host.add_argument("--host-config", metavar="DIR", help="the host's configuration directory")
    host.add_argument("--user", help="the host user the VM works for ($SUDO_USER or you)")
    host.add_argument(
        "--state-root",
        default=str(newvm.DEFAULT_STATE_ROOT),
        metavar="DIR",
        help=f"microvm.nix's state dir: NAME's is STATE_ROOT/NAME ({newvm.DEFAULT_STATE_ROOT})",
    )
    host.add_argument(
        "--workspace-root",
        default=str(newvm.DEFAULT_WORKSPACE_ROOT),
        metavar="DIR",
        help=f"where workspaces go ({newvm.DEFAULT_WORKSPACE_ROOT})",
    )
    host.add_argument("--workspace", metavar="DIR", help="the VM's /work (WORKSPACE_ROOT/NAME)")
    host.add_argument("--subnet", default=str(newvm.DEFAULT_SUBNET), help="the VMs' network")
    host.add_argument("--address", help="the VM's address (default: the next free one)")
    host.add_argument("--clone", metavar="URL", help="git clone URL into the empty workspace")
    return p


def main(argv: Sequence[str], environ: Mapping[str, str]) -> int:
    try:
        args = parser().parse_args(list(argv[1:]))
        req = _request(args, environ)
        seen = observe(req)
        plan = newvm.plan_new(req, seen)
    except SystemExit as done:  # --help
        return done.code if isinstance(done.code, int) else 0
    except (_UsageError, NewError) as err:
        return _fail(str(err), EXIT_BAD_INPUT)
    except NewRefused as err:
        return _fail(str(err), EXIT_REFUSED)
    except OSError as err:
        return _fail(_os_error(err), EXIT_BAD_INPUT)
    if args.dry_run:
        _show(plan, dry_run=True, clone_pending=any(isinstance(a, Clone) for a in plan.actions))
        return 0
    try:
        plan = carry_out(req, plan, environ)
    except NewRefused as err:
        return _fail(str(err), EXIT_REFUSED)
    except (NewError, OSError, process.ProcessError) as err:
        return _fail(_os_error(err) if isinstance(err, OSError) else str(err), EXIT_REFUSED)
    _show(plan, dry_run=False, clone_pending=False)
    return 0


def _fail(message: str, code: int) -> int:
    print(f"microvm-run new: {message}", file=sys.stderr)
    return code


def _os_error(err: OSError) -> str:
    where = f"{err.filename}: " if err.filename else ""
    return f"{where}{err.strerror or err}"


def _request(args: argparse.Namespace, environ: Mapping[str, str]) -> Request:
    common = {
        "name": args.name,
        "agent": args.agent,
        "cri": args.cri,
        "memory_mib": args.memory,
        "vcpus": args.vcpus,
        "packages": tuple(args.package),
        "detect": not args.no_detect,
        "replace": args.replace,
    }
    if args.host_config is None:
        for flag in ("workspace", "address", "clone"):
            if getattr(args, flag) is not None:
                raise NewError(f"--{flag} needs --host-config (it is for a VM declared on a host)")
        project = Path(args.work_dir or environ.get("WORK_DIR") or os.getcwd()).expanduser()
        if not project.is_dir():
            raise NewError(f"the project {project} is not a directory")
        return Request(mode="flavor", project=project.resolve(), flake_url=args.flake_url, **common)
    host_config = Path(args.host_config).expanduser()
    if not host_config.is_dir():
        raise NewError(f"--host-config {host_config} is not a directory")
    try:
        subnet = ipaddress.IPv4Network(args.subnet)
    except ValueError as err:
        raise NewError(f"bad --subnet {args.subnet!r}: {err}") from None
    try:
        address = ipaddress.IPv4Address(args.address) if args.address is not None else None
    except ValueError:
        raise NewError(f"bad --address {args.address!r}: not an IPv4 address") from None
    state_root = Path(args.state_root).expanduser()
    workspace_root = Path(args.workspace_root).expanduser()
    workspace = Path(args.workspace).expanduser() if args.workspace else None
    paths = (("--state-root", state_root), ("--workspace-root", workspace_root))
    for flag, path in (*paths, ("--workspace", workspace)):
        if path is not None and not path.is_absolute():
            raise NewError(f"{flag} {path} must be an absolute path")
    return Request(
        mode="host",
        host_config=host_config.resolve(),
        user=args.user or environ.get("SUDO_USER") or environ.get("USER") or _me(),
        state_root=state_root,
        workspace_root=workspace_root,
        workspace=workspace,
        subnet=subnet,
        address=address,
        clone=args.clone,
        **common,
    )


def _me() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return ""


# -- observing ------------------------------------------------------------------------------


def observe(req: Request) -> Observed:
    """Read what the plan depends on; files under a project or workspace through safefs."""
    if req.mode == "flavor":
        with safefs.opened_dir(req.project) as fd:
            return Observed(
                managed=_read_text(fd, newvm.FLAVOR_FILE),
                flake=_read_text(fd, newvm.FLAKE_FILE),
                files=_present(fd),
                git=_exists(fd, ".git"),
            )
    with safefs.opened_dir(req.host_config) as fd:
        managed = _read_text(fd, newvm.HOST_FILE)
    workspace, state_dir = newvm.host_dirs(req)
    existing = frozenset(p for p in (workspace, state_dir) if _is_dir(p))
    if workspace not in existing:
        return Observed(managed=managed, existing_dirs=existing)
    with safefs.opened_dir(workspace) as fd:
        return Observed(
            managed=managed,
            flake=_read_text(fd, newvm.FLAKE_FILE),
            files=_present(fd),
            existing_dirs=existing,
            workspace_empty=not os.listdir(fd),
            workspace_origin=_origin(fd),
        )


def _read_text(dir_fd: int, name: str) -> str | None:
    data = safefs.read_regular(dir_fd, name, MAX_FILE)
    if data is None:
        return None
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise NewError(f"{name} is not UTF-8 text") from None


def _exists(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _present(dir_fd: int) -> frozenset[str]:
    """Which of the files detection looks at are regular files (a symlink does not count)."""
    found = set()
    for name in newvm.DETECTED_FILES:
        try:
            info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            continue
        if stat.S_ISREG(info.st_mode):
            found.add(name)
    return frozenset(found)


def _is_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _origin(dir_fd: int) -> str | None:
    """remote.origin.url of a clone, read as text (no git runs on the workspace)."""
    try:
        data = safefs.read_regular(dir_fd, ".git/config", MAX_FILE)
    except OSError:
        return None
    if data is None:
        return None
    in_origin = False
    for line in data.decode(errors="replace").splitlines():
        if _ORIGIN_RE.match(line):
            in_origin = True
        elif _SECTION_RE.match(line):
            in_origin = False
        elif in_origin and (url := _URL_RE.match(line)):
            return url.group(1)
    return None


# -- acting ---------------------------------------------------------------------------------


def carry_out(req: Request, plan: Plan, environ: Mapping[str, str]) -> Plan:
    """Do the plan: directories and the clone first, then (after detection in a fresh clone)
    the files. A failure removes the directories this run made."""
    made: list[Path] = []
    cloned: Path | None = None
    try:
        for action in plan.actions:
            if isinstance(action, MakeDir):
                _make_dir(action, made)
                if req.mode == "host" and action.path == newvm.host_dirs(req)[0]:
                    _give_to(action.path, req.user)
        clone = next((a for a in plan.actions if isinstance(a, Clone)), None)
        if clone is not None:
            _clone(clone, environ)
            cloned = clone.dest
            # What the clone holds decides the packages: plan again on it.
            replanned = newvm.plan_new(replace(req, clone=None), observe(req))
            plan = replace(
                replanned, changes=plan.changes, next_steps=plan.next_steps, notes=replanned.notes
            )
        for action in plan.actions:
            if isinstance(action, WriteFile):
                _write(action)
    except BaseException:
        if cloned is not None and cloned not in made:
            # It was an empty workspace before the clone: make it one again.
            for entry in os.listdir(cloned):
                _remove(cloned / entry)
        for path in reversed(made):
            shutil.rmtree(path, ignore_errors=True)
        raise
    return plan


def _give_to(path: Path, user: str) -> None:
    """A workspace made as root goes to the VM's user: its agent has that user's uid."""
    if os.geteuid() != 0:
        return
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        return
    os.chown(path, entry.pw_uid, entry.pw_gid, follow_symlinks=False)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _make_dir(action: MakeDir, made: list[Path]) -> None:
    missing = [p for p in (action.path, *action.path.parents) if not _is_dir(p)]
    for path in reversed(missing):
        try:
            os.mkdir(path, action.mode if path == action.path else 0o755)
        except FileExistsError:
            raise NewRefused(f"{path} appeared while planning, or is not a directory") from None
        made.append(path)


def _clone(action: Clone, environ: Mapping[str, str]) -> None:
    env = process.without(environ, ("ANTHROPIC_API_KEY", "GEMINI_API_KEY", "OPENAI_API_KEY"))
    env["GIT_TERMINAL_PROMPT"] = "0"
    done = process.run(
        ["git", "clone", "--quiet", "--", action.url, str(action.dest)], env=env, timeout=600
    )
    if done.returncode != 0:
        why = done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"]
        raise NewRefused(f"git clone {action.url} failed: {why[0]}")


def _write(action: WriteFile) -> None:
    with safefs.opened_dir(action.path.parent) as fd:
        now = _read_text(fd, action.path.name)
        if now != action.before:
            raise NewRefused(f"{action.path} changed while new was planning; run it again")
        try:
            safefs.write_replacing(fd, action.path.name, action.text.encode(), 0o644)
        except OSError as err:
            if err.errno == errno.EACCES:
                raise NewError(f"cannot write {action.path}: permission denied") from None
            raise


def _show(plan: Plan, *, dry_run: bool, clone_pending: bool) -> None:
    if not plan.changes:
        print("new: nothing to do: the entry is as asked")
    for change in plan.changes:
        print(f"{'would: ' if dry_run else ''}{change}")
    if plan.address is not None:
        print(f"address: {plan.address}")
    if clone_pending:
        print("packages: detected after the clone")
    else:
        print(f"packages: {' '.join(plan.packages) or '(none)'}")
    for note in plan.notes:
        print(f"note: {note}")
    for step in plan.next_steps:
        print(f"next: {step}")
    with contextlib.suppress(BrokenPipeError):
        sys.stdout.flush()
