"""The egress proxy, run for real: a unix socket in front, TCP servers on 127.0.0.1 behind."""

from __future__ import annotations

import contextlib
import socket
import socketserver
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

import pytest

import microvm_run
from microvm_run.egress import EgressConfig, EgressError, EgressProxy, KeyRoute
from microvm_run.netmode import NetMode
from microvm_run.netpolicy import parse_allow

from .test_sniff import client_hello, dns_message, parse_answer

TIMEOUT_S = 10.0


class LocalServer:
    """A threaded TCP server on 127.0.0.1 with ``handler``, until close()."""

    def serve(self, handler: type[socketserver.BaseRequestHandler]) -> None:
        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Upstream(LocalServer):
    """A TCP server on 127.0.0.1 that records what each connection sent and replies.

    ``until_eof``: read until the client half-closes (what a transparent
    tunnel must propagate); otherwise reply as soon as an HTTP head (and its
    Content-Length body) is in.
    """

    def __init__(
        self, reply: bytes = b"pong", *, until_eof: bool = False, echo: bool = False
    ) -> None:
        self.reply = reply
        self.until_eof = until_eof
        self.received: list[bytes] = []
        upstream = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                self.request.settimeout(TIMEOUT_S)
                data = b""
                if echo:
                    with contextlib.suppress(OSError):
                        while chunk := self.request.recv(65536):
                            self.request.sendall(chunk)
                        self.request.shutdown(socket.SHUT_WR)
                    return
                try:
                    while True:
                        chunk = self.request.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                        if not upstream.until_eof and _complete_request(data):
                            break
                except OSError:  # the proxy went away: record what came
                    upstream.received.append(data)
                    return
                upstream.received.append(data)
                with contextlib.suppress(OSError):
                    self.request.sendall(upstream.reply)

        self.serve(Handler)


def _complete_request(data: bytes) -> bool:
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return False
    length = 0
    for line in data[:end].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
        if name.strip().lower() == b"transfer-encoding":
            return len(data) > end + 4 and data.endswith(b"\r\n\r\n")  # a body's end
    return len(data) >= end + 4 + length


@pytest.fixture
def upstream() -> Iterator[Callable[..., Upstream]]:
    servers: list[Upstream] = []

    def make(reply: bytes = b"pong", *, until_eof: bool = False, echo: bool = False) -> Upstream:
        server = Upstream(reply, until_eof=until_eof, echo=echo)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # pytest's tmp_path can be longer than a unix socket path may be.
    with tempfile.TemporaryDirectory(prefix="egress-") as name:
        yield Path(name)


@pytest.fixture
def proxy_factory(sock_dir: Path, tmp_path: Path) -> Iterator[Callable[..., EgressProxy]]:
    proxies: list[EgressProxy] = []

    def make(
        mode: str = "allowlist",
        allow: tuple[str, ...] = (),
        routes: tuple[KeyRoute, ...] = (),
        keys: dict[str, str] | None = None,
        socket_path: Path | None = None,
        *,
        private: bool = True,
    ) -> EgressProxy:
        # The upstreams here all listen on loopback, which only a private
        # rule (--allow-private) reaches: ``private=False`` tests that.
        config = EgressConfig(
            mode=NetMode(mode),
            rules=tuple(parse_allow(entry, private=private) for entry in allow),
            socket=socket_path or sock_dir / "egress.sock",
            log=tmp_path / "state" / "egress.log",
            instance_id="cafe0001",
            key_routes=routes,
        )
        proxy = EgressProxy(config, keys or {})
        proxies.append(proxy)
        proxy.start()
        return proxy

    yield make
    for proxy in proxies:
        proxy.stop()


def connect(proxy: EgressProxy, port: int) -> socket.socket:
    """What QEMU and relay.py do for one guest connection: the socket is handed over."""
    guest, relayed = socket.socketpair()
    with relayed, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as relay:
        relay.connect(str(proxy.config.socket))
        socket.send_fds(relay, [f"{port}\n".encode()], [relayed.fileno()])
    guest.settimeout(TIMEOUT_S)
    return guest


def read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def exchange(proxy: EgressProxy, port: int, data: bytes, *, half_close: bool = True) -> bytes:
    with connect(proxy, port) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        return read_all(sock)


def log_text(proxy: EgressProxy) -> str:
    # The log is line-buffered and written on the proxy thread; wait for it.
    deadline = time.monotonic() + TIMEOUT_S
    text = ""
    while time.monotonic() < deadline:
        text = proxy.config.log.read_text() if proxy.config.log.exists() else ""
        if text:
            return text
        time.sleep(0.02)
    return text


def wait_for_log(proxy: EgressProxy, needle: str) -> str:
    deadline = time.monotonic() + TIMEOUT_S
    text = ""
    while time.monotonic() < deadline:
        text = proxy.config.log.read_text() if proxy.config.log.exists() else ""
        if needle in text:
            return text
        time.sleep(0.02)
    raise AssertionError(f"{needle!r} not in the egress log:\n{text}")


def status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


# -- allowlist and open mode over the transparent HTTP path -----------------------


def test_allowlist_passes_a_listed_name_as_one_request(
    proxy_factory: Callable[..., EgressProxy], upstream: Callable[..., Upstream]
) -> None:
    server = upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    proxy = proxy_factory("allowlist", (f"localhost:{server.port}",))
    request = b"GET /x HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n"
    assert exchange(proxy, server.port, request) == server.reply
    # Unchanged but for one request per connection.
    assert server.received == [request[:-2] + b"Connection: close\r\n\r\n"]
    text = wait_for_log(proxy, "allow")
    assert f"cafe0001 allow localhost:{server.port} via http" in text
    assert proxy.allowed == 1 and proxy.summary() is None


def test_allowlist_refuses_an_unlisted_name_with_403_and_a_log_line(
    proxy_factory: Callable[..., EgressProxy], upstream: Callable[..., Upstream]
) -> None:
    server = upstream()
    proxy = proxy_factory("allowlist", (f"localhost:{server.port}", "*.example.com"))
    request = b"GET / HTTP/1.1\r\nHost: blocked.example.org\r\n\r\n"
    response = exchange(proxy, server.port, request)
    assert status(response) == 403
    assert b"refused blocked.example.org:%d: not in the allowlist" % server.port in response
    assert b"(--net allowlist); to allow it, on the host: microvm-run allow" in response
    text = wait_for_log(proxy, "deny")
    assert f"deny blocked.example.org:{server.port} via http (not in the allowlist)" in text
    assert server.received == []


