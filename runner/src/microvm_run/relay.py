"""One guest connection, handed from QEMU to the runner's egress proxy.

QEMU's ``guestfwd=...-cmd:`` starts this once per guest TCP connection, with
the connection as a socket on fds 0, 1 and 2.  It connects to the egress
proxy's unix socket and sends one message: the guest port as a line, with
the guest's socket itself attached (SCM_RIGHTS).  Then it exits: the proxy,
one long-lived loop in the runner, serves the connection from there on, so
no host process lives per guest connection (150 idle connections used to
hold 150 relay processes, about 0.9 GiB).  It holds no policy and no
secret: the proxy decides everything.

Run as a plain script (``python3 -I -S relay.py PORT SOCKET``): it imports
only the standard library and must never print (fd 2 is the guest's socket).
"""

import socket
import sys


def main(port: str, proxy_path: str) -> int:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as proxy:
            proxy.settimeout(10.0)
            proxy.connect(proxy_path)
            socket.send_fds(proxy, [port.encode() + b"\n"], [0])
    except OSError:
        return 1  # no proxy: the connection fails, nothing gets out
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
