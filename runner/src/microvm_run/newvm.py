"""``microvm-run new``, the pure part: a request and what was observed in, a plan out.

Two modes write one entry each into a Nix file that ``new`` manages:

- a *flavor* for a project: ``agent.nix`` beside the project's flake, an
  attribute set of ``agent-microvm.lib.mkAgentVM`` calls (plus a minimal
  ``flake.nix`` when the project has none);
- a *host-declared VM*: ``agent-vms.nix`` in the host's configuration
  directory, a NixOS module of ``services.agent-microvm.vms.NAME`` entries
  (the host module's options are named once, in HOST_VM_OPTIONS).

Every entry sits between a begin and an end marker; the end marker records a
digest of what ``new`` wrote, so an entry the user changed is recognised and
never replaced. Nothing here touches the file system: new_cli observes,
calls ``plan_new``, and carries out the returned actions.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from microvm_run.spec import MAX_MEMORY_MIB, MAX_VCPUS

# The flavors of lib/flavors.nix (tests/unit/test_newvm.py compares them).
AGENTS = ("claude", "codex", "gemini", "qwen")

# Where the agent-microvm flake comes from in a generated flake.nix (README: Using the flake).
DEFAULT_FLAKE_URL = "github:ORG/agent-microvm"
FLAKE_SYSTEM = "x86_64-linux"

FLAVOR_FILE = "agent.nix"
FLAKE_FILE = "flake.nix"
HOST_FILE = "agent-vms.nix"

# The host module of host-declared VMs (modules/host.nix,
# services.agent-microvm.vms.<name>): the option path and each option's name,
# written once here. Keys are what `new` knows; values are the module's names.
HOST_VMS_OPTION = "services.agent-microvm.vms"
HOST_VM_OPTIONS: Mapping[str, str] = {
    "flavor": "flavor",
    "workspace": "workspace",
    "user": "user",
    "address": "address",
    "mac": "mac",
    "packages": "packages",
    "modules": "modules",
    "memory_mib": "resources.memoryMiB",
    "vcpus": "resources.vcpus",
}
# The module's bridge (bridge.address 10.77.0.1, bridge.prefixLength 24).
DEFAULT_SUBNET = ipaddress.IPv4Network("10.77.0.0/24")
# microvm.nix's microvm.stateDir: the module keeps each VM's state in STATE_ROOT/NAME.
DEFAULT_STATE_ROOT = Path("/var/lib/microvms")
DEFAULT_WORKSPACE_ROOT = Path("/var/lib/agent-microvm/workspaces")

# Project files -> the guest packages (nixpkgs attribute paths) they call for.
DETECTORS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("go.mod", ("go", "gopls")),
    ("package.json", ("nodejs",)),
    ("Cargo.toml", ("rustc", "cargo")),
    ("pyproject.toml", ("python3", "uv")),
)
DETECTED_FILES = (*(name for name, _ in DETECTORS), FLAKE_FILE)

MARK = "# microvm-run new:"
TAIL = f"{MARK} entries go above this line"
_BEGIN_RE = re.compile(rf"^\s*{re.escape(MARK)} begin (\S+)\s*$")
_END_RE = re.compile(rf"^\s*{re.escape(MARK)} end (\S+) ([0-9a-f]{{12}})\s*$")
_ADDRESS_RE = re.compile(r'\baddress\s*=\s*"([0-9.]+)"')
_NAME_RE = re.compile(r"[a-z](?:[a-z0-9-]{0,30}[a-z0-9])?")
_NIX_IDENT = r"[A-Za-z_][A-Za-z0-9_'-]*"
_PACKAGE_RE = re.compile(rf"{_NIX_IDENT}(?:\.{_NIX_IDENT})*")
_CLONE_RE = re.compile(r"[A-Za-z0-9@:/._~+%-]+")
_USER_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}")

Mode = Literal["flavor", "host"]


class NewError(ValueError):
    """Bad input: one line for the user, exit 2, nothing written."""


class NewRefused(Exception):
    """The request is fine but the files say no (an edited entry): exit 1."""


@dataclass(frozen=True)
class Request:
    name: str
    mode: Mode
    agent: str = "claude"
    cri: bool = False
    memory_mib: int | None = None
    vcpus: int | None = None
    packages: tuple[str, ...] = ()  # asked for with --package, beside the detected ones
    detect: bool = True
    replace: bool = False
    # flavor mode
    project: Path = Path()
    flake_url: str = DEFAULT_FLAKE_URL
    # host mode
    host_config: Path = Path()
    user: str = ""
    state_root: Path = DEFAULT_STATE_ROOT
    workspace_root: Path = DEFAULT_WORKSPACE_ROOT
    workspace: Path | None = None
    subnet: ipaddress.IPv4Network = DEFAULT_SUBNET
    address: ipaddress.IPv4Address | None = None
    clone: str | None = None


@dataclass(frozen=True)
class Observed:
    """What new_cli read before planning."""

    managed: str | None  # the managed file's text (agent.nix or agent-vms.nix), None if absent
    flake: str | None = None  # the project's flake.nix (flavor mode)
    files: frozenset[str] = frozenset()  # which DETECTED_FILES exist where detection looks
    existing_dirs: frozenset[Path] = frozenset()  # host mode: which of the dirs exist
    workspace_empty: bool = True  # host mode: the workspace has no entries (or is absent)
    workspace_origin: str | None = None  # host mode: its git remote, when it is a clone
    git: bool = False  # flavor mode: the project is a git checkout (a flake sees tracked files)


@dataclass(frozen=True)
class WriteFile:
    path: Path
    text: str
    before: str | None  # what the file held when planned (None: absent); checked again


@dataclass(frozen=True)
class MakeDir:
    path: Path
    mode: int


@dataclass(frozen=True)
class Clone:
    url: str
    dest: Path


Action = WriteFile | MakeDir | Clone


@dataclass(frozen=True)
class Plan:
    actions: tuple[Action, ...]
    changes: tuple[str, ...]  # what changes, one line each (empty: nothing to do)
    notes: tuple[str, ...]  # what the user should know
    next_steps: tuple[str, ...]  # the commands to run next
    address: str | None = None  # host mode: the VM's address
    packages: tuple[str, ...] = ()


# -- validation -----------------------------------------------------------------------------


def check_name(name: str) -> str:
    if not _NAME_RE.fullmatch(name):
        raise NewError(
            f"bad VM name {name!r}: use 1-32 of a-z, 0-9 and -, starting with a letter "
            "and not ending with -"
        )
    return name


def check_package(name: str) -> str:
    if not _PACKAGE_RE.fullmatch(name) or len(name) > 100:
        raise NewError(
            f"bad package {name!r}: a nixpkgs attribute path such as go or nodePackages.pnpm"
        )
    return name


def check_clone_url(url: str) -> str:
    if not url or url.startswith("-") or not _CLONE_RE.fullmatch(url):
        raise NewError(f"bad --clone URL {url!r}")
    return url


def check_request(req: Request) -> None:
    check_name(req.name)
    if req.agent not in AGENTS:
        raise NewError(f"unknown agent {req.agent!r} (one of {', '.join(AGENTS)})")
    if req.memory_mib is not None and not 256 <= req.memory_mib <= MAX_MEMORY_MIB:
        raise NewError(f"--memory {req.memory_mib}: between 256 and {MAX_MEMORY_MIB} MiB")
    if req.vcpus is not None and not 1 <= req.vcpus <= MAX_VCPUS:
        raise NewError(f"--vcpus {req.vcpus}: between 1 and {MAX_VCPUS}")
    for package in req.packages:
        check_package(package)
    if req.mode == "flavor" and req.clone is not None:
        raise NewError("--clone needs --host-config (a flavor runs on the project you are in)")
    if req.clone is not None:
        check_clone_url(req.clone)
    if req.mode == "host":
        if not _USER_RE.fullmatch(req.user):
            raise NewError(f"bad --user {req.user!r}: the host user the VM works for")
        if req.subnet.prefixlen > 30:
            raise NewError(f"--subnet {req.subnet}: too small for a host and a VM")
        if req.address is not None:
            _check_address(req.address, req.subnet)


def _check_address(address: ipaddress.IPv4Address, subnet: ipaddress.IPv4Network) -> None:
    if address not in subnet:
        raise NewError(f"--address {address} is not in the subnet {subnet}")
    if address in (subnet.network_address, subnet.broadcast_address, gateway(subnet)):
        what = "the host's own" if address == gateway(subnet) else "not a host"
        raise NewError(f"--address {address}: {what} address in {subnet}")


def gateway(subnet: ipaddress.IPv4Network) -> ipaddress.IPv4Address:
    """The host's address on the VMs' network: the subnet's first."""
    return subnet.network_address + 1


