"""Network policy as plain data: modes, allowlists, port forwards, addresses.

Pure: no sockets, no DNS.  The egress proxy (egress.py) asks these functions
what to do; plan.py uses them to validate what the user asked for.

The design (README "Threat model"): in ``open`` and ``allowlist`` mode QEMU's
user networking runs with ``restrict=on``, so the guest reaches nothing by
itself: not the host's loopback, not the LAN, not even DNS.  Its only way out
is a few ``guestfwd`` ports on the virtual address EGRESS_ADDR, each handed to
the runner's egress proxy, which learns the destination from the TLS SNI, the
HTTP Host header or an HTTP CONNECT line and applies the policy on the host.
If the proxy is not running, guest connections fail: the design fails closed.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from microvm_run.netmode import NetMode

# QEMU user networking's fixed addresses (the guest configures them itself;
# lib/contract.nix holds the same values, and make nix-test compares them).
GUEST_ADDR = "10.0.2.15"
# Where every guest connection goes: a guestfwd address, not a real host.
EGRESS_ADDR = "10.0.2.100"
DNS_PORT = 53  # DNS over TCP: every name resolves to EGRESS_ADDR
HTTP_PORT = 80  # transparent: destination from the Host header
TLS_PORT = 443  # transparent: destination from the SNI
PROXY_PORT = 3128  # explicit: HTTP CONNECT host:port (HTTPS_PROXY points here)
KEY_PROXY_PORT = 4180  # --inject-keys: the API base URL points here
# What the guest gets instead of the key with --inject-keys.
KEY_PLACEHOLDER = "microvm-run-placeholder"
BASE_PORTS = (DNS_PORT, HTTP_PORT, TLS_PORT, PROXY_PORT)

_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
_HOSTNAME = re.compile(rf"{_LABEL}(\.{_LABEL})*")
_PORT_FORWARD = re.compile(r"(?:(?P<addr>[0-9.]+):)?(?P<host>[0-9]+):(?P<guest>[0-9]+)")
_PORT = re.compile(r"[0-9]{1,5}")  # ASCII only: str.isdigit() also admits "²", "٣"
# IPv6 ranges that carry an IPv4 address a connection may end up at.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")
# Never public, whatever the running Python's ``is_global`` says: its tables
# changed between releases (3.11.x and 3.12.x disagree on several of these).
_NOT_PUBLIC = tuple(
    ipaddress.ip_network(net)
    for net in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",  # CGNAT: the ISP's side of the LAN
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.0.0.0/24",
        "192.0.2.0/24",
        "192.168.0.0/16",
        "198.18.0.0/15",
        "198.51.100.0/24",
        "203.0.113.0/24",
        "224.0.0.0/3",  # multicast and reserved, up to the broadcast address
        "64:ff9b:1::/48",  # RFC 8215: local-use NAT64, a gateway on the LAN
        "100::/64",
        "2001::/23",  # IETF protocol assignments (Teredo, ORCHID, ...)
        "2001:db8::/32",
        "2002::/16",  # 6to4: the IPv4 inside is checked instead (see below)
        "fc00::/7",
        "fe80::/10",
        "fec0::/10",
        "ff00::/8",
    )
)


class PolicyError(ValueError):
    """A malformed allowlist entry or port forward; one line for the user."""


@dataclass(frozen=True)
class AllowRule:
    """``host``, ``*.suffix`` (any subdomain, not the bare suffix) or either with ``:port``.

    ``private``: the rule came from ``--allow-private`` and admits the name
    even when it resolves to loopback, the LAN or the host's own addresses.
    No other rule does, in any mode: a public name that a wildcard, a
    split-horizon resolver or a rebinding attack points inwards is refused.
    """

    host: str
    wildcard: bool = False
    port: int | None = None  # None: the web ports, 80 and 443
    private: bool = False

    def matches(self, host: str, port: int) -> bool:
        # A rule without a port admits the web only: allowing a name for its
        # API must not also open its SSH or SMTP port through CONNECT.
        if port not in ((HTTP_PORT, TLS_PORT) if self.port is None else (self.port,)):
            return False
        if self.wildcard:
            return host.endswith("." + self.host)
        return host == self.host

    def __str__(self) -> str:
        name = f"*.{self.host}" if self.wildcard else self.host
        text = name if self.port is None else f"{name}:{self.port}"
        return f"{text} (private)" if self.private else text


def normalise_host(host: str) -> str:
    return host.strip().rstrip(".").lower()


def _safe_to_show_as_command(host: str) -> bool:
    """A host name or an address: nothing a shell would read as syntax."""
    if valid_hostname(host.removeprefix("*.")):
        return True
    bare = host.removeprefix("[").removesuffix("]")
    try:
        address = ipaddress.ip_address(bare)
    except ValueError:
        return False
    return "%" not in bare and str(address) == bare


def valid_hostname(host: str) -> bool:
    return len(host) <= 253 and _HOSTNAME.fullmatch(host) is not None


def parse_allow(entry: str, *, private: bool = False) -> AllowRule:
    """One allowlist entry: ``api.example.com``, ``*.example.com``, ``git.corp:8443``."""
    text = normalise_host(entry)
    name, sep, port_text = text.rpartition(":") if ":" in text else (text, "", "")
    name = name.rstrip(".")  # "host.:443" as well as "host."
    port = None
    if sep:
        if not _PORT.fullmatch(port_text) or not 0 < int(port_text) < 65536:
            raise PolicyError(f"allow entry {entry!r}: port must be 1..65535")
        port = int(port_text)
    wildcard = name.startswith("*.")
    if wildcard:
        name = name[2:]
    if not valid_hostname(name) or "*" in name:
        raise PolicyError(
            f"allow entry {entry!r} is not a host name (examples: api.example.com, "
            "*.example.com, git.example.com:8443)"
        )
    return AllowRule(host=name, wildcard=wildcard, port=port, private=private)


def allow_file_entries(text: str) -> list[tuple[int, str]]:
    """A per-project allowlist file's entries with their line numbers:
    one entry per line, ``#`` comments."""
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        entry = line.split("#", 1)[0].strip()
        if entry:
            entries.append((number, entry))
    return entries


