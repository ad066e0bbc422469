"""Rules added to a running instance: ``microvm-run allow ID HOST[:PORT] [--once]``.

The file ``<runtime dir>/allow`` (0600, in the instance's 0700 runtime dir,
outside every share) holds one rule per line: ``[once] [private] HOST[:PORT]``.
Without ``once`` a rule holds for the rest of the instance's life, with it
for one connection; ``private`` admits the name where it resolves to
loopback or the LAN, as ``--allow-private`` does at launch.  Only
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
PRIVATE = "private"
MAX_LIVE_BYTES = 256 * 1024  # the proxy reads no more than this


def render(rule: AllowRule, *, once: bool) -> str:
    """One line of the live file for ``rule``."""
    name = f"*.{rule.host}" if rule.wildcard else rule.host
    entry = name if rule.port is None else f"{name}:{rule.port}"
    words = [ONCE] * once + [PRIVATE] * rule.private + [entry]
    return " ".join(words) + "\n"


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
        *flags, entry = line.split() or [""]
        if (
            not entry
            or any(f not in (ONCE, PRIVATE) for f in flags)
            or len(set(flags)) < len(flags)
        ):
            continue
        target = once if ONCE in flags else lasting
        with contextlib.suppress(netpolicy.PolicyError):
            target.append(netpolicy.parse_allow(entry, private=PRIVATE in flags))
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

    def permits(self, host: str, port: int | None, *, take: bool) -> AllowRule | None:
        """The live rule that admits host:port (port None: the rule's own, for
        DNS), or None; ``take`` spends a matching once rule."""
        self.refresh()
        host = netpolicy.normalise_host(host)

        def admits(rule: AllowRule) -> bool:
            return rule.matches(host, port if port is not None else rule.port or netpolicy.TLS_PORT)

        for rule in self.lasting:
            if admits(rule):
                return rule
        for index, rule in enumerate(self._once):
            if index not in self._used and admits(rule):
                if take:
                    self._used.add(index)
                return rule
        return None
