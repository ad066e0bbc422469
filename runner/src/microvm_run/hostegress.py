"""microvm-run-egress: the runner's egress proxy as a host service for one VM.

A VM declared with ``services.agent-microvm`` (modules/host.nix) gets one
``agent-microvm-egress-NAME`` service running this with a JSON file the
module wrote (``egressConfigs``): the proxy listens on the bridge's address
at the VM's port, nftables redirects the VM's TCP connections there, and the
same code as the runner's (egress.py) decides.  API keys come from systemd
credentials (``LoadCredential=VAR:FILE``, read from ``$CREDENTIALS_DIRECTORY``):
never in the store, the unit or the environment of anything else.

    microvm-run-egress CONFIG.json

Exit status: 2 for a bad configuration (one line on stderr), 1 when the
proxy cannot start; otherwise it runs until SIGTERM or SIGINT.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from microvm_run import netpolicy
from microvm_run.egress import EgressError, EgressProxy
from microvm_run.netmode import NetMode
from microvm_run.netpolicy import EgressConfig, KeyRoute, PolicyError, TcpListen

CONFIG_VERSION = 1
_KEYS = frozenset(
    {"version", "instance", "listen", "port", "peer", "mode", "allow", "log", "key_routes"}
)
_ROUTE_KEYS = frozenset({"var", "upstream", "header", "methods", "paths"})
_HEADERS = ("x-api-key", "authorization", "x-goog-api-key")


class ConfigError(ValueError):
    """A configuration the proxy refuses; one line naming the field."""


@dataclass(frozen=True)
class HostEgress:
    config: EgressConfig
    key_vars: tuple[str, ...]


def parse_config(text: str, source: str) -> HostEgress:
    """The module's JSON, checked strictly: unknown keys, bad values and versions refused."""
    try:
        data = json.loads(text)
    except ValueError as err:
        raise ConfigError(f"{source}: not JSON: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: not an object")
    unknown = sorted(set(data) - _KEYS)
    missing = sorted(_KEYS - set(data))
    if unknown or missing:
        raise ConfigError(f"{source}: unknown keys {unknown}, missing keys {missing}")
    if data["version"] != CONFIG_VERSION:
        raise ConfigError(f"{source}: version {data['version']!r}, expected {CONFIG_VERSION}")
    # --net none has no proxy: a declared VM's egress is open or allowlist.
    proxied = (NetMode.OPEN, NetMode.ALLOWLIST)
    if data["mode"] not in proxied:
        raise ConfigError(f"{source}: mode {data['mode']!r} is not {' or '.join(proxied)}")
    mode = NetMode(data["mode"])
    listen = _address(data["listen"], source, "listen")
    peer = _address(data["peer"], source, "peer")
    port = data["port"]
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise ConfigError(f"{source}: port {port!r} is not 1..65535")
    instance = data["instance"]
    if not isinstance(instance, str) or not instance.isascii() or not instance.isprintable():
        raise ConfigError(f"{source}: instance {instance!r} is not a name")
    log = data["log"]
    if not isinstance(log, str) or not log.startswith("/"):
        raise ConfigError(f"{source}: log {log!r} is not an absolute path")
    allow = data["allow"]
    if not isinstance(allow, list) or not all(isinstance(a, str) for a in allow):
        raise ConfigError(f"{source}: allow is not a list of strings")
    try:
        rules = tuple(dict.fromkeys(netpolicy.parse_allow(entry) for entry in allow))
    except PolicyError as err:
        raise ConfigError(f"{source}: {err}") from None
    routes = tuple(_route(r, source) for r in _list(data["key_routes"], source, "key_routes"))
    config = EgressConfig(
        mode=mode,
        rules=rules,
        socket=Path("/nonexistent"),  # TCP: no relay socket
        log=Path(log),
        instance_id=instance,
        key_routes=routes,
        answer_addr=listen,
        listen=TcpListen(address=listen, port=port, peer=peer),
    )
    return HostEgress(config=config, key_vars=tuple(r.var for r in routes))


def _address(value: Any, source: str, field: str) -> str:
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise ConfigError(f"{source}: {field} {value!r} is not an IPv4 address") from None


def _list(value: Any, source: str, field: str) -> list[Any]:
    if not isinstance(value, list):
        raise ConfigError(f"{source}: {field} is not a list")
    return value


def _route(value: Any, source: str) -> KeyRoute:
    if not isinstance(value, dict) or set(value) != _ROUTE_KEYS:
        raise ConfigError(f"{source}: a key route needs exactly {sorted(_ROUTE_KEYS)}")
    var, upstream, header = value["var"], value["upstream"], value["header"]
    if not isinstance(var, str) or not var.replace("_", "a").isalnum() or not var.isascii():
        raise ConfigError(f"{source}: key route var {var!r} is not a variable name")
    if not isinstance(upstream, str) or not upstream.startswith(("http://", "https://")):
        raise ConfigError(f"{source}: key route upstream {upstream!r} is not an http(s) URL")
    if header not in _HEADERS:
        raise ConfigError(f"{source}: key route header {header!r} is not one of {_HEADERS}")
    methods = _list(value["methods"], source, "methods")
    paths = _list(value["paths"], source, "paths")
    if not all(isinstance(m, str) and m.isupper() for m in methods):
        raise ConfigError(f"{source}: key route methods {methods!r}")
    if not all(isinstance(p, str) and p.startswith("/") and p.endswith("/") for p in paths):
        raise ConfigError(f"{source}: key route paths {paths!r} (each /.../)")
    return KeyRoute(
        prefix=netpolicy.key_route_prefix(var),
        var=var,
        upstream=upstream,
        header=header,
        methods=tuple(methods),
        paths=tuple(paths),
    )


def read_keys(key_vars: Sequence[str], environ: Mapping[str, str]) -> dict[str, str]:
    """Each key from its systemd credential; a missing one is an empty key (routes refuse)."""
    directory = environ.get("CREDENTIALS_DIRECTORY")
    keys = {}
    for var in key_vars:
        if directory is None:
            keys[var] = ""
            continue
        try:
            keys[var] = (Path(directory) / var).read_text().strip()
        except OSError:
            keys[var] = ""
    return keys


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    env = os.environ if environ is None else environ
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: microvm-run-egress CONFIG.json", file=sys.stderr)
        return 2
    try:
        text = Path(args[0]).read_text()
        host = parse_config(text, args[0])
    except (OSError, ConfigError) as err:
        print(f"microvm-run-egress: {err}", file=sys.stderr)
        return 2
    keys = read_keys(host.key_vars, env)
    for var in host.key_vars:
        if not keys[var]:
            print(
                f"microvm-run-egress: warning: no credential {var}; its route refuses",
                file=sys.stderr,
            )
    signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    proxy = EgressProxy(host.config, keys)
    try:
        proxy.start()
    except EgressError as err:
        print(f"microvm-run-egress: {err}", file=sys.stderr)
        proxy.stop()
        return 1
    listen = host.config.listen
    assert listen is not None
    print(
        f"microvm-run-egress: {host.config.instance_id}: {host.config.mode} proxy on "
        f"{listen.address}:{listen.port} for {listen.peer}",
        file=sys.stderr,
        flush=True,
    )
    signal.sigwait(signals)
    proxy.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
