"""The egress log: bounded in lines per second, bytes and names; escaped."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from microvm_run import egresslog
from microvm_run.egresslog import EgressLog, printable


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("api.example.com", "api.example.com"),
        ("a\nb", "a\\x0ab"),
        ("\x1b[31mred\x07", "\\x1b[31mred\\x07"),
        ("\\x41", "\\\\x41"),  # a literal backslash cannot fake an escape
        ("caf\u00e9", "caf\\xe9"),
        ("\u202eevil", "\\u202eevil"),  # right-to-left override
        ("\U0001f600", "\\U0001f600"),
        ("two words", "two\\x20words"),
    ],
)
def test_printable_leaves_only_printable_ascii(text: str, shown: str) -> None:
    assert printable(text) == shown
    assert printable(text).isascii() and printable(text).isprintable()


def test_printable_keeps_spaces_where_asked_and_cuts_long_values() -> None:
    assert printable("not in the allowlist", spaces=True) == "not in the allowlist"
    assert printable("x" * 1000) == "x" * egresslog.MAX_SHOWN + "..."


def test_lines_beyond_the_rate_are_counted_in_one_line(tmp_path: Path) -> None:
    clock = Clock()
    log = EgressLog(tmp_path / "egress.log", "cafe", clock)
    log.open()
    for i in range(egresslog.BURST_LINES + 500):
        log.record("deny", f"n{i}.example", 53, "dns", "not in the allowlist")
    clock.now += 10  # quiet for a while: tokens again
    log.record("allow", "ok.example", 443, "tls")
    log.close()
    lines = (tmp_path / "egress.log").read_text().splitlines()
    assert len(lines) == egresslog.BURST_LINES + 2
    assert lines[-2].endswith("cafe note: 500 decision(s) not logged (rate limit)")
    assert lines[-1].endswith("cafe allow ok.example:443 via tls")
    # The counts are whole although the lines were not.
    assert sum(log.denied.values()) + log.denied_others == egresslog.BURST_LINES + 500


def test_the_suppressed_count_is_written_at_close(tmp_path: Path) -> None:
    log = EgressLog(tmp_path / "egress.log", "cafe", Clock())
    log.open()
    for _ in range(egresslog.BURST_LINES + 3):
        log.record("deny", "x.example", 80, "http")
    log.close()
    assert "3 decision(s) not logged" in (tmp_path / "egress.log").read_text()


def test_the_log_rotates_at_its_size_cap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(egresslog, "MAX_LOG_BYTES", 2000)
    clock = Clock()
    path = tmp_path / "egress.log"
    log = EgressLog(path, "cafe", clock)
    log.open()
    for i in range(200):
        clock.now += 1
        log.record("deny", f"host{i}.example", 443, "tls", "not in the allowlist")
    log.close()
    old = path.with_name("egress.log.1")
    assert path.stat().st_size < 2000 + 200 and old.stat().st_size < 2000 + 200
    assert sorted(p.name for p in tmp_path.iterdir()) == ["egress.log", "egress.log.1"]
    assert "host199.example" in path.read_text()


def test_rotation_by_another_instance_is_followed_not_repeated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(egresslog, "MAX_LOG_BYTES", 500)
    clock = Clock()
    path = tmp_path / "egress.log"
    one, two = EgressLog(path, "one", clock), EgressLog(path, "two", clock)
    one.open()
    two.open()
    for i in range(30):
        clock.now += 1
        one.record("allow", f"a{i}.example", 443, "tls")
        two.record("allow", f"b{i}.example", 443, "tls")
    one.close()
    two.close()
    # Both kept writing to the current log; nothing was rotated away twice
    # in a row by the instance still holding the old file.
    text = path.read_text()
    assert "a29.example" in text and "b29.example" in text


def test_the_deny_counter_tells_apart_a_bounded_number_of_names(tmp_path: Path) -> None:
    log = EgressLog(tmp_path / "egress.log", "cafe", Clock())
    for i in range(egresslog.MAX_DISTINCT + 1000):
        log.record("deny", f"n{i}.example", 53, "dns")
    log.record("deny", "n0.example", 53, "dns")  # a known name still counts as itself
    assert len(log.denied) == egresslog.MAX_DISTINCT
    assert log.denied["n0.example:53"] == 2 and log.denied_others == 1000
    summary = log.summary()
    assert summary is not None
    assert summary.startswith(f"egress denied {egresslog.MAX_DISTINCT + 1001} connection(s): ")
    assert "and 1000 to further names" in summary


def test_the_log_is_the_users_alone_under_any_umask_and_after_rotation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(egresslog, "MAX_LOG_BYTES", 500)
    clock = Clock()
    path = tmp_path / "state" / "egress.log"
    previous = os.umask(0)
    try:
        log = EgressLog(path, "cafe", clock)
        log.open()
        for i in range(30):
            clock.now += 1
            log.record("deny", f"host{i}.example", 443, "tls")
        log.close()
    finally:
        os.umask(previous)
    assert path.with_name("egress.log.1").exists()  # it rotated
    for made in (path.parent, path, path.with_name("egress.log.1")):
        assert stat.S_IMODE(made.stat().st_mode) == (0o700 if made.is_dir() else 0o600), made


def test_a_log_left_open_to_others_is_closed_and_a_symlink_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "egress.log"
    path.write_text("")
    path.chmod(0o644)
    log = EgressLog(path, "cafe", Clock())
    log.open()
    log.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("")
    path.unlink()
    path.symlink_to(elsewhere)
    with pytest.raises(OSError):
        EgressLog(path, "cafe", Clock()).open()
    assert elsewhere.read_text() == ""
