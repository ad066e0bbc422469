"""TCP listeners for the host-network tests, run inside a test namespace.

    python3 listen.py OUTDIR ADDR:PORT...

Each connection's first bytes are appended (repr, one line) to
OUTDIR/ADDR_PORT.log; the answer is a small HTTP response naming the
listener.  OUTDIR/ready appears once every socket listens.  Runs until
killed.
"""

import contextlib
import socket
import sys
import threading
from pathlib import Path


def serve(outdir: Path, listener: socket.socket, name: str) -> None:
    while True:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(5)
            try:
                data = conn.recv(65536)
            except OSError:
                data = b""
            with (outdir / f"{name}.log").open("a") as log:
                log.write(repr(data) + "\n")
            with contextlib.suppress(OSError):
                conn.sendall(
                    b"HTTP/1.0 200 OK\r\nConnection: close\r\n\r\nanswer from " + name.encode()
                )


def main() -> None:
    outdir = Path(sys.argv[1])
    threads = []
    for spec in sys.argv[2:]:
        addr, port = spec.rsplit(":", 1)
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((addr, int(port)))
        listener.listen(16)
        name = f"{addr}_{port}"
        thread = threading.Thread(target=serve, args=(outdir, listener, name), daemon=True)
        thread.start()
        threads.append(thread)
    (outdir / "ready").touch()
    for thread in threads:
        thread.join()


if __name__ == "__main__":
    main()
