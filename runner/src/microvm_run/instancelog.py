"""One JSON-lines log per instance, for ``microvm-run logs ID`` afterwards.

``$XDG_STATE_HOME/microvm-run/instances/<id>.jsonl`` (0600, directory
0700): the runner's own state, outside every share, written only by the
runner.  Kept when the instance ends; ``microvm-run gc`` removes the logs of
instances that no longer run.

Each line is one object with ``time`` (ISO 8601 UTC) and ``event``:

* ``start``: the plan's summary (agent, project, net, resources, presets, ...)
* ``refused``: the first refusal of each destination a rule could lift
  (bounded like the guest's denied file: denials.MAX_DISTINCT)
* ``notify``: a "the agent needs you" from the guest (as shown, escaped)
* ``egress``: at the end, the connections allowed and denied per host
  (the most frequent MAX_HOSTS of each) and the key proxy's use per key
  variable (requests, bytes up and down)
* ``git``: after a git project run, what was committed (branch, count, head)
* ``stop``: the exit status and the run's duration

Guest-chosen text (host names, notification text) is escaped before it gets
here (egresslog.printable), and json.dumps escapes the rest.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from microvm_run import host, state
from microvm_run.atomic import make_private_dir

if TYPE_CHECKING:  # ps and gc read logs without the planner's imports
    from microvm_run.plan import LaunchPlan

LOG_DIR = "instances"
SUFFIX = ".jsonl"
MAX_HOSTS = 20  # hosts per verdict in the egress event
MAX_READ = 16 * 1024 * 1024
_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def log_dir(environ: Mapping[str, str]) -> Path:
    return host.state_home(environ) / "microvm-run" / LOG_DIR


def log_path(environ: Mapping[str, str], instance_id: str) -> Path:
    return log_dir(environ) / f"{instance_id}{SUFFIX}"


class InstanceLog:
    """Appends events; a failure to write never fails the run."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: TextIO | None = None

    def open(self) -> None:
        with contextlib.suppress(OSError):
            make_private_dir(self.path.parent)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            self._file = os.fdopen(fd, "a", buffering=1, encoding="utf-8")

    def event(self, kind: str, **fields: Any) -> None:
        if self._file is None:
            return
        record = {"time": state.now_utc(), "event": kind, **fields}
        with contextlib.suppress(OSError, ValueError, TypeError):
            self._file.write(json.dumps(record, sort_keys=False, default=str) + "\n")

    def close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None


def plan_summary(plan: LaunchPlan) -> dict[str, Any]:
    """What the start event says about a launch (no key values: the plan has none)."""
    egress = plan.egress
    return {
        "id": plan.instance_id,
        "agent": plan.agent,
        "project": str(plan.work_dir),
        "agent_home": str(plan.agent_home),
        "spec": str(plan.spec),
        "runner_pid": os.getpid(),
        "accel": plan.accel,
        "net": plan.net,
        "memory_mib": plan.memory_mib,
        "vcpus": plan.vcpus,
        "allow": [str(rule) for rule in egress.rules] if egress is not None else [],
        "presets": [use.name for use in plan.presets if use.applied],
        "key_proxy": [route.var for route in egress.key_routes] if egress is not None else [],
        "ports": list(plan.port_forwards),
        "branch": plan.git.branch if plan.git is not None else "",
    }


# -- reading (microvm-run logs) -------------------------------------------------------


def find(environ: Mapping[str, str], token: str) -> Path:
    """The log of instance ``token`` (an id or a unique prefix); ValueError if none or many."""
    if not _ID.fullmatch(token):
        raise ValueError(f"{token!r} is not an instance id")
    directory = log_dir(environ)
    try:
        names = [p.name.removesuffix(SUFFIX) for p in directory.iterdir() if p.suffix == SUFFIX]
    except FileNotFoundError:
        names = []
    exact = [n for n in names if n == token]
    matches = exact or sorted(n for n in names if n.startswith(token))
    if not matches:
        raise ValueError(f"no log for instance {token!r} (microvm-run logs lists them)")
    if len(matches) > 1:
        raise ValueError(f"instance id {token!r} is ambiguous: {', '.join(matches)}")
    return directory / f"{matches[0]}{SUFFIX}"


def listing(environ: Mapping[str, str]) -> list[Path]:
    """Every instance log, oldest first."""
    try:
        paths = [p for p in log_dir(environ).iterdir() if p.suffix == SUFFIX]
    except FileNotFoundError:
        return []
    return sorted(paths, key=lambda p: p.stat().st_mtime)


def read_lines(path: Path, offset: int = 0) -> tuple[list[str], int]:
    """Complete lines from byte ``offset`` on, and the offset after them."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return [], offset
    with os.fdopen(fd, "rb") as file:
        file.seek(offset)
        data = file.read(MAX_READ)
    end = data.rfind(b"\n") + 1
    return data[:end].decode("utf-8", "replace").splitlines(), offset + end


def stopped(path: Path) -> bool:
    """Does the log end with its ``stop`` event?"""
    lines = read_lines(path)[0]
    record = parse(lines[-1]) if lines else None
    return record is not None and record.get("event") == "stop"


def parse(line: str) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def describe(record: Mapping[str, Any]) -> str:
    """One record as one line for people."""
    stamp = str(record.get("time", "?"))
    kind = str(record.get("event", "?"))
    rest = {k: v for k, v in record.items() if k not in ("time", "event")}
    text = " ".join(f"{key}={_short(value)}" for key, value in rest.items())
    return f"{stamp} {kind:<8} {text}".rstrip()


def _short(value: Any) -> str:
    if isinstance(value, str):
        return value if value and " " not in value else json.dumps(value)
    return json.dumps(value, separators=(",", ":"))


def follow(path: Path, running: Callable[[], bool], poll_s: float = 0.5) -> Iterator[str]:
    """Lines as they are written, until the ``stop`` event or ``running()`` is false."""
    offset = 0
    while True:
        lines, offset = read_lines(path, offset)
        for line in lines:
            yield line
            record = parse(line)
            if record is not None and record.get("event") == "stop":
                return
        if not running():
            return
        time.sleep(poll_s)
