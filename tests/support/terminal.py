"""microvm-run on a pseudo-terminal, as a user's shell would start it.

The runner reads the terminal's size at start and follows SIGWINCH; the
guest console writes to the pty, so a reader must drain it or QEMU blocks.
"""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import termios
import threading
from collections.abc import Mapping, Sequence


def set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _drain(fd: int) -> None:
    while True:
        try:
            if not os.read(fd, 65536):
                return
        except OSError:
            return


def start_on_pty(
    argv: Sequence[str], env: Mapping[str, str], rows: int, cols: int
) -> tuple[subprocess.Popen[str], int]:
    """Start ``argv`` with a fresh pty of ROWSxCOLS as its terminal; returns it and the master."""
    master, slave = pty.openpty()
    set_size(slave, rows, cols)
    running = subprocess.Popen(
        argv,
        env=dict(env),
        stdin=slave,
        stdout=slave,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    os.close(slave)
    threading.Thread(target=_drain, args=(master,), daemon=True).start()
    return running, master
