"""What the egress proxy refused, for the guest and for ``microvm-run denied``.

Each distinct refused ``host:port`` that a rule could lift is told once:
as a line in ``<runtime dir>/denied`` (the runner's, outside every share;
``microvm-run denied ID`` prints it) and as a ``denied TEXT`` status line to
the guest, whose root side appends TEXT to ``/run/agent-microvm/denied``
for the agent to read.  Bounded: the guest picks the names, so at most
MAX_DISTINCT are told; the egress log counts the rest.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from microvm_run.netpolicy import Refusal

DENIED_FILE = "denied"
MAX_DISTINCT = 200
MAX_READ = 1024 * 1024


class Denials:
    """The refusals told so far; the runner's main thread owns it."""

    def __init__(self, runtime_dir: Path) -> None:
        self.path = runtime_dir / DENIED_FILE
        self._told: set[str] = set()

    def add(self, refusal: Refusal) -> str | None:
        """The line to tell, or None when this host:port was told already."""
        if refusal.key in self._told or len(self._told) >= MAX_DISTINCT:
            return None
        self._told.add(refusal.key)
        line = refusal.text()
        with contextlib.suppress(OSError):
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            try:
                os.write(fd, f"{line}\n".encode("ascii", "replace"))
            finally:
                os.close(fd)
        return line


def read(runtime_dir: Path) -> list[str]:
    """The lines of a running instance's denied file ([] when none)."""
    try:
        fd = os.open(runtime_dir / DENIED_FILE, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return []
    with os.fdopen(fd, "rb") as file:
        data = file.read(MAX_READ)
    return data.decode("ascii", "replace").splitlines()
