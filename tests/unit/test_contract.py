from __future__ import annotations

import subprocess

from microvm_run.contract import GuestStatus, render_launch


def test_launch_fragment_round_trips_through_a_real_shell() -> None:
    tricky = ["/bin/sh", "-c", "echo \"$HOME\" 'it''s' $(rm -rf /) `x` \\ ; exit 7", "ünï cödé"]
    data = render_launch(
        "abc123",
        [("work", "/work"), ("home", "/home/agent")],
        {"TERM": "xterm-256color", "COLORTERM": "it's; true"},
        tricky,
    )
    script = (
        data.decode()
        + 'printf "%s\\0" "$MICROVM_INSTANCE" "$MICROVM_SHARES" "$TERM" "$COLORTERM" "$@"'
    )
    out = subprocess.run(["sh", "-c", script], capture_output=True, check=True).stdout
    values = out.decode().split("\0")[:-1]
    assert values == [
        "abc123",
        "work=/work home=/home/agent",
        "xterm-256color",
        "it's; true",
        *tricky,
    ]


def test_status_lines_fold_to_ready_then_exit() -> None:
    status = GuestStatus()
    assert not status.ready and status.exit_code is None
    status = status.feed("ready\n")
    assert status.ready and status.exit_code is None
    assert status.feed("exit 7").exit_code == 7
    assert status.feed("exit 0").exit_code == 0


def test_malformed_status_lines_are_ignored() -> None:
    status = GuestStatus().feed("ready")
    for line in ("exit", "exit -1", "exit 256", "exit seven", "exit \u00b2", "garbage", ""):
        assert status.feed(line) == status
