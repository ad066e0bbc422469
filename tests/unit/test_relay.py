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
        stdin=child,
        stdout=child,
        stderr=child,
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


def read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "EOF too early"
        data += chunk
    return data


@pytest.mark.parametrize("pair", [socket.socketpair, tcp_pair], ids=["unix", "tcp"])
def test_port_header_then_guest_bytes_then_the_answer(
    sock_dir: Path, pair: Callable[[], tuple[socket.socket, socket.socket]]
) -> None:
    received: list[bytes] = []

    def script(conn: socket.socket) -> None:
        received.append(read_until_eof(conn))  # ends when the guest half-closes
        conn.sendall(b"answer")

    proxy = FakeProxy(sock_dir / "egress.sock", script)
    relay, guest = start_relay("443", proxy.path, pair)
    with guest:
        guest.sendall(b"client hello")
        guest.shutdown(socket.SHUT_WR)
        assert read_until_eof(guest) == b"answer"
    assert relay.wait(TIMEOUT_S) == 0
    proxy.join()
    assert received == [b"443\nclient hello"]


def test_proxy_half_close_reaches_the_guest_which_can_still_send(sock_dir: Path) -> None:
    received: list[bytes] = []

    def script(conn: socket.socket) -> None:
        assert read_exactly(conn, 3) == b"53\n"
        conn.sendall(b"banner")
        conn.shutdown(socket.SHUT_WR)
        received.append(read_until_eof(conn))

    proxy = FakeProxy(sock_dir / "egress.sock", script)
    relay, guest = start_relay("53", proxy.path)
    with guest:
        assert read_until_eof(guest) == b"banner"  # EOF while the guest's side is open
        guest.sendall(b"late words")
        guest.shutdown(socket.SHUT_WR)
        assert read_until_eof(guest) == b""
    assert relay.wait(TIMEOUT_S) == 0
    proxy.join()
    assert received == [b"late words"]


def test_interleaved_exchange(sock_dir: Path) -> None:
    def script(conn: socket.socket) -> None:
        assert read_exactly(conn, 5) == b"3128\n"
        for i in range(20):
            assert read_exactly(conn, 4) == f"q{i:03}"[:4].encode()
            conn.sendall(f"a{i:03}"[:4].encode())
        assert read_until_eof(conn) == b""

    proxy = FakeProxy(sock_dir / "egress.sock", script)
    relay, guest = start_relay("3128", proxy.path)
    with guest:
        for i in range(20):
            guest.sendall(f"q{i:03}"[:4].encode())
            assert read_exactly(guest, 4) == f"a{i:03}"[:4].encode()
        guest.shutdown(socket.SHUT_WR)
        assert read_until_eof(guest) == b""
    assert relay.wait(TIMEOUT_S) == 0
    proxy.join()


def test_large_transfers_both_ways_at_once_do_not_deadlock(sock_dir: Path) -> None:
    size = 8 * 1024 * 1024
    payload = bytes(range(256)) * (size // 256)

    def script(conn: socket.socket) -> None:
        # Echo as it comes: both directions full at the same time.
        assert read_exactly(conn, 4) == b"443\n"
        while chunk := conn.recv(65536):
            conn.sendall(chunk)
        conn.shutdown(socket.SHUT_WR)

    proxy = FakeProxy(sock_dir / "egress.sock", script)
    relay, guest = start_relay("443", proxy.path)
    echoed: list[bytes | OSError] = []

    def read_back() -> None:
        try:
            echoed.append(read_until_eof(guest))
        except OSError as err:
            echoed.append(err)

    reader = threading.Thread(target=read_back, daemon=True)
    with guest:
        reader.start()
        guest.sendall(payload)
        guest.shutdown(socket.SHUT_WR)
        reader.join(TIMEOUT_S * 3)
        assert not reader.is_alive(), "the relay deadlocked"
    assert echoed == [payload]
    assert relay.wait(TIMEOUT_S) == 0
    proxy.join()


def test_guest_reset_ends_the_relay(sock_dir: Path) -> None:
    closed = threading.Event()

    def script(conn: socket.socket) -> None:
        read_until_eof(conn)
        closed.set()

    proxy = FakeProxy(sock_dir / "egress.sock", script)
    relay, guest = start_relay("80", proxy.path)
    guest.sendall(b"GET / HTTP/1.1\r\n")
    guest.close()
    assert relay.wait(TIMEOUT_S) == 0
    proxy.join()
    assert closed.is_set()


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
