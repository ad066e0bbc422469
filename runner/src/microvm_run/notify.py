""" "The agent needs you": a guest's ``notify TEXT`` status line, on the host.

The guest sends it when the agent waits for the user (the claude flavor's
Notification and Stop hooks call ``agent-microvm-notify``).  The runner
rings the terminal bell and, on a desktop (DISPLAY or WAYLAND_DISPLAY set
and ``notify-send`` on PATH), shows a desktop notification; without one it
prints one line.  The text is the guest's: escaped to printable ASCII,
bounded, and rate-limited (a guest that loops must not flood the desktop).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from typing import TextIO

from microvm_run import host, process
from microvm_run.egresslog import printable

MAX_TEXT = 200
MIN_INTERVAL_S = 2.0  # at most one notification per this, per instance
NOTIFY_SEND_TIMEOUT_S = 5.0
DEFAULT_TEXT = "the agent needs you"
# What notify-send needs to reach the desktop, and nothing else (the
# runner's environment may hold API keys).
_DESKTOP_ENV = (
    "PATH",
    "HOME",
    "DISPLAY",
    "WAYLAND_DISPLAY",
    "XDG_RUNTIME_DIR",
    "DBUS_SESSION_BUS_ADDRESS",
)


class Notifier:
    """Turns ``notify`` lines into a bell plus a desktop notification or one line."""

    def __init__(
        self,
        agent: str,
        instance_id: str,
        environ: Mapping[str, str],
        *,
        terminal: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.agent = agent
        self.instance_id = instance_id
        self._environ = environ
        self._terminal = terminal if terminal is not None else sys.stdout
        self._clock = clock
        self._last: float | None = None
        self.sent = 0  # notifications shown (for the instance log)
        self.dropped = 0  # over the rate limit

    def __call__(self, raw: str) -> str | None:
        """Show one notification; returns its (escaped) text, or None if rate-limited."""
        now = self._clock()
        if self._last is not None and now - self._last < MIN_INTERVAL_S:
            self.dropped += 1
            return None
        self._last = now
        text = printable(raw.strip(), spaces=True, limit=MAX_TEXT) or DEFAULT_TEXT
        self.sent += 1
        self._bell()
        title = f"{self.agent} ({self.instance_id})"
        if not self._desktop(title, text):
            process.log(f"{title} needs you: {text}")
        return text

    def _bell(self) -> None:
        try:
            if self._terminal.isatty():
                self._terminal.write("\a")
                self._terminal.flush()
        except (OSError, ValueError):
            pass

    def _desktop(self, title: str, text: str) -> bool:
        env = {k: v for k, v in self._environ.items() if k in _DESKTOP_ENV}
        if not (env.get("DISPLAY") or env.get("WAYLAND_DISPLAY")):
            return False
        program = host.which("notify-send", env)
        if program is None:
            return False
        try:
            done = process.run(
                # `--`: the guest's text is never an option; the body is
                # markup to the notification daemon, so & < > are escaped.
                [program, "--app-name=microvm-run", "--", title, _no_markup(text)],
                env=env,
                timeout=NOTIFY_SEND_TIMEOUT_S,
            )
        except process.ProcessError:
            return False
        return done.returncode == 0


def _no_markup(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
