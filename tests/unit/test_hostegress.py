"""microvm-run-egress: its configuration, its keys, and the proxy on TCP for one peer."""

from __future__ import annotations

import contextlib
import json
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from microvm_run import hostegress
from microvm_run.egress import EgressConfig, EgressProxy
from microvm_run.hostegress import ConfigError, parse_config, read_keys

from .test_sniff import dns_message, parse_answer


def config(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "version": 1,
        "instance": "beta",
        "listen": "10.77.0.1",
        "port": 40037,
        "peer": "10.77.0.37",
        "mode": "allowlist",
        "allow": ["api.anthropic.com", "allowed.amvm.test:8080"],
        "log": "/var/log/agent-microvm/beta/egress.log",
        "key_routes": [
            {
                "var": "ANTHROPIC_API_KEY",
                "upstream": "https://api.anthropic.com",
                "header": "x-api-key",
                "methods": ["GET", "POST"],
                "paths": ["/v1/"],
            }
        ],
    }
    base.update(changes)
    return base


def test_the_modules_configuration_becomes_an_egress_config_on_tcp() -> None:
    host = parse_config(json.dumps(config()), "beta.json")
    assert host.key_vars == ("ANTHROPIC_API_KEY",)
    assert host.config.mode == "allowlist"
    assert host.config.answer_addr == "10.77.0.1"
    assert host.config.listen is not None
    assert (host.config.listen.address, host.config.listen.port) == ("10.77.0.1", 40037)
    assert host.config.listen.peer == "10.77.0.37"
    assert [str(rule) for rule in host.config.rules] == [
        "api.anthropic.com",
        "allowed.amvm.test:8080",
    ]
    (route,) = host.config.key_routes
    # The module's base URL (modules/host.nix) uses the same segment.
    assert route.prefix == "anthropic-api-key"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"extra": 1}, "unknown keys ['extra']"),
        ({"version": 2}, "version 2, expected 1"),
        ({"mode": "none"}, "mode 'none' is not open or allowlist"),
        ({"listen": "10.77.0.300"}, "listen '10.77.0.300' is not an IPv4 address"),
        ({"peer": "vm"}, "peer 'vm' is not an IPv4 address"),
        ({"port": 70000}, "port 70000 is not 1..65535"),
        ({"port": True}, "port True is not 1..65535"),
        ({"allow": ["bad name!"]}, "is not a host name"),
        ({"log": "relative.log"}, "is not an absolute path"),
        ({"key_routes": [{"var": "K"}]}, "a key route needs exactly"),
    ],
)
def test_a_bad_configuration_is_refused_naming_the_field(
    changes: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=r"^beta\.json: ") as caught:
        parse_config(json.dumps(config(**changes)), "beta.json")
    assert message in str(caught.value)


def test_a_missing_key_is_refused() -> None:
    data = config()
    del data["peer"]
    with pytest.raises(ConfigError, match=r"missing keys \['peer'\]"):
        parse_config(json.dumps(data), "beta.json")


def test_keys_come_from_systemd_credentials_and_a_missing_one_is_empty(tmp_path: Path) -> None:
    (tmp_path / "ANTHROPIC_API_KEY").write_text("sk-secret\n")
    keys = read_keys(
        ("ANTHROPIC_API_KEY", "OPENAI_API_KEY"), {"CREDENTIALS_DIRECTORY": str(tmp_path)}
    )
    assert keys == {"ANTHROPIC_API_KEY": "sk-secret", "OPENAI_API_KEY": ""}
    assert read_keys(("ANTHROPIC_API_KEY",), {}) == {"ANTHROPIC_API_KEY": ""}


def test_main_refuses_a_bad_configuration_in_one_line_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(config(mode="sideways")))
    assert hostegress.main([str(path)], {}) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "mode 'sideways'" in err
    assert hostegress.main([], {}) == 2


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _proxy(tmp_path: Path, peer: str) -> EgressProxy:
    data = config(listen="127.0.0.1", port=_free_port(), peer=peer, log=str(tmp_path / "e.log"))
    host = parse_config(json.dumps(data), "test.json")
    proxy = EgressProxy(host.config, {})
    proxy.start()
    return proxy


def _log(proxy: EgressProxy, needle: str) -> str:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        text = proxy.config.log.read_text() if proxy.config.log.exists() else ""
        if needle in text:
            return text
        time.sleep(0.02)
    raise AssertionError(f"{needle!r} not logged")


def test_a_connection_from_another_address_than_the_vms_is_closed(tmp_path: Path) -> None:
    proxy = _proxy(tmp_path, peer="127.0.0.9")
    try:
        assert proxy.config.listen is not None
        port = proxy.config.listen.port
        # Closed unread: a reset, or EOF.
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as conn,
            contextlib.suppress(OSError),
        ):
            conn.sendall(dns_message("api.anthropic.com"))
            assert conn.recv(100) == b""
        assert "deny 127.0.0.1:" in _log(proxy, "not this proxy's VM")
    finally:
        proxy.stop()


def test_dns_answers_with_the_gateway_for_a_host_vm(tmp_path: Path) -> None:
    """The same DNS code as the runner's, pointing names at the VM's gateway."""
    data = config(log=str(tmp_path / "e.log"))
    host = parse_config(json.dumps(data), "test.json")
    # Through the relay socket (the TCP path needs nftables' redirect).
    proxy = EgressProxy(
        EgressConfig(
            **{**host.config.__dict__, "listen": None, "socket": tmp_path / "egress.sock"}
        ),
        {},
    )
    proxy.start()
    try:
        guest, relayed = socket.socketpair()
        with relayed, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as relay:
            relay.connect(str(tmp_path / "egress.sock"))
            socket.send_fds(relay, [b"53\n"], [relayed.fileno()])
        with guest:
            guest.settimeout(10)
            message = dns_message("api.anthropic.com")
            guest.sendall(len(message).to_bytes(2, "big") + message)
            size = int.from_bytes(guest.recv(2), "big")
            answer = b""
            while len(answer) < size:
                answer += guest.recv(size - len(answer))
        assert parse_answer(answer)["records"][0][4] == bytes([10, 77, 0, 1])
    finally:
        proxy.stop()
