"""Running devshell.prepare in a child that a test can interrupt with SIGINT."""

from __future__ import annotations

import time
from collections.abc import Callable

# argv: WORK_DIR AGENT_HOME STATE_DIR NAME=VALUE... (the environment prepare() sees)
PREPARE_CHILD = """
import signal, sys
from pathlib import Path
signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started ignoring it
from microvm_run.devshell import prepare
env = dict(arg.split("=", 1) for arg in sys.argv[4:])
prepare(
    Path(sys.argv[1]), Path(sys.argv[2]), state_dir=Path(sys.argv[3]), allow=True,
    progress=sys.stderr, env=env,
)
"""


def wait_for(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
