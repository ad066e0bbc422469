"""The egress log and deny counter: bounded, and safe to print.

Everything the proxy logs about a connection was chosen by the guest (a DNS
name, an SNI, a Host header), and the guest can make as many connections as
it likes.  So the log is bounded three ways: lines per second (a token
bucket; what it drops is counted in one line), bytes on disk (rotated to one
``.1`` file), and the distinct names the end-of-run summary counts.  Every
guest-chosen value is escaped to printable ASCII before it is written or
printed: no control byte forges a log line or reaches the user's terminal.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from microvm_run.atomic import make_private_dir

MAX_LOG_BYTES = 4 * 1024 * 1024  # then egress.log moves to egress.log.1
LINES_PER_S = 20.0  # sustained; a burst of BURST_LINES goes through at once
BURST_LINES = 200
MAX_DISTINCT = 200  # names the deny counter tells apart; the rest count as "others"
MAX_SHOWN = 255  # characters of one guest-chosen value in a line


def printable(text: str, *, spaces: bool = False, limit: int = MAX_SHOWN) -> str:
    r"""``text`` with every byte outside printable ASCII as ``\xNN`` (``\\`` for ``\``)."""
    out = []
    for char in text[:limit]:
        code = ord(char)
        if char == "\\":
            out.append("\\\\")
        elif 0x21 <= code <= 0x7E or (spaces and char == " "):
            out.append(char)
        elif code <= 0xFF:
            out.append(f"\\x{code:02x}")
        else:
            out.append(f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}")
    if len(text) > limit:
        out.append("...")
    return "".join(out)


class EgressLog:
    """Appends decisions to the egress log and counts denials for the summary."""

    def __init__(
        self, path: Path, instance_id: str, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.path = path
        self.instance_id = instance_id
        self._clock = clock
        self._file: TextIO | None = None
        self._tokens = float(BURST_LINES)
        self._last = clock()
        self._suppressed = 0
        self.denied: Counter[str] = Counter()
        self.denied_others = 0  # denials of names beyond MAX_DISTINCT
        self.allowed = 0
        # Allowed connections per host:port, bounded like the denials.
        self.allowed_hosts: Counter[str] = Counter()

    def open(self) -> None:
        make_private_dir(self.path.parent)
        self._file = _open_private(self.path)

    def close(self) -> None:
        if self._file is not None:
            self._flush_suppressed()
            self._file.close()
            self._file = None

    def record(self, verdict: str, host: str, port: int, via: str, why: str = "") -> None:
        shown = printable(host)
        if verdict == "deny":
            key = f"{shown}:{port}"
            if key in self.denied or len(self.denied) < MAX_DISTINCT:
                self.denied[key] += 1
            else:
                self.denied_others += 1
        else:
            self.allowed += 1
            key = f"{shown}:{port}"
            if key in self.allowed_hosts or len(self.allowed_hosts) < MAX_DISTINCT:
                self.allowed_hosts[key] += 1
        line = f"{self.instance_id} {verdict} {shown}:{port} via {printable(via, spaces=True)}"
        if why:
            line += f" ({printable(why, spaces=True)})"
        if not self._take_token():
            self._suppressed += 1
            return
        self._flush_suppressed()
        self._write(line)

    def error(self, what: str) -> None:
        """A fault of the proxy itself: in the log, never on the user's terminal."""
        if self._take_token():
            self._flush_suppressed()
            self._write(f"{self.instance_id} error: {printable(what, spaces=True)}")
        else:
            self._suppressed += 1

    def summary(self) -> str | None:
        """One line on what was denied, for the user's terminal at the end."""
        total = sum(self.denied.values()) + self.denied_others
        if not total:
            return None
        shown = ", ".join(f"{host} ({n}x)" for host, n in self.denied.most_common(5))
        more = len(self.denied) - 5
        tail = f" and {more} more" if more > 0 else ""
        if self.denied_others:
            tail += f" and {self.denied_others} to further names"
        return (
            f"egress denied {total} connection(s): {shown}{tail}; "
            f"microvm-run logs {self.instance_id} (each decision: {self.path})"
        )

    # -- bounds ------------------------------------------------------------------

    def _take_token(self) -> bool:
        now = self._clock()
        self._tokens = min(float(BURST_LINES), self._tokens + (now - self._last) * LINES_PER_S)
        self._last = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

    def _flush_suppressed(self) -> None:
        if self._suppressed:
            count, self._suppressed = self._suppressed, 0
            self._write(f"{self.instance_id} note: {count} decision(s) not logged (rate limit)")

    def _write(self, line: str) -> None:
        if self._file is None:
            return
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        with contextlib.suppress(OSError, ValueError):
            self._rotate_if_full()
            self._file.write(f"{stamp} {line}\n")

    def _rotate_if_full(self) -> None:
        assert self._file is not None
        mine = os.fstat(self._file.fileno())
        if mine.st_size < MAX_LOG_BYTES:
            return
        # Several instances append to one log: only the one whose file is
        # still the current log moves it; the others just reopen the path.
        with contextlib.suppress(FileNotFoundError):
            current = os.stat(self.path)
            if (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
                os.replace(self.path, self.path.with_name(self.path.name + ".1"))
        self._file.close()
        self._file = _open_private(self.path)


def _open_private(path: Path) -> TextIO:
    """The log for appending, 0600 whatever the umask: it says where the
    agent went, which no other local user is to read.  A symlink in its
    place is refused; a log an older runner left open to others is closed."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags, 0o600)
    try:
        if os.fstat(fd).st_mode & 0o077:
            os.fchmod(fd, 0o600)
        return os.fdopen(fd, "a", buffering=1, encoding="ascii")
    except BaseException:
        os.close(fd)
        raise