def parse_allow_file(text: str, source: str) -> list[AllowRule]:
    """A per-project allowlist file's rules; a bad entry names ``source:LINE``."""
    rules = []
    for number, entry in allow_file_entries(text):
        try:
            rules.append(parse_allow(entry))
        except PolicyError as err:
            raise PolicyError(f"{source}:{number}: {err}") from None
    return rules


def permitted(rules: tuple[AllowRule, ...], host: str, port: int) -> bool:
    host = normalise_host(host)
    return any(rule.matches(host, port) for rule in rules)


def private_permitted(rules: tuple[AllowRule, ...], host: str, port: int) -> bool:
    """Did the user name this host:port with ``--allow-private``?"""
    host = normalise_host(host)
    return any(rule.private and rule.matches(host, port) for rule in rules)


def extra_ports(rules: tuple[AllowRule, ...]) -> tuple[int, ...]:
    """Ports beyond BASE_PORTS that the guest needs a transparent path to."""
    reserved = {*BASE_PORTS, KEY_PROXY_PORT}
    return tuple(sorted({r.port for r in rules if r.port is not None} - reserved))


def public_address(address: str) -> bool:
    """May the proxy connect here without ``--allow-private``?  Only global unicast.

    Refuses loopback, RFC 1918, link-local, CGNAT, ULA, NAT64 local use,
    multicast and the other special ranges, so a name that resolves to the
    host or the LAN (including DNS rebinding tricks) is not a way in, in any
    mode.  The host's own public addresses are checked separately (egress.py).
    """
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in _IPV4_COMPATIBLE:
            return False  # deprecated; "::1" and "::" are in here too
        if ip in _NAT64:
            # A NAT64 gateway on the LAN would take this to the IPv4 address.
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        else:
            ip = ip.ipv4_mapped or ip.sixtofour or ip
    if any(ip in net for net in _NOT_PUBLIC if net.version == ip.version):
        return False
    return ip.is_global and not ip.is_multicast


@dataclass(frozen=True)
class PortForward:
    """``-p [HOST_ADDR:]HOST_PORT:GUEST_PORT``: a host port that reaches the guest."""

    host_addr: str
    host_port: int
    guest_port: int

    def __str__(self) -> str:
        return f"{self.host_addr}:{self.host_port}:{self.guest_port}"


def parse_port_forward(text: str) -> PortForward:
    match = _PORT_FORWARD.fullmatch(text.strip())
    if match is None:
        raise PolicyError(
            f"-p {text!r}: expected [HOST_ADDR:]HOST_PORT:GUEST_PORT, e.g. 8080:80 "
            "or 0.0.0.0:8080:80"
        )
    addr = match["addr"] or "127.0.0.1"
    try:
        ip = ipaddress.IPv4Address(addr)
    except ValueError:
        raise PolicyError(f"-p {text!r}: {addr!r} is not an IPv4 address") from None
    ports = (int(match["host"]), int(match["guest"]))
    if not all(0 < port < 65536 for port in ports):
        raise PolicyError(f"-p {text!r}: ports must be 1..65535")
    return PortForward(host_addr=str(ip), host_port=ports[0], guest_port=ports[1])


def check_unique_forwards(forwards: tuple[PortForward, ...]) -> None:
    seen: set[tuple[str, int]] = set()
    for forward in forwards:
        port = forward.host_port
        # 0.0.0.0 takes the port on every address: it clashes with any other use.
        clash = (forward.host_addr, port) in seen or ("0.0.0.0", port) in seen
        if clash or (forward.host_addr == "0.0.0.0" and any(p == port for _, p in seen)):
            raise PolicyError(f"-p: host port {port} is forwarded twice")
        seen.add((forward.host_addr, port))


