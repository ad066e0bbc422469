"""The guest's "the agent needs you" on the host (notify.py)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from microvm_run import notify


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_without_a_desktop_one_line_and_a_bell(capsys: pytest.CaptureFixture[str]) -> None:
    terminal = Tty()
    notifier = notify.Notifier("claude", "cafe0001", {"PATH": "/nonexistent"}, terminal=terminal)
    assert notifier("waiting for you") == "waiting for you"
    assert terminal.getvalue() == "\a"
    assert capsys.readouterr().err == "microvm-run: claude (cafe0001) needs you: waiting for you\n"


def test_a_flood_is_cut_to_one_per_interval(capsys: pytest.CaptureFixture[str]) -> None:
    clock = Clock()
    notifier = notify.Notifier("claude", "x", {}, terminal=io.StringIO(), clock=clock)
    assert notifier("one") is not None
    assert notifier("two") is None
    clock.now += notify.MIN_INTERVAL_S
    assert notifier("three") is not None
    assert (notifier.sent, notifier.dropped) == (2, 1)
    assert "two" not in capsys.readouterr().err


def test_the_guests_text_is_escaped_and_bounded() -> None:
    notifier = notify.Notifier("claude", "x", {}, terminal=io.StringIO())
    shown = notifier("\x1b]0;pwned\x07" + "y" * 500)
    assert shown is not None and "\x1b" not in shown and "\x07" not in shown
    assert shown.startswith("\\x1b]0;pwned\\x07") and shown.endswith("...")
    assert notify.Notifier("c", "x", {}, terminal=io.StringIO())("   ") == notify.DEFAULT_TEXT


def test_on_a_desktop_notify_send_gets_title_and_text_and_no_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    record = tmp_path / "argv"
    fake = tmp_path / "notify-send"
    fake.write_text(f'#!/bin/sh\n{{ env; printf "%s\\n" "$@"; }} > {record}\n')
    fake.chmod(0o755)
    environ = {"PATH": f"{tmp_path}:/usr/bin:/bin", "DISPLAY": ":0", "ANTHROPIC_API_KEY": "sk-x"}
    notifier = notify.Notifier("claude", "cafe0001", environ, terminal=io.StringIO())
    assert notifier("look") == "look"
    seen = record.read_text()
    assert "--app-name=microvm-run\n--\nclaude (cafe0001)\nlook\n" in seen
    assert "sk-x" not in seen
    assert capsys.readouterr().err == ""


def test_the_guests_text_is_neither_an_option_nor_markup_to_notify_send() -> None:
    assert notify._no_markup("<a href='x'>&</a>") == "&lt;a href='x'&gt;&amp;&lt;/a&gt;"
