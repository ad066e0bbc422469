"""One guest connection, handed from QEMU to the runner's egress proxy.

QEMU's ``guestfwd=...-cmd:`` starts this once per guest TCP connection, with
the connection as a socket on fds 0, 1 and 2.  It connects to the egress
proxy's unix socket, says which guest port the connection was for, and
copies bytes both ways until both sides are done.  It holds no policy and no
secret: the proxy decides everything.

Run as a plain script (``python3 -I -S relay.py PORT SOCKET``): it imports
only the standard library and must never print (fd 2 is the guest's socket).
"""

import contextlib
import os
import socket
import sys
import threading

_CHUNK = 64 * 1024


def main(port: str, proxy_path: str) -> int:
    guest = socket.socket(fileno=0)
    try:
        proxy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        proxy.connect(proxy_path)
        proxy.sendall(port.encode() + b"\n")
    except OSError:
        return 1  # no proxy: the connection fails, nothing gets out
    # Close our copies of the guest socket on stdout/stderr so EOF propagates.
    for fd in (1, 2):
        os.close(fd)
    _copy_both_ways(guest, proxy)
    return 0


def _copy_both_ways(left: socket.socket, right: socket.socket) -> None:
    # One thread per direction: a single loop that blocks in sendall() one
    # way stops reading the other way, and two full buffers then deadlock.
    other = threading.Thread(target=_pump, args=(right, left), daemon=True)
    other.start()
    _pump(left, right)
    other.join()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    """Copy until EOF, then pass the half-close on; on an error, end both ways."""
    try:
        while data := source.recv(_CHUNK):
            sink.sendall(data)
    except OSError:
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        return
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