def mac_for(address: ipaddress.IPv4Address) -> str:
    """A locally administered unicast MAC derived from the address (unique with it)."""
    return "02:00:" + ":".join(f"{octet:02x}" for octet in address.packed)


# -- detection ------------------------------------------------------------------------------


def detect(files: Iterable[str], flake: str | None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The packages a project's files call for, and notes (a dev shell: DIRENV_ALLOW=1)."""
    present = set(files)
    if FLAKE_FILE in present and flake is not None and "devShell" in flake and MARK not in flake:
        return (), (
            "flake.nix has a dev shell: no packages added; run with DIRENV_ALLOW=1 to get "
            "its tools in the guest (it evaluates the project's Nix code on the host)",
        )
    packages: list[str] = []
    for name, wanted in DETECTORS:
        if name in present:
            packages += [p for p in wanted if p not in packages]
    return tuple(packages), ()


# -- the managed file -----------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    name: str
    body: str  # the lines between the markers, newline-terminated
    recorded: str  # the digest in the end marker
    start: int  # line index of the begin marker
    end: int  # line index of the end marker

    @property
    def edited(self) -> bool:
        return digest(self.body) != self.recorded


@dataclass(frozen=True)
class Managed:
    lines: tuple[str, ...]
    entries: dict[str, Entry] = field(default_factory=dict)
    tail: int = -1  # line index of the TAIL marker


def digest(body: str) -> str:
    return hashlib.sha256(body.encode()).hexdigest()[:12]


def parse_managed(text: str, path: Path) -> Managed:
    """The entries of a file `new` made; NewRefused when it is not one or its markers broke."""
    lines = tuple(text.splitlines(keepends=True))
    tails = [i for i, line in enumerate(lines) if line.strip() == TAIL]
    if len(tails) != 1:
        raise NewRefused(
            f"{path} has {'no' if not tails else 'more than one'} line {TAIL!r}: it was not "
            "made by microvm-run new, or its markers were changed; add the entry by hand"
        )
    entries: dict[str, Entry] = {}
    open_name: str | None = None
    start = 0
    for i, line in enumerate(lines):
        if begin := _BEGIN_RE.match(line):
            if open_name is not None:
                raise NewRefused(f"{path}:{i + 1}: entry {open_name} has no end marker")
            open_name, start = begin.group(1), i
        elif end := _END_RE.match(line):
            if open_name is None or open_name != end.group(1):
                raise NewRefused(f"{path}:{i + 1}: end marker of {end.group(1)} without its begin")
            if open_name in entries:
                raise NewRefused(f"{path}: entry {open_name} appears twice")
            body = "".join(lines[start + 1 : i])
            entries[open_name] = Entry(open_name, body, end.group(2), start, i)
            open_name = None
    if open_name is not None:
        raise NewRefused(f"{path}: entry {open_name} has no end marker")
    return Managed(lines, entries, tails[0])


def _entry_block(name: str, body: str) -> str:
    return f"  {MARK} begin {name}\n{body}  {MARK} end {name} {digest(body)}\n"


def _new_file(header: str, name: str, body: str) -> str:
    return f"{header}{{\n{_entry_block(name, body)}  {TAIL}\n}}\n"


def _with_entry(managed: Managed, name: str, body: str) -> str:
    lines = list(managed.lines)
    old = managed.entries.get(name)
    if old is not None:
        lines[old.start : old.end + 1] = [_entry_block(name, body)]
    else:
        lines[managed.tail : managed.tail] = [_entry_block(name, body)]
    return "".join(lines)


# -- rendering ------------------------------------------------------------------------------


def nix_string(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("${", "\\${")
    return f'"{escaped}"'


def _package_list(packages: tuple[str, ...], indent: str) -> list[str]:
    return [f"{indent}  pkgs.{p}" for p in packages]


FLAVOR_HEADER = f"""\
# This project's agent VMs, made by `microvm-run new` (flake.nix uses it:
#   packages.{FLAKE_SYSTEM} = import ./agent.nix {{ inherit agent-microvm; }};).
# Edit freely: `microvm-run new` never replaces an entry you changed.
{{ agent-microvm }}:
"""

HOST_HEADER = f"""\
# Agent VMs declared on this host, made by `microvm-run new --host-config`.
# Import it from your NixOS configuration: imports = [ ./{HOST_FILE} ];
# Edit freely: `microvm-run new` never replaces an entry you changed.
{{ pkgs, ... }}:
"""


def render_flavor(req: Request, packages: tuple[str, ...]) -> str:
    out = [
        f"  {req.name} = agent-microvm.lib.mkAgentVM {{",
        f"    agent = {nix_string(req.agent)};",
    ]
    if req.cri:
        out.append("    cri = true;")
    if packages:
        out += ["    packages = pkgs: [", *_package_list(packages, "    "), "    ];"]
    resources = []
    if req.memory_mib is not None:
        resources.append(f"        agentVM.resources.memoryMiB = {req.memory_mib};")
    if req.vcpus is not None:
        resources.append(f"        agentVM.resources.vcpus = {req.vcpus};")
    if resources:
        out += ["    modules = [", "      {", *resources, "      }", "    ];"]
    out.append("  };")
    return "\n".join(out) + "\n"


def render_flake(flake_url: str) -> str:
    return f"""\
# Made by `microvm-run new`: this project's agent VMs are in agent.nix.
{{
  inputs.agent-microvm.url = {nix_string(flake_url)};

  outputs =
    {{ agent-microvm, ... }}:
    {{
      packages.{FLAKE_SYSTEM} = import ./agent.nix {{ inherit agent-microvm; }};
    }};
}}
"""


def render_host_vm(
    req: Request, packages: tuple[str, ...], address: ipaddress.IPv4Address, workspace: Path
) -> str:
    o = HOST_VM_OPTIONS
    out = [
        f"  {HOST_VMS_OPTION}.{req.name} = {{",
        f"    {o['flavor']} = {nix_string(req.agent)};",
        f"    {o['workspace']} = {nix_string(str(workspace))};",
        f"    {o['user']} = {nix_string(req.user)};",
        f"    {o['address']} = {nix_string(str(address))};",
        f"    {o['mac']} = {nix_string(mac_for(address))};",
    ]
    if packages:
        out += [f"    {o['packages']} = [", *_package_list(packages, "    "), "    ];"]
    if req.memory_mib is not None:
        out.append(f"    {o['memory_mib']} = {req.memory_mib};")
    if req.vcpus is not None:
        out.append(f"    {o['vcpus']} = {req.vcpus};")
    if req.cri:
        out += [f"    {o['modules']} = [ {{ agentVM.cri.enable = true; }} ];"]
    out.append("  };")
    return "\n".join(out) + "\n"


# -- planning -------------------------------------------------------------------------------


def managed_path(req: Request) -> Path:
    return req.project / FLAVOR_FILE if req.mode == "flavor" else req.host_config / HOST_FILE


def host_dirs(req: Request) -> tuple[Path, Path]:
    """(workspace, state dir) of a host-declared VM."""
    workspace = req.workspace or req.workspace_root / req.name
    return workspace, req.state_root / req.name


def used_addresses(text: str | None) -> set[ipaddress.IPv4Address]:
    found = set()
    for raw in _ADDRESS_RE.findall(text or ""):
        try:
            found.add(ipaddress.IPv4Address(raw))
        except ValueError:
            continue
    return found


def pick_address(req: Request, managed: Managed | None, text: str | None) -> ipaddress.IPv4Address:
    """--address, else the entry's own address, else the subnet's first free one."""
    own = None
    if managed is not None and req.name in managed.entries:
        mine = used_addresses(managed.entries[req.name].body)
        own = next(iter(mine)) if len(mine) == 1 else None
    taken = used_addresses(text) - ({own} if own else set())
    if req.address is not None:
        if req.address in taken:
            raise NewError(f"--address {req.address} is already used in {managed_path(req)}")
        return req.address
    if own is not None:
        return own
    for candidate in req.subnet.hosts():
        if candidate != gateway(req.subnet) and candidate not in taken:
            return candidate
    raise NewError(f"no free address left in {req.subnet} (pass --subnet)")


def plan_new(req: Request, seen: Observed) -> Plan:
    """What `new` will do; NewError for bad input, NewRefused for a conflict. Pure."""
    check_request(req)
    path = managed_path(req)
    managed = parse_managed(seen.managed, path) if seen.managed is not None else None
    detected, notes = detect(seen.files, seen.flake) if req.detect else ((), ())
    packages = tuple(dict.fromkeys(detected + req.packages))
    address = None
    if req.mode == "flavor":
        body = render_flavor(req, packages)
    else:
        address = pick_address(req, managed, seen.managed)
        workspace, _ = host_dirs(req)
        body = render_host_vm(req, packages, address, workspace)

    actions: list[Action] = []
    changes: list[str] = []
    old = managed.entries.get(req.name) if managed is not None else None
    if old is not None and old.body != body:
        if old.edited:
            raise NewRefused(
                f"{req.name} in {path} was changed by hand: edit it there, or delete its "
                "entry (markers included) and run again"
            )
        if not req.replace:
            raise NewRefused(
                f"{req.name} is already in {path} with other settings (--replace to rewrite it)"
            )
    if old is None or old.body != body:
        header = FLAVOR_HEADER if req.mode == "flavor" else HOST_HEADER
        text = (
            _new_file(header, req.name, body)
            if managed is None
            else _with_entry(managed, req.name, body)
        )
        actions.append(WriteFile(path, text, seen.managed))
        verb = "created" if managed is None else ("rewrote" if old is not None else "added")
        changes.append(f"{verb} {req.name} in {path}")

    more_notes = list(notes)
    if req.mode == "flavor":
        next_steps = _flavor_extras(req, seen, actions, changes, more_notes)
    else:
        next_steps = _host_extras(req, seen, actions, changes)
    return Plan(
        tuple(actions),
        tuple(changes),
        tuple(more_notes),
        tuple(next_steps),
        str(address) if address else None,
        packages,
    )


def _flavor_extras(
    req: Request, seen: Observed, actions: list[Action], changes: list[str], notes: list[str]
) -> list[str]:
    flake_path = req.project / FLAKE_FILE
    if seen.flake is None:
        actions.append(WriteFile(flake_path, render_flake(req.flake_url), None))
        changes.append(f"created {flake_path} (agent-microvm from {req.flake_url})")
    elif f"import ./{FLAVOR_FILE}" not in seen.flake:
        notes.append(
            f"{flake_path} is yours and was left alone: add the input "
            f"agent-microvm.url = {nix_string(req.flake_url)}; and the output "
            f"packages.{FLAKE_SYSTEM} = import ./{FLAVOR_FILE} {{ inherit agent-microvm; }};"
        )
    if seen.git and changes:
        notes.append(f"a flake sees only files git knows: git add {FLAKE_FILE} {FLAVOR_FILE}")
    return ["microvm-run check", f"nix run .#{req.name}"]


def _host_extras(
    req: Request, seen: Observed, actions: list[Action], changes: list[str]
) -> list[str]:
    workspace, state_dir = host_dirs(req)
    for path, mode in ((state_dir, 0o700), (workspace, 0o755)):
        if path not in seen.existing_dirs:
            actions.append(MakeDir(path, mode))
            changes.append(f"created {path}")
    if req.clone is not None:
        if seen.workspace_origin == req.clone:
            pass
        elif not seen.workspace_empty:
            raise NewRefused(f"--clone: {workspace} is not empty (and not a clone of {req.clone})")
        else:
            actions.append(Clone(req.clone, workspace))
            changes.append(f"cloned {req.clone} into {workspace}")
    return [
        f"nixos-rebuild dry-build   (once your configuration imports {HOST_FILE}: "
        "evaluates the host and its VMs, builds nothing)",
        f"nixos-rebuild switch, then: microvm-run attach {req.name}",
    ]
