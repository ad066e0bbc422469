"""The guest spec: the one file through which Nix describes a flavor's guest.

Nix (``lib/spec.nix``) generates one TOML file per flavor from the evaluated
NixOS configuration; the runner reads it here and nowhere else.  This module
is the schema: every key, its type and its meaning, with a version so that a
spec from a newer generator is refused instead of misread.

Spec version 3 (version 2 is version 3 without ``guest.cri_runtimes``,
read as SPEC_V2_CRI_RUNTIMES when it has a cri-storage share; version 1 is
version 2 without ``[network]`` and ``[[key_proxy]]``; both are still read).
The values both sides check (versions, machines, share sources, key
headers) are lib/contract.nix's; ``make nix-test`` compares them::

    spec_version = 3

    [agent]
    name = "claude"                      # [a-z][a-z0-9-]{0,31}
    command = ["claude", "--dangerously-skip-permissions"]
    api_key_vars = ["ANTHROPIC_API_KEY"] # host variables passed as secrets

    [guest]
    contract = 1                         # guest contract version (contract.py)
    machine = "microvm"                  # "microvm" or "q35"
    kernel = "/nix/store/...-linux/bzImage"
    initrd = "/nix/store/...-initrd/initrd"
    kernel_params = ["init=/nix/store/.../init"]
    memory_mib = 4096
    vcpus = 4
    cri_runtimes = ["docker", "podman"]  # ENABLE_CRI's names; [] without
                                         # container runtimes

    [host]
    qemu = "/nix/store/...-qemu/bin/qemu-system-x86_64"
    virtiofsd = "/nix/store/...-virtiofsd/bin/virtiofsd"

    [[shares]]
    tag = "work"                         # virtiofs tag, [A-Za-z0-9_-]{1,32}
    source = "work"                      # see SHARE_SOURCES
    mount_point = "/work"
    read_only = false                    # optional, default false

    [network]                            # optional
    allow = ["api.anthropic.com"]        # the flavor's default allowlist
                                         # (host, *.suffix, host:port)

    [[key_proxy]]                        # optional, one per API key variable
    var = "ANTHROPIC_API_KEY"            # must be in agent.api_key_vars
    upstream = "https://api.anthropic.com"
    header = "x-api-key"                 # see KEY_HEADERS
    base_url_var = "ANTHROPIC_BASE_URL"  # the guest variable pointed at the proxy
    base_url_path = ""                   # appended to the proxy URL, e.g. "/v1"
    methods = ["GET", "POST"]            # optional: all the route forwards (never
    paths = ["/v1/"]                     # TRACE); prefixes of the upstream path

Relative paths in ``[guest]`` and ``[host]`` are resolved against the spec
file's directory, so a test guest can ship a spec beside its kernel.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from microvm_run.netpolicy import PolicyError, parse_allow

SPEC_VERSION = 3
SUPPORTED_CONTRACTS = (1,)
MACHINES = ("microvm", "q35")

# Where each kind of share comes from on the host (resolved in plan.py).
SHARE_SOURCES = {
    "work": "the project directory (WORK_DIR)",
    "home": "the per-project agent home (AGENT_HOME)",
    "nix-store": "the host's /nix/store (must be read_only)",
    "cri-storage": "container image storage under the agent home",
}

# How the key proxy presents a key upstream: the header and its form.
KEY_HEADERS = ("x-api-key", "authorization", "x-goog-api-key")
# What lib/spec.nix checks too: a key route's methods and path prefixes.
KEY_ROUTE_METHOD = re.compile(r"[A-Z]{1,16}")
KEY_ROUTE_PATH = re.compile(r"(/[A-Za-z0-9._~-]+)+/")

# The container runtimes a version 2 spec with a cri-storage share has (the
# names modules/cri.nix knew then); later specs list their own.
SPEC_V2_CRI_RUNTIMES = ("docker", "podman", "containerd", "crun", "cri-o")
_CRI_RUNTIME = re.compile(r"[a-z][a-z0-9-]{0,31}")

_AGENT_NAME = re.compile(r"[a-z][a-z0-9-]{0,31}")
_TAG = re.compile(r"[A-Za-z0-9_-]{1,32}")
_ENV_VAR = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MAX_VCPUS = 255
MAX_MEMORY_MIB = 1024 * 1024


class SpecError(ValueError):
    """A spec that cannot be used; the message is one line for the user."""


@dataclass(frozen=True)
class Share:
    tag: str
    source: str
    mount_point: str
    read_only: bool = False


@dataclass(frozen=True)
class KeyProxy:
    """How --inject-keys serves one API key variable (see egress.py)."""

    var: str
    upstream: str
    header: str
    base_url_var: str
    base_url_path: str = ""
    methods: tuple[str, ...] = ("GET", "POST")
    paths: tuple[str, ...] = ("/v1/",)


@dataclass(frozen=True)
class Spec:
    path: Path
    agent: str
    command: tuple[str, ...]
    api_key_vars: tuple[str, ...]
    contract: int
    machine: str
    kernel: Path
    initrd: Path
    kernel_params: tuple[str, ...]
    memory_mib: int
    vcpus: int
    qemu: Path
    virtiofsd: Path
    shares: tuple[Share, ...]

    allow: tuple[str, ...] = ()
    key_proxies: tuple[KeyProxy, ...] = ()
    cri_runtimes: tuple[str, ...] = ()  # what ENABLE_CRI may name

    def share_by_source(self, source: str) -> Share | None:
        return next((s for s in self.shares if s.source == source), None)


def load_spec(path: Path) -> Spec:
    """Read and validate a spec file; raise SpecError with one clear line.

    The path is made absolute here, once: the kernel, QEMU and virtiofsd
    paths derived from it must hold in every process that later uses them
    (virtiofsd units start in the user manager's directory, not ours), and
    a symlinked spec keeps pointing beside its real file.
    """
    path = Path(os.path.realpath(path))
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise SpecError(f"cannot read spec {path}: {err.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise SpecError(f"spec {path} is not valid TOML: {err}") from None
    return parse_spec(data, path)


def parse_spec(data: dict[str, Any], path: Path) -> Spec:
    """Validate the decoded TOML of a spec (pure; the schema lives here)."""
    where = f"spec {path}"
    version = data.get("spec_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise SpecError(f"{where}: missing or non-integer spec_version")
    if version > SPEC_VERSION:
        raise SpecError(
            f"{where}: spec_version {version} is newer than this microvm-run "
            f"understands ({SPEC_VERSION}); update microvm-run"
        )
    if version < 1:
        raise SpecError(f"{where}: invalid spec_version {version}")
    _no_unknown(
        data, {"spec_version", "agent", "guest", "host", "shares", "network", "key_proxy"}, where
    )

    agent = _table(data, "agent", where)
    guest = _table(data, "guest", where)
    host = _table(data, "host", where)
    _no_unknown(agent, {"name", "command", "api_key_vars"}, f"{where} [agent]")
    _no_unknown(
        guest,
        {
            "contract",
            "machine",
            "kernel",
            "initrd",
            "kernel_params",
            "memory_mib",
            "vcpus",
            *(["cri_runtimes"] if version >= 3 else []),
        },
        f"{where} [guest]",
    )
    _no_unknown(host, {"qemu", "virtiofsd"}, f"{where} [host]")

    name = _str(agent, "name", f"{where} [agent]")
    if not _AGENT_NAME.fullmatch(name):
        raise SpecError(f"{where}: agent.name {name!r} must match {_AGENT_NAME.pattern}")
    command = _str_list(agent, "command", f"{where} [agent]")
    if not command:
        raise SpecError(f"{where}: agent.command must not be empty")
    key_vars = _str_list(agent, "api_key_vars", f"{where} [agent]", default=[])
    for var in key_vars:
        if not _ENV_VAR.fullmatch(var):
            raise SpecError(f"{where}: agent.api_key_vars has invalid name {var!r}")

    contract = _int(guest, "contract", f"{where} [guest]", 1, 1 << 16)
    if contract not in SUPPORTED_CONTRACTS:
        raise SpecError(
            f"{where}: guest contract {contract} is not supported by this "
            f"microvm-run (supports {', '.join(map(str, SUPPORTED_CONTRACTS))})"
        )
    machine = _str(guest, "machine", f"{where} [guest]")
    if machine not in MACHINES:
        raise SpecError(f"{where}: guest.machine {machine!r} must be one of {', '.join(MACHINES)}")

    base = path.parent
    shares = tuple(_share(item, i, where) for i, item in enumerate(_shares(data, where)))
    _check_unique(shares, where)
    allow = _network_allow(data, where)
    key_proxies = _key_proxies(data, key_vars, where)
    cri_runtimes = _cri_runtimes(guest, version, shares, where)
    return Spec(
        path=path,
        agent=name,
        command=tuple(command),
        api_key_vars=tuple(key_vars),
        contract=contract,
        machine=machine,
        kernel=base / _str(guest, "kernel", f"{where} [guest]"),
        initrd=base / _str(guest, "initrd", f"{where} [guest]"),
        kernel_params=tuple(_str_list(guest, "kernel_params", f"{where} [guest]", default=[])),
        memory_mib=_int(guest, "memory_mib", f"{where} [guest]", 64, MAX_MEMORY_MIB),
        vcpus=_int(guest, "vcpus", f"{where} [guest]", 1, MAX_VCPUS),
        qemu=base / _str(host, "qemu", f"{where} [host]"),
        virtiofsd=base / _str(host, "virtiofsd", f"{where} [host]"),
        shares=shares,
        allow=allow,
        key_proxies=key_proxies,
        cri_runtimes=cri_runtimes,
    )


def _cri_runtimes(
    guest: dict[str, Any], version: int, shares: tuple[Share, ...], where: str
) -> tuple[str, ...]:
    has_storage = any(s.source == "cri-storage" for s in shares)
    if version < 3:
        return SPEC_V2_CRI_RUNTIMES if has_storage else ()
    names = _str_list(guest, "cri_runtimes", f"{where} [guest]", default=[])
    for name in names:
        if not _CRI_RUNTIME.fullmatch(name):
            raise SpecError(f"{where}: guest.cri_runtimes has invalid name {name!r}")
    if len(set(names)) != len(names):
        raise SpecError(f"{where}: guest.cri_runtimes names a runtime twice")
    if names and not has_storage:
        raise SpecError(f"{where}: guest.cri_runtimes needs a share with source 'cri-storage'")
    return tuple(names)


def _network_allow(data: dict[str, Any], where: str) -> tuple[str, ...]:
    network = data.get("network", {})
    if not isinstance(network, dict):
        raise SpecError(f"{where}: network must be a table")
    _no_unknown(network, {"allow"}, f"{where} [network]")
    allow = _str_list(network, "allow", f"{where} [network]", default=[])
    for entry in allow:
        try:
            parse_allow(entry)
        except PolicyError as err:
            raise SpecError(f"{where} [network]: {err}") from None
    return tuple(allow)


def _key_proxies(data: dict[str, Any], key_vars: list[str], where: str) -> tuple[KeyProxy, ...]:
    items = data.get("key_proxy", [])
    if not isinstance(items, list):
        raise SpecError(f"{where}: key_proxy must be an array of tables ([[key_proxy]])")
    proxies = []
    for index, item in enumerate(items):
        ctx = f"{where} key_proxy[{index}]"
        if not isinstance(item, dict):
            raise SpecError(f"{ctx}: must be a table")
        _no_unknown(
            item,
            {"var", "upstream", "header", "base_url_var", "base_url_path", "methods", "paths"},
            ctx,
        )
        var = _str(item, "var", ctx)
        if var not in key_vars:
            raise SpecError(f"{ctx}: var {var!r} is not in agent.api_key_vars")
        upstream = _str(item, "upstream", ctx)
        if not re.fullmatch(r"https?://[A-Za-z0-9.-]+(:\d+)?(/[^\s?#]*)?", upstream):
            raise SpecError(f"{ctx}: upstream {upstream!r} must be an http(s) URL")
        header = _str(item, "header", ctx)
        if header not in KEY_HEADERS:
            raise SpecError(f"{ctx}: header {header!r} must be one of {', '.join(KEY_HEADERS)}")
        base_url_var = _str(item, "base_url_var", ctx)
        if not _ENV_VAR.fullmatch(base_url_var):
            raise SpecError(f"{ctx}: base_url_var {base_url_var!r} is not a variable name")
        path = item.get("base_url_path", "")
        if not isinstance(path, str) or (path and not path.startswith("/")):
            raise SpecError(f"{ctx}: base_url_path must be empty or start with /")
        methods = _key_route_list(item, "methods", KEY_ROUTE_METHOD, ("GET", "POST"), ctx)
        if {"TRACE", "TRACK", "CONNECT"} & set(methods):
            raise SpecError(f"{ctx}: methods must not include TRACE, TRACK or CONNECT")
        paths = _key_route_list(item, "paths", KEY_ROUTE_PATH, ("/v1/",), ctx)
        proxies.append(KeyProxy(var, upstream, header, base_url_var, path, methods, paths))
    if len({p.var for p in proxies}) != len(proxies):
        raise SpecError(f"{where}: two key_proxy entries for the same var")
    return tuple(proxies)


def _key_route_list(
    item: dict[str, Any], key: str, pattern: re.Pattern[str], default: tuple[str, ...], ctx: str
) -> tuple[str, ...]:
    values = item.get(key, list(default))
    if (
        not isinstance(values, list)
        or not values
        or not all(isinstance(v, str) and pattern.fullmatch(v) for v in values)
        or any("/./" in v or "/../" in v for v in values)
    ):
        raise SpecError(f"{ctx}: {key} must be a non-empty list like {list(default)}")
    return tuple(values)


def _shares(data: dict[str, Any], where: str) -> list[Any]:
    shares = data.get("shares", [])
    if not isinstance(shares, list):
        raise SpecError(f"{where}: shares must be an array of tables ([[shares]])")
    return shares


def _share(item: Any, index: int, where: str) -> Share:
    ctx = f"{where} shares[{index}]"
    if not isinstance(item, dict):
        raise SpecError(f"{ctx}: must be a table")
    _no_unknown(item, {"tag", "source", "mount_point", "read_only"}, ctx)
    tag = _str(item, "tag", ctx)
    if not _TAG.fullmatch(tag):
        raise SpecError(f"{ctx}: tag {tag!r} must match {_TAG.pattern}")
    source = _str(item, "source", ctx)
    if source not in SHARE_SOURCES:
        raise SpecError(f"{ctx}: source {source!r} must be one of {', '.join(SHARE_SOURCES)}")
    mount_point = _str(item, "mount_point", ctx)
    if not mount_point.startswith("/"):
        raise SpecError(f"{ctx}: mount_point {mount_point!r} must be absolute")
    read_only = item.get("read_only", False)
    if not isinstance(read_only, bool):
        raise SpecError(f"{ctx}: read_only must be true or false")
    if source == "nix-store" and not read_only:
        raise SpecError(f"{ctx}: the nix-store share must be read_only")
    return Share(tag=tag, source=source, mount_point=mount_point, read_only=read_only)


def _check_unique(shares: tuple[Share, ...], where: str) -> None:
    for attr in ("tag", "mount_point", "source"):
        seen: set[str] = set()
        for share in shares:
            value = getattr(share, attr)
            if value in seen:
                raise SpecError(f"{where}: two shares have the same {attr} {value!r}")
            seen.add(value)
    if not any(s.source == "work" for s in shares):
        raise SpecError(f"{where}: no share with source 'work' (the project must be shared)")


def _no_unknown(table: dict[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(table) - known)
    if unknown:
        raise SpecError(f"{where}: unknown key {unknown[0]!r}")


def _table(data: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = data.get(key)
    if not isinstance(value, dict):
        raise SpecError(f"{where}: missing table [{key}]")
    return value


def _str(table: dict[str, Any], key: str, where: str) -> str:
    value = table.get(key)
    if not isinstance(value, str) or not value:
        raise SpecError(f"{where}: {key} must be a non-empty string")
    return value


def _str_list(
    table: dict[str, Any], key: str, where: str, default: list[str] | None = None
) -> list[str]:
    value = table.get(key, default)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SpecError(f"{where}: {key} must be an array of strings")
    return value


def _int(table: dict[str, Any], key: str, where: str, low: int, high: int) -> int:
    value = table.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise SpecError(f"{where}: {key} must be an integer")
    if not low <= value <= high:
        raise SpecError(f"{where}: {key} = {value} is out of range {low}..{high}")
    return value
