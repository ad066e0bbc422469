"""Live rules (live.py) and what a refusal tells the guest (netpolicy.Refusal, denials.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from microvm_run import denials, live, netpolicy
from microvm_run.netpolicy import FIX_ALLOW, FIX_PRIVATE, Refusal


def test_a_live_rule_admits_from_the_next_decision_on(tmp_path: Path) -> None:
    rules = live.LiveRules(tmp_path / live.LIVE_FILE)
    assert not rules.permits("pkg.example", 443, take=True)
    live.append(tmp_path, netpolicy.parse_allow("pkg.example"), once=False)
    assert rules.permits("pkg.example", 443, take=True)
    assert rules.permits("PKG.example.", 80, take=True)
    assert not rules.permits("pkg.example", 22, take=True)
    assert not rules.permits("other.example", 443, take=True)


def test_a_once_rule_admits_one_connection_and_dns_does_not_spend_it(tmp_path: Path) -> None:
    rules = live.LiveRules(tmp_path / live.LIVE_FILE)
    live.append(tmp_path, netpolicy.parse_allow("git.example:8443"), once=True)
    assert rules.permits("git.example", None, take=False)  # the DNS question
    assert rules.permits("git.example", 8443, take=True)
    assert not rules.permits("git.example", 8443, take=True)
    live.append(tmp_path, netpolicy.parse_allow("git.example:8443"), once=True)
    assert rules.permits("git.example", 8443, take=True)


def test_lines_that_do_not_parse_are_skipped() -> None:
    lasting, once = live.parse("ok.example\nnot a rule\n*.bad*\nonce x.example:1\nonce a b\n\n")
    assert [str(r) for r in lasting] == ["ok.example"]
    assert [str(r) for r in once] == ["x.example:1"]


def test_the_live_file_is_private_and_never_followed(tmp_path: Path) -> None:
    path = live.append(tmp_path, netpolicy.parse_allow("a.example"), once=False)
    assert path.stat().st_mode & 0o777 == 0o600
    path.unlink()
    os.symlink(tmp_path / "elsewhere", path)
    with pytest.raises(OSError):
        live.append(tmp_path, netpolicy.parse_allow("a.example"), once=False)
    assert not (tmp_path / "elsewhere").exists()


def _refusal(port: int, fix: str | None, why: str = "not in the allowlist") -> Refusal:
    return Refusal("pkg.example", port, why, fix, "allowlist", "cafe0001")


def test_a_refusal_names_the_host_the_mode_and_the_command() -> None:
    assert _refusal(443, FIX_ALLOW).text() == (
        "microvm-run refused pkg.example:443: not in the allowlist (--net allowlist); "
        "to allow it, on the host: microvm-run allow cafe0001 pkg.example"
    )
    assert _refusal(8443, FIX_ALLOW).text().endswith("allow cafe0001 pkg.example:8443")
    assert _refusal(53, FIX_ALLOW).text().startswith("microvm-run refused pkg.example: ")
    private = _refusal(443, FIX_PRIVATE, "resolves to non-public address 10.0.0.1").text()
    assert "microvm-run allow cafe0001 pkg.example:443 --private (or start with" in private
    assert "to allow it" not in _refusal(443, None, "connection failed").text()


def test_each_refused_destination_is_told_once_and_kept_in_the_runtime_dir(
    tmp_path: Path,
) -> None:
    told = denials.Denials(tmp_path)
    assert told.add(_refusal(443, FIX_ALLOW)) is not None
    assert told.add(_refusal(443, FIX_ALLOW)) is None
    assert told.add(_refusal(80, FIX_ALLOW)) is not None
    assert denials.read(tmp_path) == [
        _refusal(443, FIX_ALLOW).text(),
        _refusal(80, FIX_ALLOW).text(),
    ]
    assert denials.read(tmp_path / "gone") == []
