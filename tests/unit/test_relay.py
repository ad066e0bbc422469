"""relay.py as QEMU runs it: a socket on fds 0-2, the egress proxy on a unix socket."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import microvm_run

RELAY = Path(microvm_run.__file__).with_name("relay.py")
TIMEOUT_S = 10.0


class FakeProxy:
    """A unix socket server for one connection, driven by ``script`` in a thread."""

    def __init__(self, path: Path, script: Callable[[socket.socket], None]) -> None:
        self.path = path
        self.error: BaseException | None = None
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.listener.settimeout(TIMEOUT_S)

        def serve() -> None:
            try:
                conn, _ = self.listener.accept()
                with conn:
                    conn.settimeout(TIMEOUT_S)
                    script(conn)
            except BaseException as err:
                self.error = err

        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()

    def join(self) -> None:
        self.thread.join(TIMEOUT_S)
        self.listener.close()
        assert not self.thread.is_alive()
        if self.error is not None:
            raise self.error


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="relay-") as name:
        yield Path(name)


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected TCP pair on loopback, as libslirp makes for guestfwd commands."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        one = socket.create_connection(listener.getsockname())
        two, _ = listener.accept()
    return one, two


def start_relay(
    port: str,
    proxy_path: Path,
    pair: Callable[[], tuple[socket.socket, socket.socket]] = (socket.socketpair),
) -> tuple[subprocess.Popen[bytes], socket.socket]:
    """The relay with one end of a socket pair as fds 0, 1 and 2; the other end is the guest."""
    guest, child = pair()
    relay = subprocess.Popen(
        [sys.executable, "-I", "-S", str(RELAY), port, str(proxy_path)],
        stdin=child.fileno(),
        stdout=child.fileno(),
        stderr=child.fileno(),
        close_fds=True,
    )
    child.close()
    guest.settimeout(TIMEOUT_S)
    return relay, guest


def read_until_eof(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def receive_guest(conn: socket.socket) -> tuple[bytes, list[socket.socket]]:
    """What the egress proxy reads: the port line and the attached sockets."""
    message, fds, _flags, _addr = socket.recv_fds(conn, 64, 4)
    return message, [socket.socket(fileno=fd) for fd in fds]


@pytest.mark.parametrize("pair", [socket.socketpair, tcp_pair], ids=["unix", "tcp"])
def test_the_guest_socket_itself_is_handed_over_and_the_relay_exits(
    sock_dir: Path, pair: Callable[[], tuple[socket.socket, socket.socket]]
) -> None:
    handed: list[tuple[bytes, list[socket.socket]]] = []

    def script(conn: socket.socket) -> None:
        handed.append(receive_guest(conn))

    proxy = FakeProxy(sock_dir / "egress.sock", script)
    relay, guest = start_relay("443", proxy.path, pair)
    with guest:
        # The relay is gone while the guest's connection is still open: no
        # host process per guest connection.
        assert relay.wait(TIMEOUT_S) == 0
        proxy.join()
        ((message, sockets),) = handed
        assert message == b"443\n" and len(sockets) == 1
        (served,) = sockets
        with served:
            served.settimeout(TIMEOUT_S)
            guest.sendall(b"client hello")
            guest.shutdown(socket.SHUT_WR)
            assert read_until_eof(served) == b"client hello"
            served.sendall(b"answer")
            served.shutdown(socket.SHUT_WR)
            assert read_until_eof(guest) == b"answer"


def test_many_connections_leave_no_relay_running(sock_dir: Path) -> None:
    kept: list[socket.socket] = []

    def script(conn: socket.socket) -> None:
        for _ in range(20):
            accepted, _ = proxy.listener.accept() if kept else (conn, None)
            with accepted:
                kept.extend(receive_guest(accepted)[1])

    proxy = FakeProxy(sock_dir / "egress.sock", script)
    proxy.listener.listen(32)
    started = [start_relay("80", proxy.path) for _ in range(20)]
    assert [relay.wait(TIMEOUT_S) for relay, _ in started] == [0] * 20
    proxy.join()
    assert len(kept) == 20  # every guest connection is open, held by the proxy alone
    for sock in kept:
        sock.close()
    for _, guest in started:
        with guest:
            assert read_until_eof(guest) == b""


def test_no_proxy_means_exit_1_and_nothing_for_the_guest(sock_dir: Path) -> None:
    relay, guest = start_relay("443", sock_dir / "absent.sock")
    with guest:
        assert relay.wait(TIMEOUT_S) == 1
        assert read_until_eof(guest) == b""  # no error text leaks onto the guest's socket


def test_no_proxy_after_the_guest_spoke_is_a_failed_connection(sock_dir: Path) -> None:
    relay, guest = start_relay("443", sock_dir / "absent.sock")
    with guest:
        guest.sendall(b"client hello")
        assert relay.wait(TIMEOUT_S) == 1
        # Unread bytes at close make a reset, which is as good as EOF here.
        with contextlib.suppress(ConnectionResetError):
            assert read_until_eof(guest) == b""


def test_a_stale_socket_file_is_the_same_as_none(sock_dir: Path) -> None:
    path = sock_dir / "egress.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nothing listens
    relay, guest = start_relay("443", path)
    with guest:
        assert relay.wait(TIMEOUT_S) == 1
        assert read_until_eof(guest) == b""


def test_relay_imports_only_the_standard_library() -> None:
    source = RELAY.read_text()
    imports = {
        line.split()[1].split(".")[0]
        for line in source.splitlines()
        if line.startswith(("import ", "from "))
    }
    assert imports <= set(sys.stdlib_module_names) | {"__future__"}
    assert "print(" not in source
