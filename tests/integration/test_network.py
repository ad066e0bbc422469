"""Network isolation with real traffic: the test guest, QEMU, the egress proxy.

Every target is on this machine: upstreams on 127.0.0.x under names that
scripts/setup-host put in /etc/hosts (allowed.amvm.test -> 127.0.0.2,
denied.amvm.test -> 127.0.0.3).  Clients in the guest are busybox nc and
wget: nc ignores proxy variables, so it shows the transparent path.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import socket
import socketserver
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import VM
from tests.support.prereq import require

ALLOWED = "allowed.amvm.test"
DENIED = "denied.amvm.test"
EGRESS = "10.0.2.100"


class Upstream:
    """A TCP server that records every connection's first bytes and answers."""

    def __init__(self, address: str, port: int = 0, *, reflect: bool = False) -> None:
        self.received: list[bytes] = []
        owner = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                self.request.settimeout(5)
                try:
                    data = self.request.recv(65536)
                except OSError:
                    data = b""
                owner.received.append(data)
                # reflect: what TRACE does, and any echo endpoint.
                body = data if reflect else b"answer from " + address.encode()
                self.request.sendall(b"HTTP/1.0 200 OK\r\nConnection: close\r\n\r\n" + body)

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self.server = socketserver.ThreadingTCPServer((address, port), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def upstreams() -> Iterator[dict[str, Upstream]]:
    for name, address in ((ALLOWED, "127.0.0.2"), (DENIED, "127.0.0.3")):
        try:
            resolved = socket.gethostbyname(name)
        except OSError:
            resolved = None
        require(resolved == address, f"{name} -> {address} in /etc/hosts (scripts/setup-host)")
    servers = {"loopback": Upstream("127.0.0.1")}
    # The same port on both names, so one allow rule with a port decides.
    servers[ALLOWED] = Upstream("127.0.0.2")
    servers[DENIED] = Upstream("127.0.0.3", servers[ALLOWED].port)
    yield servers
    for server in servers.values():
        server.close()


def _http(host: str, port: int) -> str:
    return shlex.quote(f"GET / HTTP/1.0\r\nHost: {host}:{port}\r\n\r\n")


def _egress_log(vm: VM, since: int = 0) -> str:
    """The test user's egress log (shared by all runs), from byte ``since`` on."""
    path = vm.user.home / ".local" / "state" / "microvm-run" / "egress.log"
    return path.read_bytes()[since:].decode("utf-8", "replace") if path.exists() else ""


def _egress_log_size(vm: VM) -> int:
    path = vm.user.home / ".local" / "state" / "microvm-run" / "egress.log"
    return path.stat().st_size if path.exists() else 0


def _client_hello(name: str) -> bytes:
    """A real TLS ClientHello naming ``name``, as any TLS client sends first."""
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


@pytest.mark.parametrize("mode", ["open", "allowlist"])
def test_the_hosts_loopback_is_unreachable(
    vm: VM, upstreams: dict[str, Upstream], mode: str
) -> None:
    loopback = upstreams["loopback"]
    work = vm.project()
    port = loopback.port
    script = "; ".join(
        [
            # Straight at the gateway, which plain user networking maps to 127.0.0.1.
            f"nc -w 3 10.0.2.2 {port} </dev/null > /work/gateway 2>&1; echo $? >> /work/gateway",
            # Through the proxy, naming the host's loopback.
            f"printf {_http('localhost', port)} | nc -w 5 {EGRESS} 80 > /work/by-name 2>&1",
            f"printf {_http('127.0.0.1', port)} | nc -w 5 {EGRESS} 80 > /work/by-ip 2>&1",
            # A port the proxy does not forward.
            f"nc -w 3 {EGRESS} {port} </dev/null > /work/other-port 2>&1; "
            "echo $? >> /work/other-port",
        ]
    )
    result = vm.run(work, script, "--net", mode)
    assert result.returncode == 0, result.stderr
    assert loopback.received == [], "the host's 127.0.0.1 listener was reached"
    assert (work / "gateway").read_text().strip().endswith("1")
    assert "403" in (work / "by-name").read_text()
    assert "403" in (work / "by-ip").read_text()
    assert (work / "other-port").read_text().strip().endswith("1")
    log = _egress_log(vm)
    assert "deny localhost:80 via http" in log
    assert "egress denied" in result.stderr


def test_allowlist_admits_the_listed_host_and_refuses_and_logs_the_other(
    vm: VM, upstreams: dict[str, Upstream]
) -> None:
    allowed, denied = upstreams[ALLOWED], upstreams[DENIED]
    port = allowed.port
    work = vm.project()
    (work / "hello-allowed").write_bytes(_client_hello(ALLOWED))
    (work / "hello-denied").write_bytes(_client_hello(DENIED))
    script = "; ".join(
        [
            # Raw TCP clients that know nothing of proxies: HTTP by Host ...
            f"printf {_http(ALLOWED, port)} | nc -w 5 {EGRESS} {port} > /work/http-allowed",
            f"printf {_http(DENIED, port)} | nc -w 5 {EGRESS} {port} > /work/http-denied",
            # ... and TLS by SNI (the upstream records the ClientHello bytes).
            f"nc -w 3 {EGRESS} {port} < /work/hello-allowed > /dev/null",
            f"nc -w 3 {EGRESS} {port} < /work/hello-denied > /dev/null",
            # A client that honours https_proxy: CONNECT on 3128.
            f"printf 'CONNECT {DENIED}:{port} HTTP/1.1\\r\\n\\r\\n' | "
            f"nc -w 5 {EGRESS} 3128 > /work/connect-denied",
            "true",
        ]
    )
    # The upstream is on the host's loopback: only --allow-private reaches it.
    result = vm.run(work, script, "--net", "allowlist", "--allow-private", f"{ALLOWED}:{port}")
    assert result.returncode == 0, result.stderr
    assert "answer from 127.0.0.2" in (work / "http-allowed").read_text()
    assert "403" in (work / "http-denied").read_text()
    assert "403" in (work / "connect-denied").read_text()
    assert denied.received == [], "a host not in the allowlist was reached"
    assert len(allowed.received) == 2
    assert allowed.received[1] == (work / "hello-allowed").read_bytes()
    log = _egress_log(vm)
    assert f"allow {ALLOWED}:{port} via http" in log
    assert f"allow {ALLOWED}:{port} via tls" in log
    for via in ("http", "tls", "connect"):
        assert f"deny {DENIED}:{port} via {via} (not in the allowlist)" in log
    assert f"{DENIED}:{port} (3x)" in result.stderr


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _listening_on(port: int) -> list[str]:
    """Local addresses listening on ``port`` (from /proc/net/tcp)."""
    found = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        address, port_hex = fields[1].split(":")
        if int(port_hex, 16) == port and fields[3] == "0A":  # LISTEN
            found.append(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return found


def test_a_published_port_reaches_a_guest_listener_on_127_0_0_1(vm: VM) -> None:
    work = vm.project()
    host_port = _free_port()
    (work / "reply").write_text("served by the guest\n")
    script = "touch /work/listening; nc -l -p 8000 < /work/reply > /work/request"
    running = vm.start(work, script, "-p", f"{host_port}:8000")
    try:
        reply = b""
        deadline = time.monotonic() + 120
        while b"served by the guest" not in reply:
            assert running.poll() is None, running.communicate()
            assert time.monotonic() < deadline, "the forwarded port never answered"
            if (work / "listening").exists():
                assert _listening_on(host_port) == ["127.0.0.1"]
                reply = _try_exchange(host_port)
            time.sleep(0.3)
        _, err = running.communicate(timeout=120)
    finally:
        if running.poll() is None:
            running.kill()
    assert running.returncode == 0, err
    assert (work / "request").read_text() == "hello guest\n"


def _try_exchange(port: int) -> bytes:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            conn.sendall(b"hello guest\n")
            conn.shutdown(socket.SHUT_WR)
            chunks = []
            while chunk := conn.recv(4096):
                chunks.append(chunk)
            return b"".join(chunks)
    except OSError:
        return b""


@pytest.fixture
def key_proxy_spec(vm: VM, upstreams: dict[str, Upstream]) -> Path:
    """The test guest's spec with a key proxy route to the allowed upstream."""
    port = upstreams[ALLOWED].port
    text = vm.spec.read_text().replace("spec_version = 1", "spec_version = 2")
    text += f"""
[network]
allow = ["{ALLOWED}:{port}"]

[[key_proxy]]
var = "TESTAGENT_API_KEY"
upstream = "http://{ALLOWED}:{port}/api"
header = "authorization"
base_url_var = "TESTAGENT_BASE_URL"
base_url_path = "/v1"
paths = ["/api/v1/"]
"""
    # Beside the original, whose relative kernel/initrd paths it shares.
    path = vm.spec.with_name(f"spec-key-proxy-{os.urandom(3).hex()}.toml")
    path.write_text(text)
    path.chmod(0o644)
    return path


def test_an_injected_key_reaches_the_upstream_and_nothing_else(
    vm: VM, upstreams: dict[str, Upstream], key_proxy_spec: Path
) -> None:
    canary = "canary-" + os.urandom(8).hex()
    vm.spec = key_proxy_spec
    work = vm.project()
    script = "; ".join(
        [
            "cat /proc/cmdline > /work/guest-cmdline",
            "env > /work/guest-env",
            "cat /proc/1/environ /proc/self/environ > /work/guest-proc-environ 2>/dev/null",
            # The agent uses the key it was given, as an SDK would.
            'wget -Y off -q -O /work/answer --header "Authorization: Bearer '
            '$TESTAGENT_API_KEY" "$TESTAGENT_BASE_URL/messages"',
            "touch /work/asked",
            # Stay up while the host is searched.
            "while [ ! -e /work/done ]; do sleep 0.2; done",
        ]
    )
    running = vm.start(work, script, "--net", "allowlist", TESTAGENT_API_KEY=canary)
    found: list[str] = []
    try:
        deadline = time.monotonic() + 120
        while not (work / "asked").exists():
            assert running.poll() is None, running.communicate()
            assert time.monotonic() < deadline, "the guest never made its request"
            time.sleep(0.3)
        found += _search_processes(canary, exclude={running.pid, os.getpid()})
        runtime = vm.runtime_dir / "microvm-run" if vm.runtime_dir else None
        assert runtime is not None and any(runtime.iterdir()), "no runtime dir while running"
        found += _search_tree(runtime, canary)
        (work / "done").touch()
        _, err = running.communicate(timeout=120)
    finally:
        if running.poll() is None:
            running.kill()
    assert running.returncode == 0, err
    assert "answer from 127.0.0.2" in (work / "answer").read_text()
    sent = upstreams[ALLOWED].received
    assert len(sent) == 1
    assert f"Authorization: Bearer {canary}".encode() in sent[0]
    assert sent[0].startswith(b"GET /api/v1/messages HTTP/1.1")
    env = (work / "guest-env").read_text()
    assert "TESTAGENT_API_KEY=microvm-run-placeholder" in env
    found += _search_tree(vm.agent_home(work), canary)
    found += _search_tree(work, canary)  # guest cmdline, env and /proc environ
    log = vm.user.home / ".local" / "state" / "microvm-run" / "egress.log"
    if log.exists() and canary in log.read_text():
        found.append(str(log))
    assert found == [], f"the key was found in: {found}"


def _search_processes(canary: str, exclude: set[int]) -> list[str]:
    """Every process's argv and environment, except the runner and this test.

    The runner itself holds the key: the user's shell gave it in its
    environment, and it is the one process that must read it.
    """
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        if int(proc.name) in exclude:
            continue
        for part in ("cmdline", "environ"):
            try:
                if canary.encode() in (proc / part).read_bytes():
                    found.append(f"{proc}/{part}")
            except OSError:
                pass
    return found


def _search_tree(root: Path, canary: str) -> list[str]:
    found = []
    for path in root.rglob("*"):
        try:
            if path.is_file() and not path.is_socket() and canary.encode() in path.read_bytes():
                found.append(str(path))
        except OSError:
            pass
    return found


# -- #11: what an agent tried from inside the guest, and what the host saw -------------


def _dns_query(name: bytes, ident: int) -> bytes:
    """One DNS-over-TCP query for ``name`` (any bytes), as a raw client sends it."""
    labels = b"".join(bytes([len(part)]) + part for part in name.split(b".") if part)
    message = struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0) + labels + b"\0\0\1\0\1"
    return struct.pack("!H", len(message)) + message


def test_allowlisted_names_that_resolve_inward_are_refused_and_guest_names_are_escaped(
    vm: VM, upstreams: dict[str, Upstream]
) -> None:
    # The rule names the host, but its address is the host's loopback, as a
    # wildcard, a split-horizon resolver or a rebinding attack would make it.
    allowed = upstreams[ALLOWED]
    port = allowed.port
    work = vm.project()
    flood = b"".join(_dns_query(b"n%d.flood.example" % i, i) for i in range(3000))
    forged = b"x\n2026-01-01T00:00:00 forged allow evil.example:443 via tls\x1b[2J\x1b]0;pwned\x07"
    (work / "queries").write_bytes(_dns_query(forged, 1) + flood)
    script = "; ".join(
        [
            f"printf {_http(ALLOWED, port)} | nc -w 5 {EGRESS} {port} > /work/by-rule",
            f"printf {_http('x.amvm.test', port)} | nc -w 5 {EGRESS} {port} > /work/by-wildcard",
            f"printf 'CONNECT {ALLOWED}:{port} HTTP/1.1\\r\\n\\r\\n' | "
            f"nc -w 5 {EGRESS} 3128 > /work/by-connect",
            # #15: a malformed absolute URL on the proxy port.
            f"printf 'GET http://[::1/ HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n' | "
            f"nc -w 5 {EGRESS} 3128 > /work/malformed",
            # #11 escapes 11 and 14: a name that forges a log line and
            # drives the terminal, then thousands of names.
            f"nc -w 5 {EGRESS} 53 < /work/queries > /dev/null",
            "true",
        ]
    )
    before = _egress_log_size(vm)
    result = vm.run(
        work, script, "--net", "allowlist",
        "--allow", f"{ALLOWED}:{port}", "--allow", f"*.amvm.test:{port}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert allowed.received == [] and upstreams[DENIED].received == []
    for name in ("by-rule", "by-connect"):
        assert "403" in (work / name).read_text() and "non-public" in (work / name).read_text()
    assert "403" in (work / "by-wildcard").read_text()  # x.amvm.test does not resolve
    malformed = (work / "malformed").read_text()
    assert malformed.startswith("HTTP/1.1 400") and malformed.count("HTTP/1.1") == 1
    assert "Traceback" not in result.stderr
    log = _egress_log(vm, before)
    assert f"deny {ALLOWED}:{port} via http (resolves to non-public address 127.0.0.2)" in log
    # One line per decision, none forged, nothing for a terminal to act on.
    assert "\x1b" not in log and "\x07" not in log
    assert not any(line.split(" ", 1)[-1].startswith("forged") for line in log.splitlines())
    assert "x\\x0a2026-01-01t00:00:00\\x20forged" in log
    assert len(log.splitlines()) < 1500, "the log grew with the guest's names"
    assert "decision(s) not logged (rate limit)" in log
    assert "\x1b" not in result.stderr and "\\x1b[2j" in result.stderr
    assert "egress denied" in result.stderr and "to further names" in result.stderr


def test_one_request_per_decision_on_plain_http(vm: VM, upstreams: dict[str, Upstream]) -> None:
    allowed = upstreams[ALLOWED]
    port = allowed.port
    work = vm.project()
    pipelined = (
        f"GET /a HTTP/1.1\r\nHost: {ALLOWED}\r\n\r\nGET /b HTTP/1.1\r\nHost: {DENIED}\r\n\r\n"
    )
    twice = (
        f"GET http://{ALLOWED}:{port}/c HTTP/1.1\r\n\r\n"
        f"GET http://{DENIED}:{port}/d HTTP/1.1\r\n\r\n"
    )
    mismatch = f"GET http://{ALLOWED}:{port}/e HTTP/1.1\r\nHost: {DENIED}:{port}\r\n\r\n"
    script = "; ".join(
        [
            f"printf {shlex.quote(pipelined)} | nc -w 5 {EGRESS} {port} > /work/pipelined",
            f"printf {shlex.quote(twice)} | nc -w 5 {EGRESS} 3128 > /work/twice",
            f"printf {shlex.quote(mismatch)} | nc -w 5 {EGRESS} 3128 > /work/mismatch",
            "true",
        ]
    )
    result = vm.run(work, script, "--net", "allowlist", "--allow-private", f"{ALLOWED}:{port}")
    assert result.returncode == 0, result.stderr
    assert "answer from 127.0.0.2" in (work / "pipelined").read_text()
    assert "answer from 127.0.0.2" in (work / "twice").read_text()
    assert (work / "mismatch").read_text().startswith("HTTP/1.1 400")
    # Each connection brought one request to the upstream, and no more.
    assert sorted(r.split(b" ", 2)[1] for r in allowed.received) == [b"/a", b"/c"]
    assert not any(DENIED.encode() in r for r in allowed.received)
    assert upstreams[DENIED].received == []


def test_no_other_virtual_host_on_port_80_through_a_tunnel_or_a_second_host_header(
    vm: VM,
) -> None:
    # The allowed name's port 80: through CONNECT (spliced, it carried any
    # request after the first) and with two Host headers (the proxy read the
    # first; a server that takes the last routes by one the policy never saw).
    try:
        allowed = Upstream("127.0.0.2", 80)
    except OSError as err:  # port 80 needs root, as `make setup` runs these
        pytest.fail(f"cannot listen on 127.0.0.2:80: {err}")
    try:
        work = vm.project()
        first = f"GET /a HTTP/1.1\r\nHost: {ALLOWED}\r\n\r\n"
        other = f"GET /b HTTP/1.1\r\nHost: {DENIED}\r\n\r\n"
        tunnel = f"CONNECT {ALLOWED}:80 HTTP/1.1\r\nHost: {ALLOWED}:80\r\n\r\n"
        two_hosts = f"GET /c HTTP/1.1\r\nHost: {ALLOWED}\r\nHost: {DENIED}\r\n\r\n"
        script = "; ".join(
            [
                f"printf {shlex.quote(tunnel + first + other)} | nc -w 5 {EGRESS} 3128 "
                "> /work/pipelined",
                f"printf {shlex.quote(tunnel + other)} | nc -w 5 {EGRESS} 3128 > /work/other",
                f"printf {shlex.quote(two_hosts)} | nc -w 5 {EGRESS} 80 > /work/two-hosts",
                "true",
            ]
        )
        result = vm.run(work, script, "--net", "allowlist", "--allow-private", ALLOWED)
        assert result.returncode == 0, result.stderr
        pipelined = (work / "pipelined").read_text()
        assert pipelined.startswith("HTTP/1.1 200 Connection established")
        assert pipelined.count("answer from 127.0.0.2") == 1
        assert "HTTP/1.1 400" in (work / "other").read_text()
        assert (work / "two-hosts").read_text().startswith("HTTP/1.1 400")
        # The upstream saw the one request for its own name, and nothing else.
        assert [r.split(b"\r\n", 1)[0] for r in allowed.received if r] == [b"GET /a HTTP/1.1"]
        assert not any(DENIED.encode() in r for r in allowed.received)
    finally:
        allowed.close()


@pytest.fixture
def reflecting_spec(vm: VM) -> Iterator[tuple[Path, Upstream]]:
    """The test guest's spec with a key route to an upstream that echoes each request."""
    reflector = Upstream("127.0.0.1", reflect=True)
    text = vm.spec.read_text().replace("spec_version = 1", "spec_version = 2")
    text += f"""
[[key_proxy]]
var = "TESTAGENT_API_KEY"
upstream = "http://127.0.0.1:{reflector.port}"
header = "x-api-key"
base_url_var = "TESTAGENT_BASE_URL"
"""
    path = vm.spec.with_name(f"spec-reflect-{os.urandom(3).hex()}.toml")
    path.write_text(text)
    path.chmod(0o644)
    yield path, reflector
    reflector.close()


def test_the_key_route_takes_only_the_apis_calls_and_never_returns_the_key(
    vm: VM, reflecting_spec: tuple[Path, Upstream]
) -> None:
    vm.spec, reflector = reflecting_spec
    canary = "canary-" + os.urandom(8).hex()
    work = vm.project()
    base = f"{EGRESS} 4180"
    script = "; ".join(
        [
            # TRACE reflects the request, the injected key with it.
            f"printf 'TRACE /testagent-api-key/v1/x HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n' | "
            f"nc -w 5 {base} > /work/trace",
            # A path the API does not have, in two spellings.
            f"printf 'GET /testagent-api-key/admin HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n' | "
            f"nc -w 5 {base} > /work/outside",
            "printf 'GET /testagent-api-key/v1/%%2e%%2e/admin HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n' "
            f"| nc -w 5 {base} > /work/dotdot",
            # An allowed call whose answer echoes the request: cut off.
            f"printf 'POST /testagent-api-key/v1/messages HTTP/1.1\\r\\nHost: x\\r\\n"
            f"Content-Length: 2\\r\\n\\r\\n{{}}' | nc -w 5 {base} > /work/echo",
            "true",
        ]
    )
    result = vm.run(work, script, "--net", "allowlist", TESTAGENT_API_KEY=canary)
    assert result.returncode == 0, result.stderr
    assert (work / "trace").read_text().startswith("HTTP/1.1 405")
    assert (work / "outside").read_text().startswith("HTTP/1.1 403")
    assert (work / "dotdot").read_text().startswith("HTTP/1.1 403")
    # Only the POST reached the upstream, and the guest got none of the key back.
    assert [r.split(b" ", 1)[0] for r in reflector.received] == [b"POST"]
    assert canary.encode() in reflector.received[0]
    for name in ("trace", "outside", "dotdot", "echo"):
        assert canary[len("canary-") :][:6] not in (work / name).read_text()
    assert "the response contained the key" in _egress_log(vm)


def test_idle_guest_connections_cost_no_host_process(
    vm: VM, upstreams: dict[str, Upstream]
) -> None:
    # 150 connections the guest opens and leaves open: each used to keep a
    # relay.py process (about 6 MiB) on the host.
    work = vm.project()
    script = "; ".join(
        [
            "i=0; while [ $i -lt 150 ]; do "
            f"(sleep 600 | nc {EGRESS} 443 > /dev/null 2>&1 &); i=$((i + 1)); done",
            "sleep 3; touch /work/opened",
            "while [ ! -e /work/done ]; do sleep 0.2; done",
        ]
    )
    running = vm.start(work, script, "--net", "open")
    stragglers: list[str] = []
    try:
        deadline = time.monotonic() + 180
        while not (work / "opened").exists():
            assert running.poll() is None, running.communicate()
            assert time.monotonic() < deadline, "the guest never opened its connections"
            time.sleep(0.3)
        # Each relay lives for its hand-over only; a straggler may still be
        # starting (TCG, a loaded machine), none stays.  (Well within the
        # proxy's 30 s wait for a first byte, which would close them all.)
        deadline = time.monotonic() + 10
        while (relays := _processes_running("relay.py", vm.user.uid)) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.5)
        stragglers = [_describe(pid) for pid in relays]
        held = _sockets_held(running.pid)
        (work / "done").touch()
        _, err = running.communicate(timeout=120)
    finally:
        if running.poll() is None:
            running.kill()
    assert running.returncode == 0, err
    assert stragglers == [], f"relay processes still running: {stragglers}"
    assert held >= 140, f"only {held} guest connections reached the proxy"


def _processes_running(script: str, uid: int) -> list[int]:
    """The test user's processes with ``script`` as an argument of its own (not QEMU)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if proc.stat().st_uid == uid and any(a.endswith(script.encode()) for a in argv):
                found.append(int(proc.name))
        except OSError:
            pass
    return found


def _describe(pid: int) -> str:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
        wchan = Path(f"/proc/{pid}/wchan").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return f"{pid} (gone)"
    return f"{pid} {state} {wchan} {cmdline}"


def _sockets_held(pid: int) -> int:
    """Sockets the runner holds: the guest connections its egress proxy serves."""
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            count += os.readlink(fd).startswith("socket:")
    return count