def test_allowlist_wildcards_do_not_match_the_bare_suffix_or_lookalikes(
    proxy_factory: Callable[..., EgressProxy], upstream: Callable[..., Upstream]
) -> None:
    server = upstream()
    proxy = proxy_factory("allowlist", (f"*.localhost:{server.port}",))
    for host in (b"localhost", b"evillocalhost"):
        response = exchange(proxy, server.port, b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
        assert status(response) == 403
    assert server.received == []


def test_allowlist_port_rules_apply_to_the_connection_port(
    proxy_factory: Callable[..., EgressProxy], upstream: Callable[..., Upstream]
) -> None:
    server = upstream()
    other = upstream()
    proxy = proxy_factory("allowlist", (f"localhost:{server.port}",))
    request = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"
    assert exchange(proxy, server.port, request) == b"pong"
    assert status(exchange(proxy, other.port, request)) == 403
    assert other.received == []


def test_host_header_case_port_and_trailing_dot_are_normalised(
    proxy_factory: Callable[..., EgressProxy], upstream: Callable[..., Upstream]
) -> None:
    server = upstream()
    proxy = proxy_factory("allowlist", (f"localhost:{server.port}",))
    request = b"GET / HTTP/1.1\r\nhost: LocalHost.:9\r\n\r\n"
    # The port in the Host header is not where the connection goes: the guest port is.
    assert exchange(proxy, server.port, request) == b"pong"
    assert server.received == [request[:-2] + b"Connection: close\r\n\r\n"]


@pytest.mark.parametrize(
    "host", [b"localhost", b"127.0.0.1", b"127.0.0.2", b"2130706433", b"0x7f.1", b"10.0.0.1",
             b"169.254.169.254", b"[::1]", b"0.0.0.0"],
)  # fmt: skip
def test_open_mode_refuses_the_host_and_private_addresses(
    proxy_factory: Callable[..., EgressProxy], upstream: Callable[..., Upstream], host: bytes
) -> None:
    server = upstream()
    proxy = proxy_factory("open")
    response = exchange(proxy, server.port, b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
    assert status(response) == 403
    text = wait_for_log(proxy, "deny")
    assert "cafe0001 deny" in text and "via http" in text
    assert ("non-public address" in text) or ("not a host name" in text), text
    assert server.received == []
    assert proxy.allowed == 0


def test_open_mode_log_names_the_host_and_the_address(
    proxy_factory: Callable[..., EgressProxy], upstream: Callable[..., Upstream]
) -> None:
    server = upstream()
    proxy = proxy_factory("open")
    exchange(proxy, server.port, b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
    text = wait_for_log(proxy, "deny")
    assert f"deny localhost:{server.port} via http (resolves to non-public address" in text
    summary = proxy.summary()
    assert summary is not None and f"localhost:{server.port} (1x)" in summary


def test_allowlist_admits_loopback_only_when_listed(
    proxy_factory: Callable[..., EgressProxy], upstream: Callable[..., Upstream]
) -> None:
    server = upstream()
    proxy = proxy_factory("allowlist", (f"127.0.0.1:{server.port}",))
    assert exchange(proxy, server.port, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n") == b"pong"


def test_a_refused_upstream_port_is_a_denial_not_a_hang(
    proxy_factory: Callable[..., EgressProxy],
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    proxy = proxy_factory("allowlist", (f"localhost:{closed_port}",))
    response = exchange(proxy, closed_port, b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert status(response) == 403 and b"connection failed" in response


@pytest.mark.parametrize(
    "request_bytes",
    [b"GET / HTTP/1.1\r\n\r\n", b"garbage\r\n\r\n", b"", b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
     b"GET / HTTP/1.1\r\nHost: localhost:\xc2\xb2\r\n\r\n"],
)  # fmt: skip
def test_no_usable_host_means_no_connection(
    proxy_factory: Callable[..., EgressProxy],
    upstream: Callable[..., Upstream],
    request_bytes: bytes,
) -> None:
    server = upstream()
    proxy = proxy_factory("allowlist", (f"localhost:{server.port}", "a"))
    response = exchange(proxy, server.port, request_bytes)
    assert response == b"" or status(response) == 403
    if request_bytes:  # a connection that sends nothing is no attempt to log
        wait_for_log(proxy, "deny")
    assert server.received == []


def test_a_silent_client_is_not_let_through(
    proxy_factory: Callable[..., EgressProxy], upstream: Callable[..., Upstream]
) -> None:
    server = upstream()
    proxy = proxy_factory("allowlist", (f"localhost:{server.port}",))
    # Half a head, then EOF.
    assert exchange(proxy, server.port, b"GET / HTTP/1.1\r\nHost: localhost\r\n") == b""
    assert server.received == []


# -- transparent TLS ----------------------------------------------------------------


def test_tls_by_sni_reaches_the_upstream_byte_for_byte(
    proxy_factory: Callable[..., EgressProxy], upstream: Callable[..., Upstream]
) -> None:
    server = upstream(b"server bytes", until_eof=True)
    proxy = proxy_factory("allowlist", (f"localhost:{server.port}",))
    hello = client_hello("localhost")
    assert exchange(proxy, server.port, hello) == b"server bytes"
    assert server.received == [hello]
    assert f"allow localhost:{server.port} via tls" in wait_for_log(proxy, "allow")


def test_tls_client_hello_in_small_pieces(
    proxy_factory: Callable[..., EgressProxy], upstream: Callable[..., Upstream]
) -> None:
    server = upstream(b"ok", until_eof=True)
    proxy = proxy_factory("allowlist", (f"localhost:{server.port}",))
    hello = client_hello("localhost") + b"after the hello"
    with connect(proxy, server.port) as sock:
        for start in range(0, len(hello), 7):
            sock.sendall(hello[start : start + 7])
            time.sleep(0.001)
        sock.shutdown(socket.SHUT_WR)
        assert read_all(sock) == b"ok"
    assert server.received == [hello]


def test_tls_to_an_unlisted_name_is_closed_and_logged(
    proxy_factory: Callable[..., EgressProxy], upstream: Callable[..., Upstream]
) -> None:
    server = upstream(until_eof=True)
    proxy = proxy_factory("allowlist", (f"localhost:{server.port}",))
    assert exchange(proxy, server.port, client_hello("exfil.example.net")) == b""
    text = wait_for_log(proxy, "deny")
    assert f"deny exfil.example.net:{server.port} via tls (not in the allowlist)" in text
    assert server.received == []


def test_tls_without_sni_is_refused(
    proxy_factory: Callable[..., EgressProxy], upstream: Callable[..., Upstream]
) -> None:
    server = upstream(until_eof=True)
    proxy = proxy_factory("open")
    assert exchange(proxy, server.port, client_hello(None)) == b""
    assert f"deny ?:{server.port} via tls (no host name" in wait_for_log(proxy, "deny")
    assert server.received == []


def test_tls_in_open_mode_refuses_localhost(
    proxy_factory: Callable[..., EgressProxy], upstream: Callable[..., Upstream]
) -> None:
    server = upstream(until_eof=True)
    proxy = proxy_factory("open")
    assert exchange(proxy, server.port, client_hello("localhost")) == b""
    assert "non-public address" in wait_for_log(proxy, "deny")
    assert server.received == []


# -- the explicit proxy: CONNECT and absolute-form --------------------------------------


def test_connect_tunnels_both_ways(
    proxy_factory: Callable[..., EgressProxy], upstream: Callable[..., Upstream]
) -> None:
    server = upstream(b"from upstream", until_eof=True)
    proxy = proxy_factory("allowlist", (f"localhost:{server.port}",))
    head = f"CONNECT localhost:{server.port} HTTP/1.1\r\nHost: localhost:{server.port}\r\n\r\n"
    response = exchange(proxy, 3128, head.encode() + b"tunnelled bytes")
    assert response == b"HTTP/1.1 200 Connection established\r\n\r\nfrom upstream"
    assert server.received == [b"tunnelled bytes"]
    assert f"allow localhost:{server.port} via connect" in wait_for_log(proxy, "allow")


def test_connect_with_a_real_client_hello_after_the_200(
    proxy_factory: Callable[..., EgressProxy], upstream: Callable[..., Upstream]
) -> None:
    server = upstream(b"x", until_eof=True)
    proxy = proxy_factory("allowlist", (f"localhost:{server.port}",))
    hello = client_hello("localhost")
    with connect(proxy, 3128) as sock:
        sock.sendall(f"CONNECT localhost:{server.port} HTTP/1.1\r\n\r\n".encode())
        established = b"HTTP/1.1 200 Connection established\r\n\r\n"
        got = b""
        while len(got) < len(established):
            got += sock.recv(len(established) - len(got))
        assert got == established
        sock.sendall(hello)
        sock.shutdown(socket.SHUT_WR)
        assert read_all(sock) == b"x"
    assert server.received == [hello]


def test_a_tunnel_carries_large_transfers_both_ways_at_once(
    proxy_factory: Callable[..., EgressProxy], upstream: Callable[..., Upstream]
) -> None:
    server = upstream(echo=True)
    proxy = proxy_factory("allowlist", (f"localhost:{server.port}",))
    payload = bytes(range(256)) * (8 * 4096)  # 8 MiB
    established = b"HTTP/1.1 200 Connection established\r\n\r\n"
    echoed: list[bytes | OSError] = []
    with connect(proxy, 3128) as sock:
        sock.sendall(f"CONNECT localhost:{server.port} HTTP/1.1\r\n\r\n".encode())

        def read_back() -> None:
            try:
                echoed.append(read_all(sock))
            except OSError as err:
                echoed.append(err)

        reader = threading.Thread(target=read_back, daemon=True)
        reader.start()
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        reader.join(TIMEOUT_S * 3)
        assert not reader.is_alive()
    assert echoed == [established + payload]


@pytest.mark.parametrize(
    ("mode", "allow", "target"),
    [
        ("allowlist", ("localhost",), "elsewhere.example:443"),
        ("allowlist", ("localhost:1",), "localhost:{port}"),
        ("open", (), "localhost:{port}"),
        ("open", (), "127.0.0.1:{port}"),
    ],
)
def test_connect_refused_by_policy_is_403(
    proxy_factory: Callable[..., EgressProxy],
    upstream: Callable[..., Upstream],
    mode: str,
    allow: tuple[str, ...],
    target: str,
) -> None:
    server = upstream(until_eof=True)
    proxy = proxy_factory(mode, allow)
    target = target.format(port=server.port)
    response = exchange(proxy, 3128, f"CONNECT {target} HTTP/1.1\r\n\r\nsecret".encode())
    assert status(response) == 403
    assert response.startswith(b"HTTP/1.1 403 ")
    host = target.rsplit(":", 1)[0]
    assert f"deny {host}:" in wait_for_log(proxy, "deny")
    assert server.received == []


@pytest.mark.parametrize(
    "target", ["localhost:notaport", "localhost:0", "localhost:99999", "[::1", "localhost:\u00b2"]
)
def test_malformed_connect_targets_are_400(
    proxy_factory: Callable[..., EgressProxy], target: str
) -> None:
    proxy = proxy_factory("allowlist", ("localhost",))
    head = f"CONNECT {target} HTTP/1.1\r\n\r\n".encode("latin-1")
    assert status(exchange(proxy, 3128, head)) == 400


def test_absolute_form_is_rewritten_to_origin_form(
    proxy_factory: Callable[..., EgressProxy], upstream: Callable[..., Upstream]
) -> None:
    server = upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    proxy = proxy_factory("allowlist", (f"localhost:{server.port}",))
    request = (
        f"POST http://localhost:{server.port}/a/b?q=1&r=2#frag HTTP/1.1\r\n"
        f"Host: localhost:{server.port}\r\n"
        "Proxy-Connection: keep-alive\r\n"
        "Proxy-Authorization: Basic dXNlcjpwYXNz\r\n"
        "Connection: keep-alive\r\n"
        "Accept: */*\r\n"
        "Content-Length: 4\r\n\r\nbody"
    ).encode()
    assert exchange(proxy, 3128, request) == server.reply
    assert server.received == [
        (
            f"POST /a/b?q=1&r=2 HTTP/1.1\r\nHost: localhost:{server.port}\r\n"
            "Accept: */*\r\nContent-Length: 4\r\nConnection: close\r\n\r\nbody"
        ).encode()
    ]
    assert f"allow localhost:{server.port} via proxy" in wait_for_log(proxy, "allow")


def test_absolute_form_without_a_host_header_gets_one_from_the_url(
    proxy_factory: Callable[..., EgressProxy], upstream: Callable[..., Upstream]
) -> None:
    server = upstream(b"HTTP/1.0 200 OK\r\n\r\n")
    proxy = proxy_factory("allowlist", (f"localhost:{server.port}",))
    request = f"GET http://localhost:{server.port}/x HTTP/1.0\r\n\r\n".encode()
    assert exchange(proxy, 3128, request) == server.reply
    assert server.received == [
        f"GET /x HTTP/1.0\r\nHost: localhost:{server.port}\r\nConnection: close\r\n\r\n".encode()
    ]


def test_absolute_form_without_a_path_gets_slash(
    proxy_factory: Callable[..., EgressProxy], upstream: Callable[..., Upstream]
) -> None:
    server = upstream()
    proxy = proxy_factory("allowlist", (f"localhost:{server.port}",))
    request = f"GET http://localhost:{server.port} HTTP/1.1\r\n\r\n".encode()
    exchange(proxy, 3128, request)
    assert server.received == [
        f"GET / HTTP/1.1\r\nHost: localhost:{server.port}\r\nConnection: close\r\n\r\n".encode()
    ]


@pytest.mark.parametrize(
    "target",
    ["https://localhost/", "/relative", "ftp://localhost/", "http://user:pw@localhost/",
     "http://localhost:x/", "http:///nohost"],
)  # fmt: skip
def test_explicit_proxy_refuses_what_it_does_not_serve(
    proxy_factory: Callable[..., EgressProxy], upstream: Callable[..., Upstream], target: str
) -> None:
    server = upstream()
    proxy = proxy_factory("allowlist", (f"localhost:{server.port}",))
    response = exchange(proxy, 3128, f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert status(response) in (400, 403)
    assert server.received == []


def test_absolute_form_refused_by_policy_is_403(
    proxy_factory: Callable[..., EgressProxy], upstream: Callable[..., Upstream]
) -> None:
    server = upstream()
    proxy = proxy_factory("open")
    request = f"GET http://localhost:{server.port}/ HTTP/1.1\r\n\r\n".encode()
    assert status(exchange(proxy, 3128, request)) == 403
    assert server.received == []


# -- DNS over TCP -------------------------------------------------------------------------


def dns_exchange(proxy: EgressProxy, messages: list[bytes]) -> list[bytes]:
    answers = []
    with connect(proxy, 53) as sock:
        for message in messages:
            sock.sendall(struct.pack("!H", len(message)) + message)
            size = struct.unpack("!H", _recv_exactly(sock, 2))[0]
            answers.append(_recv_exactly(sock, size))
        sock.shutdown(socket.SHUT_WR)
        assert read_all(sock) == b""
    return answers


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "connection closed early"
        data += chunk
    return data


def test_dns_answers_listed_names_and_refuses_others(
    proxy_factory: Callable[..., EgressProxy],
) -> None:
    proxy = proxy_factory("allowlist", ("*.example.com", "git.corp.example:8443"))
    allowed, denied, aaaa, port_rule, garbage = dns_exchange(
        proxy,
        [
            dns_message("api.example.com", ident=1),
            dns_message("evil.example.net", ident=2),
            dns_message("api.example.com", qtype=28, ident=3),
            dns_message("git.corp.example", ident=4),
            b"\x00\x05garbage",
        ],
    )
    answer = parse_answer(allowed)
    assert answer["id"] == 1 and answer["rcode"] == 0
    assert answer["records"] == [(0xC00C, 1, 1, 60, bytes([10, 0, 2, 100]))]
    refused = parse_answer(denied)
    assert refused["id"] == 2 and refused["rcode"] == 3 and refused["records"] == []
    empty = parse_answer(aaaa)
    assert empty["id"] == 3 and empty["rcode"] == 0 and empty["counts"] == (1, 0, 0, 0)
    assert parse_answer(port_rule)["records"][0][4] == bytes([10, 0, 2, 100])
    assert struct.unpack("!HH", garbage[:4]) == (5, 0x8001)
    assert "deny evil.example.net:53 via dns (not in the allowlist)" in wait_for_log(proxy, "deny")


def test_dns_in_open_mode_answers_every_name_with_the_egress_address(
    proxy_factory: Callable[..., EgressProxy],
) -> None:
    proxy = proxy_factory("open")
    (answer,) = dns_exchange(proxy, [dns_message("anything.example.net")])
    assert parse_answer(answer)["records"][0][4] == bytes([10, 0, 2, 100])


def test_a_name_longer_than_dns_allows_is_a_format_error_not_a_traceback(
    proxy_factory: Callable[..., EgressProxy], caplog: pytest.LogCaptureFixture
) -> None:
    # A 65,535-byte query: its answer (the question echoed, plus the record)
    # no longer fits DNS over TCP's length prefix.  It raised on the proxy
    # thread, and asyncio printed the traceback on the user's terminal.
    name = ".".join(["a" * 63] * 1023 + ["b" * 45])
    huge = dns_message(name, ident=9)
    assert len(huge) == 65535
    proxy = proxy_factory("open")
    refused, answered = dns_exchange(proxy, [huge, dns_message("example.net", ident=10)])
    assert struct.unpack("!HH", refused[:4]) == (9, 0x8001)
    assert parse_answer(answered)["records"][0][4] == bytes([10, 0, 2, 100])
    proxy.stop()
    assert [r for r in caplog.records if r.name == "asyncio"] == []


# -- the key proxy ----------------------------------------------------------------------


def key_routes(bearer: Upstream, x_api: Upstream) -> tuple[KeyRoute, ...]:
    return (
        KeyRoute(
            prefix="openai-api-key",
            var="OPENAI_API_KEY",
            upstream=f"http://127.0.0.1:{bearer.port}/v1/",
            header="authorization",
        ),
        KeyRoute(
            prefix="anthropic-api-key",
            var="ANTHROPIC_API_KEY",
            upstream=f"http://localhost:{x_api.port}",
            header="x-api-key",
        ),
    )


KEYS = {"OPENAI_API_KEY": "sk-real-openai-1234", "ANTHROPIC_API_KEY": "sk-ant-real-5678"}


def _headers(request: bytes) -> tuple[str, list[tuple[str, str]], bytes]:
    head, _, body = request.partition(b"\r\n\r\n")
    first, *lines = head.decode("latin-1").split("\r\n")
    pairs = []
    for line in lines:
        name, _, value = line.partition(":")
        pairs.append((name.lower(), value.strip()))
    return first, pairs, body


def test_key_proxy_adds_only_the_real_key_bearer_form(
    proxy_factory: Callable[..., EgressProxy], upstream: Callable[..., Upstream]
) -> None:
    bearer, x_api = upstream(b"HTTP/1.1 200 OK\r\n\r\n"), upstream()
    proxy = proxy_factory("allowlist", (), key_routes(bearer, x_api), KEYS)
    request = (
        b"POST /openai-api-key/chat/completions?stream=1 HTTP/1.1\r\n"
        b"Host: 10.0.2.100:4180\r\n"
        b"Authorization: Bearer microvm-run-placeholder\r\n"
        b"X-Api-Key: microvm-run-placeholder\r\n"
        b"x-goog-api-key: microvm-run-placeholder\r\n"
        b"Proxy-Authorization: Basic eA==\r\n"
        b"Connection: keep-alive\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: 2\r\n\r\n{}"
    )
    assert exchange(proxy, 4180, request) == bearer.reply
    (got,) = bearer.received
    first, headers, body = _headers(got)
    assert first == "POST /v1/chat/completions?stream=1 HTTP/1.1"
    assert headers == [
        ("content-type", "application/json"),
        ("content-length", "2"),
        ("host", f"127.0.0.1:{bearer.port}"),
        ("authorization", "Bearer sk-real-openai-1234"),
        ("connection", "close"),
    ]
    assert body == b"{}"
    assert b"placeholder" not in got
    assert x_api.received == []


def test_key_proxy_x_api_key_form_and_no_key_in_the_log(
    proxy_factory: Callable[..., EgressProxy], upstream: Callable[..., Upstream]
) -> None:
    bearer, x_api = upstream(), upstream(b"HTTP/1.1 200 OK\r\n\r\n")
    proxy = proxy_factory("open", (), key_routes(bearer, x_api), KEYS)
    request = (
        b"GET /anthropic-api-key/v1/models HTTP/1.1\r\nhost: 10.0.2.100:4180\r\n"
        b"AUTHORIZATION: Bearer microvm-run-placeholder\r\n"
        b"x-api-key: microvm-run-placeholder\r\nAnthropic-Version: 2023-06-01\r\n\r\n"
    )
    assert exchange(proxy, 4180, request) == x_api.reply
    (got,) = x_api.received
    first, headers, _ = _headers(got)
    assert first == "GET /v1/models HTTP/1.1"
    assert headers == [
        ("anthropic-version", "2023-06-01"),
        ("host", f"localhost:{x_api.port}"),
        ("x-api-key", "sk-ant-real-5678"),
        ("connection", "close"),
    ]
    # The open-mode address check is for the guest's destinations, not the flavor's upstream.
    text = wait_for_log(proxy, "allow")
    assert f"allow localhost:{x_api.port} via key-proxy ANTHROPIC_API_KEY" in text
    for value in KEYS.values():
        assert value not in text


@pytest.mark.parametrize(
    "path", ["/unknown/v1/x", "/", "/openai-api-key-x/v1", "http://127.0.0.1/openai-api-key/"]
)
def test_key_proxy_unknown_prefix_is_404(
    proxy_factory: Callable[..., EgressProxy], upstream: Callable[..., Upstream], path: str
) -> None:
    bearer, x_api = upstream(), upstream()
    proxy = proxy_factory("allowlist", (), key_routes(bearer, x_api), KEYS)
    response = exchange(proxy, 4180, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert status(response) == 404
    assert bearer.received == [] and x_api.received == []
    for value in KEYS.values():
        assert value.encode() not in response


def test_key_proxy_without_the_key_is_404(
    proxy_factory: Callable[..., EgressProxy], upstream: Callable[..., Upstream]
) -> None:
    bearer, x_api = upstream(), upstream()
    proxy = proxy_factory("allowlist", (), key_routes(bearer, x_api), {"OPENAI_API_KEY": ""})
    response = exchange(proxy, 4180, b"GET /openai-api-key/x HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status(response) == 404
    assert bearer.received == []


def test_key_proxy_upstream_down_is_502_without_the_key(
    proxy_factory: Callable[..., EgressProxy],
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    route = KeyRoute("k", "OPENAI_API_KEY", f"http://127.0.0.1:{closed_port}", "authorization")
    proxy = proxy_factory("allowlist", (), (route,), KEYS)
    response = exchange(proxy, 4180, b"GET /k/v1/x HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status(response) == 502
    assert b"sk-real" not in response
    assert "sk-real" not in wait_for_log(proxy, "key-proxy")


def test_without_key_routes_port_4180_is_no_key_proxy(
    proxy_factory: Callable[..., EgressProxy],
) -> None:
    proxy = proxy_factory("allowlist", (), (), KEYS)
    response = exchange(proxy, 4180, b"GET /openai-api-key/x HTTP/1.1\r\nHost: x\r\n\r\n")
    assert response == b"" or status(response) == 403
    assert "sk-real" not in log_text(proxy)


# -- lifecycle ---------------------------------------------------------------------------


def test_summary_counts_and_caps_the_denied_hosts(
    proxy_factory: Callable[..., EgressProxy], upstream: Callable[..., Upstream]
) -> None:
    server = upstream()
    proxy = proxy_factory("allowlist", (f"localhost:{server.port}",))
    assert proxy.summary() is None
    hosts = ["a.example"] * 3 + [f"h{i}.example" for i in range(6)]
    for host in hosts:
        exchange(proxy, server.port, f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    summary = proxy.summary()
    assert summary is not None
    assert summary.startswith(f"egress denied 9 connection(s): a.example:{server.port} (3x), ")
    assert summary.endswith(
        f" and 2 more; microvm-run logs cafe0001 (each decision: {proxy.config.log})"
    )
    assert summary.count("(1x)") == 4
    assert "\n" not in summary


def _egress_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "egress" and t.is_alive()]


def test_stop_ends_the_thread_even_with_open_connections(
    proxy_factory: Callable[..., EgressProxy], upstream: Callable[..., Upstream]
) -> None:
    before = len(_egress_threads())
    server = upstream(until_eof=True)
    proxy = proxy_factory("allowlist", (f"localhost:{server.port}",))
    assert len(_egress_threads()) == before + 1
    idle = connect(proxy, 443)  # no bytes yet: waiting for a ClientHello
    tunnel = connect(proxy, 3128)
    tunnel.sendall(f"CONNECT localhost:{server.port} HTTP/1.1\r\n\r\n".encode())
    assert tunnel.recv(100).startswith(b"HTTP/1.1 200")
    proxy.stop()
    assert len(_egress_threads()) == before
    assert proxy._loop.is_closed()
    # The guest's connections are closed, not left hanging.
    for sock in (idle, tunnel):
        with sock:
            assert read_all(sock) == b""
    proxy.stop()  # twice is fine


def test_the_socket_is_private(proxy_factory: Callable[..., EgressProxy]) -> None:
    proxy = proxy_factory("open")
    assert proxy.config.socket.stat().st_mode & 0o777 == 0o600


def test_an_error_no_connection_handles_goes_to_the_log_not_the_terminal(
    proxy_factory: Callable[..., EgressProxy],
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A proxy bug the guest's bytes set off (as an oversized DNS name once
    # did): asyncio's default handler would print its traceback, escape
    # sequences and all, on the user's terminal.
    proxy = proxy_factory("open")

    async def broken(conn: socket.socket) -> None:
        conn.close()
        raise RuntimeError("guest-made \x1b[2J")

    monkeypatch.setattr(proxy, "_accept", broken)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as relay:
        relay.connect(str(proxy.config.socket))
    text = wait_for_log(proxy, "error:")
    assert "RuntimeError: guest-made \\x1b[2J" in text

    def fails() -> None:
        raise ValueError("outside any connection \x07")

    proxy._loop.call_soon_threadsafe(fails)
    text = wait_for_log(proxy, "ValueError")
    assert "ValueError: outside any connection \\x07" in text
    out, err = capfd.readouterr()
    assert "Traceback" not in err and "\x1b" not in err + out


def test_start_on_a_bound_path_fails_closed(
    proxy_factory: Callable[..., EgressProxy], sock_dir: Path, tmp_path: Path
) -> None:
    first = proxy_factory("open")
    config = EgressConfig(NetMode.OPEN, (), first.config.socket, tmp_path / "other.log", "x")
    second = EgressProxy(config, {})
    with pytest.raises(EgressError, match="cannot set up the egress proxy"):
        second.start()
    second.stop()
    assert second._loop.is_closed()
    # The first one still serves.
    (answer,) = dns_exchange(first, [dns_message("a.example")])
    assert parse_answer(answer)["rcode"] == 0


@pytest.mark.parametrize("where", ["missing-dir/egress.sock", "file"])
def test_start_where_no_socket_can_be_bound_fails_closed(
    sock_dir: Path, tmp_path: Path, where: str
) -> None:
    (sock_dir / "file").write_text("")
    config = EgressConfig(NetMode.OPEN, (), sock_dir / where, tmp_path / "egress.log", "x")
    proxy = EgressProxy(config, {})
    with pytest.raises(EgressError):
        proxy.start()
    proxy.stop()
    assert proxy._thread is None


def test_a_connection_without_a_port_line_is_dropped(
    proxy_factory: Callable[..., EgressProxy],
) -> None:
    proxy = proxy_factory("open")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(TIMEOUT_S)
        sock.connect(str(proxy.config.socket))
        sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        sock.shutdown(socket.SHUT_WR)
        with contextlib.suppress(ConnectionResetError):  # unread bytes at close: a reset
            assert read_all(sock) == b""


def test_end_to_end_through_relay_py(
    proxy_factory: Callable[..., EgressProxy], upstream: Callable[..., Upstream]
) -> None:
    """What QEMU does: relay.py per connection, the guest's socket on its fds 0-2."""
    server = upstream(b"HTTP/1.1 204 No Content\r\n\r\n")
    proxy = proxy_factory("allowlist", (f"localhost:{server.port}",))
    relay_py = Path(microvm_run.__file__).with_name("relay.py")
    results = {}
    for host in ("localhost", "blocked.example"):
        guest, child = socket.socketpair()
        relay = subprocess.Popen(
            [sys.executable, "-I", "-S", str(relay_py), str(server.port), str(proxy.config.socket)],
            stdin=child.fileno(),
            stdout=child.fileno(),
            stderr=child.fileno(),
        )
        child.close()
        with guest:
            guest.settimeout(TIMEOUT_S)
            guest.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            guest.shutdown(socket.SHUT_WR)
            results[host] = read_all(guest)
        assert relay.wait(TIMEOUT_S) == 0
    assert results["localhost"] == server.reply
    assert status(results["blocked.example"]) == 403
    assert server.received == [b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"]


# -- addresses: checked in every mode, inward only through --allow-private ---------


@pytest.mark.parametrize("mode", ["allowlist", "open"])
def test_a_listed_name_that_resolves_to_loopback_is_refused_without_a_private_rule(
    proxy_factory: Callable[..., EgressProxy], upstream: Callable[..., Upstream], mode: str
) -> None:
    # What a wildcard rule, split-horizon DNS or rebinding amounts to: an
    # allowed name whose address is the host's own loopback.
    server = upstream()
    proxy = proxy_factory(mode, (f"localhost:{server.port}",), private=False)
    response = exchange(proxy, server.port, b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert status(response) == 403
    assert b"non-public address" in response and b"--allow-private" in response
    assert server.received == []
    assert f"deny localhost:{server.port} via http (resolves to non-public address" in (
        wait_for_log(proxy, "deny")
    )


def test_a_private_rule_admits_only_its_own_host_and_port(
    proxy_factory: Callable[..., EgressProxy], upstream: Callable[..., Upstream]
) -> None:
    server, other = upstream(), upstream()
    proxy = proxy_factory("open", (f"localhost:{server.port}",), private=True)
    request = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"
    assert exchange(proxy, server.port, request) == b"pong"
    assert status(exchange(proxy, other.port, request)) == 403  # open mode, but inward
    assert other.received == []


def test_the_hosts_own_address_is_refused_before_any_handshake(
    proxy_factory: Callable[..., EgressProxy],
    upstream: Callable[..., Upstream],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # As if 127.0.0.1 were a public address of this host: the check that
    # remains is "one of our own", asked of the kernel before connecting.
    server = upstream()
    accepted: list[object] = []
    handler = cast(type[socketserver.BaseRequestHandler], server.server.RequestHandlerClass)
    handle = handler.handle

    def counting(self: socketserver.BaseRequestHandler) -> None:
        accepted.append(self.client_address)
        handle(self)

    monkeypatch.setattr(handler, "handle", counting)
    monkeypatch.setattr("microvm_run.netpolicy.public_address", lambda _address: True)
    proxy = proxy_factory("open")
    response = exchange(proxy, server.port, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert status(response) == 403 and b"this host's address 127.0.0.1" in response
    time.sleep(0.2)
    assert accepted == [] and server.received == []


# -- one request per policy decision --------------------------------------------------


def test_a_pipelined_second_request_never_reaches_the_upstream(
    proxy_factory: Callable[..., EgressProxy], upstream: Callable[..., Upstream]
) -> None:
    server = upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    proxy = proxy_factory("allowlist", (f"localhost:{server.port}",))
    first = b"GET /a HTTP/1.1\r\nHost: localhost\r\n\r\n"
    second = b"GET /secret HTTP/1.1\r\nHost: denied.example\r\n\r\n"
    assert exchange(proxy, server.port, first + second) == server.reply
    assert server.received == [first[:-2] + b"Connection: close\r\n\r\n"]


def test_a_second_absolute_form_request_on_3128_is_not_forwarded(
    proxy_factory: Callable[..., EgressProxy], upstream: Callable[..., Upstream]
) -> None:
    server = upstream()
    proxy = proxy_factory("allowlist", (f"localhost:{server.port}",))
    first = f"GET http://localhost:{server.port}/a HTTP/1.1\r\n\r\n".encode()
    second = f"GET http://denied.example:{server.port}/b HTTP/1.1\r\n\r\n".encode()
    assert exchange(proxy, 3128, first + second) == b"pong"
    (got,) = server.received
    assert got.startswith(b"GET /a HTTP/1.1\r\n") and b"/b" not in got


@pytest.mark.parametrize("host", ["denied.example", "localhost:1", "x@localhost"])
def test_a_url_that_disagrees_with_its_host_header_is_400_on_3128(
    proxy_factory: Callable[..., EgressProxy], upstream: Callable[..., Upstream], host: str
) -> None:
    server = upstream()
    proxy = proxy_factory("allowlist", (f"localhost:{server.port}",))
    request = f"GET http://localhost:{server.port}/ HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    response = exchange(proxy, 3128, request)
    assert status(response) == 400 and b"Host header differ" in response
    assert server.received == []


def test_an_absolute_url_on_the_transparent_port_must_match_the_host_header(
    proxy_factory: Callable[..., EgressProxy], upstream: Callable[..., Upstream]
) -> None:
    # The upstream routes by the URL: deciding by the Host header alone let
    # a denied virtual host on an allowed address through.
    server = upstream()
    proxy = proxy_factory("allowlist", (f"localhost:{server.port}",))
    bad = b"GET http://denied.example/ HTTP/1.1\r\nHost: localhost\r\n\r\n"
    assert status(exchange(proxy, server.port, bad)) == 400
    good = b"GET http://localhost/ HTTP/1.1\r\nHost: localhost\r\n\r\n"
    assert exchange(proxy, server.port, good) == b"pong"
    assert len(server.received) == 1


@pytest.mark.parametrize(
    "hosts",
    [b"Host: localhost\r\nHost: internal.example\r\n", b"Host: localhost\r\nhost: localhost\r\n"],
)
def test_a_second_host_header_never_reaches_the_upstream(
    proxy_factory: Callable[..., EgressProxy], upstream: Callable[..., Upstream], hosts: bytes
) -> None:
    # The proxy decides by the first Host header; an upstream that routes by
    # the last (Twisted's NameVirtualHost does) would serve another virtual
    # host on the allowed address.  RFC 9112 3.2: more than one Host is a 400.
    server = upstream()
    proxy = proxy_factory("allowlist", (f"localhost:{server.port}",))
    response = exchange(proxy, server.port, b"GET / HTTP/1.1\r\n" + hosts + b"\r\n")
    assert status(response) == 400 and b"exactly one Host header" in response
    assert server.received == []
    assert "(a request needs exactly one Host header)" in wait_for_log(proxy, "deny")


@pytest.mark.parametrize("mode", ["allowlist", "open"])
def test_a_connect_tunnel_to_the_http_port_carries_one_request_for_its_own_host(
    proxy_factory: Callable[..., EgressProxy],
    upstream: Callable[..., Upstream],
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
) -> None:
    # Spliced, a tunnel to an allowed name's port 80 carried any request
    # after the first, for any virtual host on that address (the name
    # "internal.example" resolves nowhere: only its server knows it).
    server = upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    # Port 80 itself needs privileges: the web's HTTP port is the upstream's here.
    monkeypatch.setattr("microvm_run.netpolicy.HTTP_PORT", server.port)
    proxy = proxy_factory(mode, ("localhost",) if mode == "allowlist" else ())
    if mode == "open":  # loopback stands for a public address
        monkeypatch.setattr("microvm_run.netpolicy.public_address", lambda address: True)
        monkeypatch.setattr("microvm_run.egress._local_address", lambda address: False)
        monkeypatch.setattr("microvm_run.egress._to_self", lambda writer: False)
    tunnel = f"CONNECT localhost:{server.port} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()
    established = b"HTTP/1.1 200 Connection established\r\n\r\n"
    first = b"GET /a HTTP/1.1\r\nHost: localhost\r\n\r\n"
    second = b"GET /b HTTP/1.1\r\nHost: internal.example\r\n\r\n"
    assert exchange(proxy, 3128, tunnel + first + second) == established + server.reply
    forwarded = [first[:-2] + b"Connection: close\r\n\r\n"]
    assert server.received == forwarded
    for request in (second, b"GET http://internal.example/ HTTP/1.1\r\nHost: localhost\r\n\r\n",
                    first.replace(b"\r\n\r\n", b"\r\nHost: internal.example\r\n\r\n")):  # fmt: skip
        response = exchange(proxy, 3128, tunnel + request)
        assert response.startswith(established + b"HTTP/1.1 400 ")
    # Not HTTP at all (e.g. a leading empty line, which servers skip): closed.
    assert exchange(proxy, 3128, tunnel + b"\r\n" + second) == established
    # The refused tunnels' upstream connections were opened (before the 200)
    # and closed with nothing sent.
    assert [got for got in server.received if got] == forwarded


def test_a_chunked_body_is_forwarded_whole_and_what_follows_it_is_not(
    proxy_factory: Callable[..., EgressProxy], upstream: Callable[..., Upstream]
) -> None:
    server = upstream()
    proxy = proxy_factory("allowlist", (f"localhost:{server.port}",))
    head = b"POST /up HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
    body = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"
    smuggled = b"GET /secret HTTP/1.1\r\nHost: denied.example\r\n\r\n"
    with connect(proxy, server.port) as sock:
        sock.sendall(head + body[:9])
        time.sleep(0.05)  # the body in pieces, as a slow client sends it
        sock.sendall(body[9:] + smuggled)
        sock.shutdown(socket.SHUT_WR)
        assert read_all(sock) == b"pong"
    (got,) = server.received
    assert got.endswith(b"\r\n\r\n" + body) and b"secret" not in got


@pytest.mark.parametrize(
    "headers",
    [
        b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n",
        b"Content-Length: 3\r\nContent-Length: 4\r\n",
        b"Content-Length: +3\r\n",
        b"Transfer-Encoding: gzip, chunked\r\n",
        b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
    ],
)
def test_ambiguous_body_lengths_are_refused(
    proxy_factory: Callable[..., EgressProxy], upstream: Callable[..., Upstream], headers: bytes
) -> None:
    server = upstream()
    proxy = proxy_factory("allowlist", (f"localhost:{server.port}",))
    request = b"POST / HTTP/1.1\r\nHost: localhost\r\n" + headers + b"\r\nabc"
    assert status(exchange(proxy, server.port, request)) == 400
    assert status(exchange(proxy, 3128, request.replace(b"/", b"http://localhost/", 1))) == 400
    assert server.received == []


@pytest.mark.parametrize(
    "target", [b"http://[::1/", b"http://[x]:80/", b"http://localhost:99999/", b"http://%zz/"]
)
def test_a_malformed_absolute_url_on_3128_is_one_400_and_no_traceback(
    proxy_factory: Callable[..., EgressProxy],
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
    target: bytes,
) -> None:
    proxy = proxy_factory("open")
    response = exchange(proxy, 3128, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status(response) == 400 and response.count(b"HTTP/1.1") == 1
    proxy.stop()
    assert [r for r in caplog.records if r.name == "asyncio"] == []
    assert "Traceback" not in capfd.readouterr().err


# -- the key route: the agent's API only, and never the key back ---------------------


def test_trace_on_the_key_route_is_refused_before_the_upstream(
    proxy_factory: Callable[..., EgressProxy], upstream: Callable[..., Upstream]
) -> None:
    bearer, x_api = upstream(), upstream(echo=True)
    proxy = proxy_factory("allowlist", (), key_routes(bearer, x_api), KEYS)
    response = exchange(
        proxy, 4180, b"TRACE /anthropic-api-key/v1/messages HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    assert status(response) == 405
    assert b"sk-ant" not in response
    assert x_api.received == []
    assert "method TRACE" in wait_for_log(proxy, "deny")


def test_a_reflecting_upstream_never_hands_the_key_back(
    proxy_factory: Callable[..., EgressProxy], upstream: Callable[..., Upstream]
) -> None:
    # An upstream (or a path on it) that echoes the request: the proxy
    # cuts the response off before the bytes of the key reach the guest.
    bearer, x_api = upstream(), upstream(echo=True)
    proxy = proxy_factory("allowlist", (), key_routes(bearer, x_api), KEYS)
    request = (
        b"POST /anthropic-api-key/v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
    )
    with connect(proxy, 4180) as sock:
        sock.sendall(request)
        with contextlib.suppress(ConnectionResetError):
            response = read_all(sock)
    assert b"sk-ant-real-5678"[:4] not in response.replace(b"sk-ant-real", b"")
    assert b"real-5678" not in response and b"x-api-key" not in response.lower()
    assert "the response contained the key" in wait_for_log(proxy, "contained")


@pytest.mark.parametrize("target", [b"/anthropic-api-key/admin", b"/anthropic-api-key/v1/../x",
                                    b"/anthropic-api-key/v1/%2e%2e/x"])  # fmt: skip
def test_the_key_route_refuses_paths_outside_the_api(
    proxy_factory: Callable[..., EgressProxy], upstream: Callable[..., Upstream], target: bytes
) -> None:
    bearer, x_api = upstream(), upstream()
    proxy = proxy_factory("allowlist", (), key_routes(bearer, x_api), KEYS)
    response = exchange(proxy, 4180, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status(response) == 403
    assert x_api.received == []


def test_a_pipelined_second_request_on_the_key_route_gets_no_key(
    proxy_factory: Callable[..., EgressProxy], upstream: Callable[..., Upstream]
) -> None:
    bearer, x_api = upstream(), upstream(b"HTTP/1.1 200 OK\r\n\r\n")
    proxy = proxy_factory("allowlist", (), key_routes(bearer, x_api), KEYS)
    first = b"GET /anthropic-api-key/v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
    second = b"TRACE /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
    assert exchange(proxy, 4180, first + second) == x_api.reply
    (got,) = x_api.received
    assert b"TRACE" not in got


# -- bounded: connections, log lines, names; escaped: what the guest chose ------------


def test_connections_beyond_the_cap_are_closed_at_once_and_counted(
    proxy_factory: Callable[..., EgressProxy], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("microvm_run.egress.MAX_CONNECTIONS", 4)
    proxy = proxy_factory("open")
    held = [connect(proxy, 443) for _ in range(4)]
    time.sleep(0.2)
    with connect(proxy, 443) as extra:
        assert read_all(extra) == b""  # closed by the proxy, not left waiting
    assert "deny too-many-connections:0 via relay (over 4 at once)" in wait_for_log(proxy, "over 4")
    for sock in held:
        sock.close()
    time.sleep(0.2)
    (answer,) = dns_exchange(proxy, [dns_message("a.example")])  # room again
    assert parse_answer(answer)["rcode"] == 0


def test_guest_chosen_names_are_escaped_in_the_log_and_the_summary(
    proxy_factory: Callable[..., EgressProxy],
) -> None:
    proxy = proxy_factory("allowlist", ("ok.example",))
    dns_exchange(proxy, [dns_message("\x1b[2J\x1b]0;pwned\x07.example")])
    exchange(proxy, 80, b"GET / HTTP/1.1\r\nHost: evil\x1b[31m.example\r\n\r\n")
    text = wait_for_log(proxy, "evil")
    assert "\x1b" not in text and "\x07" not in text
    assert "\\x1b[2j\\x1b]0;pwned\\x07.example:53" in text
    assert "evil\\x1b[31m.example:80" in text
    assert len(text.splitlines()) == 2
    summary = proxy.summary()
    assert summary is not None and "\x1b" not in summary and "\\x1b[31m" in summary


# -- whole downloads: no task lost to the garbage collector -------------------------


class BigUpstream(LocalServer):
    """Serves ``size`` bytes after any request head, in uneven, paced pieces."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.payload = bytes(range(256)) * (size // 256)

        class Handler(socketserver.BaseRequestHandler):
            def handle(inner) -> None:
                sock = inner.request
                data = b""
                while b"\r\n\r\n" not in data and (chunk := sock.recv(4096)):
                    data += chunk
                if data.startswith(b"CONNECT") or not data.startswith((b"GET", b"\x16")):
                    pass
                header = f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n\r\n".encode()
                sock.sendall(header)
                view = memoryview(self.payload)
                pos, step = 0, 1
                while pos < len(view):
                    end = min(pos + 4096 * step, len(view))
                    sock.sendall(view[pos:end])
                    pos, step = end, step % 37 + 1
                    if step == 1:
                        time.sleep(0.001)  # slower than the guest now and then
                sock.close()

        self.serve(Handler)


def test_many_large_downloads_lose_no_bytes_under_garbage_collection(
    proxy_factory: Callable[..., EgressProxy],
) -> None:
    import gc  # noqa: PLC0415 - only this test drives the collector

    size = 8 * 1024 * 1024
    big = BigUpstream(size)
    proxy = proxy_factory("allowlist", (f"localhost:{big.port}",))
    stop = threading.Event()

    def collect() -> None:  # what a busy runner's allocations do, often
        while not stop.is_set():
            gc.collect()
            time.sleep(0.002)

    collector = threading.Thread(target=collect, daemon=True)
    collector.start()
    results: list[int] = []

    def download(way: str) -> None:
        with connect(proxy, 3128 if way == "connect" else big.port) as sock:
            if way == "connect":
                sock.sendall(f"CONNECT localhost:{big.port} HTTP/1.1\r\n\r\n".encode())
                assert sock.recv(39).startswith(b"HTTP/1.1 200")
            sock.sendall(b"GET /big HTTP/1.1\r\nHost: localhost\r\n\r\n")
            sock.shutdown(socket.SHUT_WR)  # the client is done talking
            data = read_all(sock)
        body = data.partition(b"\r\n\r\n")[2]
        results.append(len(body) if body == big.payload else -len(body))

    try:
        for _ in range(3):
            threads = [
                threading.Thread(target=download, args=(way,), daemon=True)
                for way in ("http", "connect", "http", "connect")
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
    finally:
        stop.set()
        collector.join()
        big.close()
    assert results == [size] * 12


def test_key_proxy_never_replaces_the_guests_own_oauth_bearer(
    proxy_factory: Callable[..., EgressProxy], upstream: Callable[..., Upstream]
) -> None:
    """A subscription login's bearer goes up as it is; the API key is not added."""
    bearer, x_api = upstream(), upstream(b"HTTP/1.1 200 OK\r\n\r\n")
    proxy = proxy_factory("allowlist", (), key_routes(bearer, x_api), KEYS)
    request = (
        b"POST /anthropic-api-key/v1/messages HTTP/1.1\r\nHost: 10.0.2.100:4180\r\n"
        b"Authorization: Bearer sk-ant-oat01-the-users-login\r\n"
        b"Content-Length: 2\r\n\r\n{}"
    )
    assert exchange(proxy, 4180, request) == x_api.reply
    (got,) = x_api.received
    _, headers, _ = _headers(got)
    assert ("authorization", "Bearer sk-ant-oat01-the-users-login") in headers
    assert b"sk-ant-real-5678" not in got
    assert [k for k, _ in headers if k == "x-api-key"] == []
    assert "(the guest's own credentials)" in wait_for_log(proxy, "own credentials")


def test_key_proxy_replaces_placeholders_in_every_credential_header(
    proxy_factory: Callable[..., EgressProxy], upstream: Callable[..., Upstream]
) -> None:
    bearer, x_api = upstream(b"HTTP/1.1 200 OK\r\n\r\n"), upstream()
    proxy = proxy_factory("allowlist", (), key_routes(bearer, x_api), KEYS)
    for credential in (b"", b"Authorization: Bearer microvm-run-placeholder\r\n"):
        request = (
            b"POST /openai-api-key/responses HTTP/1.1\r\nHost: x\r\n"
            + credential
            + b"Content-Length: 0\r\n\r\n"
        )
        assert exchange(proxy, 4180, request) == bearer.reply
    for got in bearer.received:
        _, headers, _ = _headers(got)
        assert [v for k, v in headers if k == "authorization"] == ["Bearer sk-real-openai-1234"]


class WebSocketUpstream(LocalServer):
    """Answers a WebSocket handshake with 101, then echoes bytes and records them."""

    def __init__(self, status: bytes = b"101 Switching Protocols") -> None:
        self.heads: list[bytes] = []
        self.after: list[bytes] = []
        owner = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                self.request.settimeout(TIMEOUT_S)
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = self.request.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                head, _, rest = data.partition(b"\r\n\r\n")
                owner.heads.append(head)
                if not status.startswith(b"101"):
                    body = b"no websockets here"
                    self.request.sendall(
                        b"HTTP/1.1 " + status + b"\r\nContent-Length: "
                        + str(len(body)).encode() + b"\r\n\r\n" + body
                    )  # fmt: skip
                    with contextlib.suppress(OSError):
                        owner.after.append(self.request.recv(65536))
                    return
                self.request.sendall(
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                    b"Connection: Upgrade\r\nSec-WebSocket-Accept: x\r\n\r\n"
                )
                with contextlib.suppress(OSError):
                    if rest:
                        owner.after.append(rest)
                        self.request.sendall(b"echo:" + rest)
                    while chunk := self.request.recv(65536):
                        owner.after.append(chunk)
                        self.request.sendall(b"echo:" + chunk)

        self.serve(Handler)


def _ws_route(ws: WebSocketUpstream | ScriptedUpstream) -> KeyRoute:
    upstream = f"http://127.0.0.1:{ws.port}/v1"
    return KeyRoute("openai-api-key", "OPENAI_API_KEY", upstream, "authorization")


HANDSHAKE = (
    b"GET /openai-api-key/responses HTTP/1.1\r\nHost: 10.0.2.100:4180\r\n"
    b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Authorization: Bearer microvm-run-placeholder\r\n\r\n"
)


def test_key_proxy_carries_a_websocket_upgrade_both_ways_with_the_key(
    proxy_factory: Callable[..., EgressProxy],
) -> None:
    ws = WebSocketUpstream()
    try:
        route = _ws_route(ws)
        proxy = proxy_factory("allowlist", (), (route,), KEYS)
        with connect(proxy, 4180) as sock:
            sock.sendall(HANDSHAKE)
            answer = b""
            while b"\r\n\r\n" not in answer:
                answer += sock.recv(65536)
            assert answer.startswith(b"HTTP/1.1 101 ")
            for frame in (b"\x81\x05hello", b"\x81\x05again"):
                sock.sendall(frame)
                got = b""
                while not got.endswith(frame):
                    chunk = sock.recv(65536)
                    assert chunk, "the upstream's answer never came back"
                    got += chunk
                assert got == b"echo:" + frame
        (head,) = ws.heads
        first, headers, _ = _headers(head + b"\r\n\r\n")
        assert first == "GET /v1/responses HTTP/1.1"
        assert ("authorization", "Bearer sk-real-openai-1234") in headers
        assert ("upgrade", "websocket") in headers and ("connection", "Upgrade") in headers
        assert ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==") in headers
        assert b"placeholder" not in head
        assert b"".join(ws.after) == b"\x81\x05hello\x81\x05again"
    finally:
        ws.close()


def test_a_refused_websocket_upgrade_is_one_response_and_nothing_after_it(
    proxy_factory: Callable[..., EgressProxy],
) -> None:
    ws = WebSocketUpstream(b"404 Not Found")
    try:
        route = _ws_route(ws)
        proxy = proxy_factory("allowlist", (), (route,), KEYS)
        smuggled = b"TRACE /v1/other HTTP/1.1\r\nHost: x\r\n\r\n"
        response = exchange(proxy, 4180, HANDSHAKE + smuggled)
        assert status(response) == 404
        assert response.endswith(b"no websockets here")
        assert b"TRACE" not in b"".join(ws.after)
    finally:
        ws.close()


class ScriptedUpstream(LocalServer):
    """Reads one request head, then answers with ``answer(head, connection)``."""

    def __init__(self, answer: Callable[[bytes, socket.socket], None]) -> None:
        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                self.request.settimeout(TIMEOUT_S)
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = self.request.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                with contextlib.suppress(OSError):
                    answer(data.partition(b"\r\n\r\n")[0], self.request)

        self.serve(Handler)


def test_a_refused_websocket_upgrade_that_reflects_the_key_in_pieces_is_cut_off(
    proxy_factory: Callable[..., EgressProxy],
) -> None:
    # An upstream that refuses the handshake with the request in its error
    # body, the key split over two reads (as a TLS record boundary splits
    # it; the guest chooses the padding that puts it there).
    key = KEYS["OPENAI_API_KEY"].encode()

    def reflect_in_pieces(head: bytes, conn: socket.socket) -> None:
        body = b"bad handshake: " + head
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: %d\r\n\r\n" % len(body))
        cut = body.index(key) + 5
        conn.sendall(body[:cut])
        time.sleep(0.2)
        conn.sendall(body[cut:])
        time.sleep(0.5)  # a keep-alive upstream: no close after the answer

    ws = ScriptedUpstream(reflect_in_pieces)
    try:
        proxy = proxy_factory("allowlist", (), (_ws_route(ws),), KEYS)
        with connect(proxy, 4180) as sock:
            sock.sendall(HANDSHAKE)
            response = b""
            with contextlib.suppress(ConnectionResetError):
                while chunk := sock.recv(65536):
                    response += chunk
        assert response.startswith(b"HTTP/1.1 400 ")
        assert key[:5] not in response
        assert "the response contained the key" in wait_for_log(proxy, "contained")
    finally:
        ws.close()


def test_a_refused_websocket_upgrade_waits_for_a_guest_that_does_not_read(
    proxy_factory: Callable[..., EgressProxy],
) -> None:
    # A large answer to a handshake (a file the agent uploaded, fetched with
    # Upgrade headers) must not pile up in the runner while the guest reads
    # nothing: the upstream is held back instead.
    total = 128 * 1024 * 1024
    sent = [0]

    def large(head: bytes, conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        block = b"x" * 65536
        for _ in range(total // len(block)):
            conn.sendall(block)
            sent[0] += len(block)

    ws = ScriptedUpstream(large)
    try:
        proxy = proxy_factory("allowlist", (), (_ws_route(ws),), KEYS)
        with connect(proxy, 4180) as sock:
            sock.sendall(HANDSHAKE)
            time.sleep(1.0)
            # What the kernel's socket buffers hold, not the whole answer.
            assert sent[0] < total // 2
            received = 0
            while chunk := sock.recv(1 << 20):
                received += len(chunk)
        assert received == total + len(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
    finally:
        ws.close()


def test_the_key_cut_off_holds_back_only_what_could_start_the_key(
    proxy_factory: Callable[..., EgressProxy],
) -> None:
    from microvm_run.egress import _secret_prefix_at_end  # noqa: PLC0415

    key = b"sk-real-openai-1234"
    assert _secret_prefix_at_end(b"data: hello\n\n", key) == 0
    assert _secret_prefix_at_end(b"data: sk-re", key) == len(b"sk-re")
    assert _secret_prefix_at_end(b"data: s", key) == 1
    assert _secret_prefix_at_end(key, key) == 0  # whole: the caller's `in` sees it


def test_a_key_echoed_by_the_upstream_is_cut_off(
    proxy_factory: Callable[..., EgressProxy], upstream: Callable[..., Upstream]
) -> None:
    echo = upstream(until_eof=True, echo=True)
    route = KeyRoute(
        "openai-api-key", "OPENAI_API_KEY", f"http://127.0.0.1:{echo.port}", "authorization"
    )
    proxy = proxy_factory("allowlist", (), (route,), KEYS)
    request = b"POST /openai-api-key/v1/x HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
    response = exchange(proxy, 4180, request)
    assert b"sk-real-openai" not in response
    assert b"sk-real-openai-1234" not in response
    assert "cut off" in wait_for_log(proxy, "cut off")


def test_the_key_proxy_asked_through_the_http_proxy_is_served_as_if_direct(
    proxy_factory: Callable[..., EgressProxy], upstream: Callable[..., Upstream]
) -> None:
    """A client that sends its base-URL request to HTTPS_PROXY despite NO_PROXY."""
    bearer, x_api = upstream(), upstream(b"HTTP/1.1 200 OK\r\n\r\n")
    proxy = proxy_factory("allowlist", (), key_routes(bearer, x_api), KEYS)
    request = (
        b"POST http://10.0.2.100:4180/anthropic-api-key/v1/messages HTTP/1.1\r\n"
        b"Host: 10.0.2.100:4180\r\nProxy-Connection: keep-alive\r\n"
        b"x-api-key: microvm-run-placeholder\r\nContent-Length: 2\r\n\r\n{}"
    )
    assert exchange(proxy, 3128, request) == x_api.reply
    (got,) = x_api.received
    first, headers, body = _headers(got)
    assert first == "POST /v1/messages HTTP/1.1"
    assert ("x-api-key", "sk-ant-real-5678") in headers
    assert body == b"{}"
    # Without key routes the same request is an ordinary, refused destination.
    plain = proxy_factory("allowlist", (), (), {}, socket_path=proxy.config.socket.with_name("b"))
    assert status(exchange(plain, 3128, request)) == 403


def test_a_connect_tunnel_to_the_key_proxy_goes_down_the_key_route(
    proxy_factory: Callable[..., EgressProxy], upstream: Callable[..., Upstream]
) -> None:
    bearer, x_api = upstream(), upstream(b"HTTP/1.1 200 OK\r\n\r\n")
    proxy = proxy_factory("allowlist", (), key_routes(bearer, x_api), KEYS)
    tunnel = b"CONNECT 10.0.2.100:4180 HTTP/1.1\r\nHost: 10.0.2.100:4180\r\n\r\n"
    request = (
        b"POST /anthropic-api-key/v1/messages HTTP/1.1\r\nHost: 10.0.2.100:4180\r\n"
        b"x-api-key: microvm-run-placeholder\r\nContent-Length: 2\r\n\r\n{}"
    )
    established = b"HTTP/1.1 200 Connection established\r\n\r\n"
    assert exchange(proxy, 3128, tunnel + request) == established + x_api.reply
    (got,) = x_api.received
    first, headers, _ = _headers(got)
    assert first == "POST /v1/messages HTTP/1.1"
    assert ("x-api-key", "sk-ant-real-5678") in headers
    # A tunnel elsewhere on the egress address is still refused.
    other = b"CONNECT 10.0.2.100:4181 HTTP/1.1\r\nHost: x\r\n\r\n"
    assert status(exchange(proxy, 3128, other)) == 403
