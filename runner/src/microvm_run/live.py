"""Rules added to a running instance: ``microvm-run allow ID HOST[:PORT] [--once]``.

The file ``<runtime dir>/allow`` (0600, in the instance's 0700 runtime dir,
outside every share) holds one rule per line, ``HOST[:PORT]`` for the rest
of the instance's life or ``once HOST[:PORT]`` for one connection.  Only
``microvm-run allow`` appends to it; the egress proxy re-reads it when its
size or modification time changes, so a rule applies to the next
connection, with no signal and no socket to the runner.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from microvm_run import netpolicy
from microvm_run.netpolicy import AllowRule

LIVE_FILE = "allow"
ONCE = "once"
MAX_LIVE_BYTES = 256 * 1024  # the proxy reads no more than this


def render(rule: AllowRule, *, once: bool) -> str:
    """One line of the live file for ``rule``."""
    return f"{ONCE} {rule}\n" if once else f"{rule}\n"


def append(runtime_dir: Path, rule: AllowRule, *, once: bool) -> Path:
    """Add one rule (O_APPEND: concurrent `allow`s never interleave a line)."""
    path = runtime_dir / LIVE_FILE
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, render(rule, once=once).encode())
    finally:
        os.close(fd)
    return path


def parse(text: str) -> tuple[tuple[AllowRule, ...], tuple[AllowRule, ...]]:
    """(lasting rules, once rules, in file order); a line that does not parse is skipped."""
    lasting: list[AllowRule] = []
    once: list[AllowRule] = []
    for line in text.splitlines():
        words = line.split()
        if not words:
            continue
        if len(words) == 1:
            target = lasting
        elif len(words) == 2 and words[0] == ONCE:
            target = once
        else:
            continue
        with contextlib.suppress(netpolicy.PolicyError):
            target.append(netpolicy.parse_allow(words[-1]))
    return tuple(lasting), tuple(once)


@dataclass
class LiveRules:
    """The proxy's view of the live file, re-read when it changes."""

    path: Path | None
    lasting: tuple[AllowRule, ...] = ()
    _once: tuple[AllowRule, ...] = ()
    _used: set[int] = field(default_factory=set)  # indices of spent once rules
    _seen: tuple[int, int, int] | None = None

    def refresh(self) -> None:
        if self.path is None:
            return
        try:
            info = os.stat(self.path, follow_symlinks=False)
        except OSError:
            return
        seen = (info.st_ino, info.st_size, info.st_mtime_ns)
        if seen == self._seen:
            return
        try:
            with open(self.path, "rb") as file:
                text = file.read(MAX_LIVE_BYTES).decode("ascii", "replace")
        except OSError:
            return
        self._seen = seen
        self.lasting, self._once = parse(text)

    def permits(self, host: str, port: int | None, *, take: bool) -> bool:
        """A live rule admits host:port (port None: the rule's own, for DNS);
        ``take`` spends a matching once rule."""
        self.refresh()
        host = netpolicy.normalise_host(host)

        def admits(rule: AllowRule) -> bool:
            return rule.matches(host, port if port is not None else rule.port or netpolicy.TLS_PORT)

        if any(admits(rule) for rule in self.lasting):
            return True
        for index, rule in enumerate(self._once):
            if index not in self._used and admits(rule):
                if take:
                    self._used.add(index)
                return True
        return False
