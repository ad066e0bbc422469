"""Network isolation with real traffic: the test guest, QEMU, the egress proxy.

Every target is on this machine: upstreams on 127.0.0.x under names that
scripts/setup-host put in /etc/hosts (allowed.amvm.test -> 127.0.0.2,
denied.amvm.test -> 127.0.0.3).  Clients in the guest are busybox nc and
wget: nc ignores proxy variables, so it shows the transparent path.
"""

from __future__ import annotations

import os
import shlex
import socket
import socketserver
import ssl
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

    def __init__(self, address: str, port: int = 0) -> None:
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
                self.request.sendall(
                    b"HTTP/1.0 200 OK\r\nConnection: close\r\n\r\nanswer from " + address.encode()
                )

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


def _egress_log(vm: VM) -> str:
    path = vm.user.home / ".local" / "state" / "microvm-run" / "egress.log"
    return path.read_text() if path.exists() else ""


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
    result = vm.run(work, script, "--net", "allowlist", "--allow", f"{ALLOWED}:{port}")
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
        return probe.getsockname()[1]


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
