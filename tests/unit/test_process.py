"""process.py: what a forked child runs before exec, and what the parent's death does."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from microvm_run import process

SRC = Path(process.__file__).resolve().parents[1]


def alive(pid: int) -> bool:
    """Is ``pid`` a process that runs (not a zombie)?"""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def test_the_child_makes_no_dlopen_before_exec(monkeypatch: pytest.MonkeyPatch) -> None:
    # The egress proxy's thread may hold the loader's lock at fork: a dlopen
    # (ctypes.CDLL) in the child could deadlock.  Resolved in the parent,
    # the hook is one call through a pointer.
    parent = os.getpid()
    real = ctypes.CDLL

    def cdll_outside_the_parent(*args: object, **kwargs: object) -> ctypes.CDLL:
        if os.getpid() != parent:
            os._exit(97)  # the child looked prctl up itself
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ctypes, "CDLL", cdll_outside_the_parent)
    child = process.spawn(["true"], env={"PATH": os.environ.get("PATH", os.defpath)})
    assert child.wait(timeout=10) == 0
    child.close()


def test_a_child_dies_with_the_runner() -> None:
    # The runner SIGKILLed (no cleanup runs): the kernel ends its children.
    runner = textwrap.dedent(
        f"""
        import os, sys
        sys.path.insert(0, {str(SRC)!r})
        from microvm_run import process
        child = process.spawn(["sleep", "60"], env={{"PATH": os.environ.get("PATH", os.defpath)}})
        print(child.pid, flush=True)
        sys.stdin.read()
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", runner],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    line = proc.stdout.readline()
    if not line.strip().isdigit():
        proc.kill()
        raise AssertionError(f"the runner did not start its child: {line!r} {proc.stderr.read()}")
    pid = int(line)
    try:
        assert alive(pid)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pid), "the child outlived the runner"