@dataclass(frozen=True)
class KeyRoute:
    """--inject-keys: requests under ``/<prefix>`` go to ``upstream`` with VAR's value.

    Only ``methods`` on paths under one of ``paths`` (the flavor's data in
    lib/network.nix): the key is good for the agent's API calls, not for
    TRACE or for whatever else the upstream host serves.
    """

    prefix: str  # a path segment, e.g. "anthropic"
    var: str
    upstream: str  # e.g. https://api.anthropic.com
    header: str  # "x-api-key", "authorization" (Bearer) or "x-goog-api-key"
    methods: tuple[str, ...] = ("GET", "POST")
    paths: tuple[str, ...] = ("/v1/",)  # prefixes of the upstream path, each ending in /


# A path the key route passes: plain segments of RFC 3986 path characters.
# No percent-encoded dot, slash or backslash, no empty or dot segments: the
# prefix check must see the path the upstream will route.
# No ";": some gateways read "..;" as ".." (path parameters), which would
# lead a route's key out of its prefix.
_ROUTE_PATH = re.compile(r"(/[A-Za-z0-9._~!$&'()*+,=:@%-]+)+/?")
_ENCODED_SEPARATOR = re.compile(r"%(2[eEfF]|5[cC]|00)")


def key_route_refusal(route: KeyRoute, method: str, target: str) -> str | None:
    """Why the key route refuses ``method target`` (relative to the upstream), or None."""
    if method not in route.methods:
        return f"method {method} is not one the API uses ({', '.join(route.methods)})"
    path = target.split("?", 1)[0]
    segments = path.split("/")[1:]
    if (
        not _ROUTE_PATH.fullmatch(path)
        or _ENCODED_SEPARATOR.search(path)
        or any(segment in (".", "..") for segment in segments)
    ):
        return "path is not a plain API path"
    if not any(path.startswith(prefix) for prefix in route.paths):
        return f"path is outside the API ({', '.join(route.paths)})"
    return None


def key_route_prefix(var: str) -> str:
    """The key proxy's path segment for a key variable: ANTHROPIC_API_KEY -> anthropic-api-key."""
    return var.lower().replace("_", "-")


@dataclass(frozen=True)
class TcpListen:
    """A host VM's proxy (hostegress.py): nftables redirects the VM's connections here.

    ``peer`` is the VM's address: connections from anywhere else are closed.
    """

    address: str
    port: int
    peer: str


@dataclass(frozen=True)
class EgressConfig:
    mode: NetMode  # never NONE: --net none has no proxy
    rules: tuple[AllowRule, ...]
    socket: Path
    log: Path
    instance_id: str
    key_routes: tuple[KeyRoute, ...] = ()
    # Where the proxy's DNS points every allowed name (the guest reaches the
    # proxy there): the runner's guestfwd address, or a host VM's gateway.
    answer_addr: str = EGRESS_ADDR
    # None: guest connections come from relay.py over ``socket``.
    listen: TcpListen | None = None
    # Rules `microvm-run allow` adds while the instance runs (live.py);
    # in the runtime dir, outside every share.  None: no live rules.
    live_allow: Path | None = None


# What the user can do about a refusal: add an allowlist rule to the running
# instance, or start the next one with --allow-private.  None: nothing a rule
# changes (the name does not resolve, the upstream is down).
FIX_ALLOW = "allow"
FIX_PRIVATE = "allow-private"


@dataclass(frozen=True)
class Refusal:
    """One refused destination, as the guest and the user are told about it."""

    host: str  # printable (escaped) already
    port: int
    why: str
    fix: str | None
    mode: str
    instance_id: str

    @property
    def key(self) -> str:
        return f"{self.host}:{self.port}"

    def entry(self) -> str:
        """What to pass to ``microvm-run allow``: the bare name for the web ports."""
        if self.port in (HTTP_PORT, TLS_PORT, DNS_PORT):
            return self.host
        return f"{self.host}:{self.port}"

    def text(self) -> str:
        """One line: which host, under which mode, why, and what the user can run."""
        shown = self.host if self.port == DNS_PORT else self.key
        line = f"microvm-run refused {shown}: {self.why} (--net {self.mode})"
        if not _safe_to_show_as_command(self.host):
            # A command the user may paste into a shell names only a real host name.
            return line
        if self.fix == FIX_ALLOW:
            command = f"microvm-run allow {self.instance_id} {self.entry()}"
            line += f"; to allow it, on the host: {command}"
        elif self.fix == FIX_PRIVATE:
            target = f"{self.host}:{self.port}"
            command = f"microvm-run allow {self.instance_id} {target} --private"
            line += (
                f"; to allow it, on the host: {command} (or start with --allow-private {target})"
            )
        return line
