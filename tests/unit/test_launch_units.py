"""virtiofsd units: their main pids come from one systemctl call."""

from __future__ import annotations

from typing import Any

import pytest

from microvm_run import launch, process

# What systemctl show prints for several units (seen with systemd 252).
SHOWN = (
    "MainPID=1492\nId=a-vm-virtiofsd-work-1.service\n\n"
    "MainPID=0\nId=a-vm-virtiofsd-home-1.service\n"
)


def test_each_unit_gets_its_own_main_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str, ...]] = []

    def run(argv: list[str], **_: Any) -> process.Completed:
        seen.append(tuple(argv))
        return process.Completed(tuple(argv), 0, SHOWN, "")

    monkeypatch.setattr(process, "run", run)
    units = ["a-vm-virtiofsd-work-1", "a-vm-virtiofsd-home-1", "a-vm-virtiofsd-ro-store-1"]
    pids = launch._main_pids(units, {})
    assert len(seen) == 1 and seen[0][-3:] == tuple(units)
    assert pids["a-vm-virtiofsd-work-1"] == (1492, "it exited at once")
    assert pids["a-vm-virtiofsd-home-1"][0] == 0
    assert "a-vm-virtiofsd-ro-store-1" not in pids


def test_a_failing_systemctl_names_its_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    def run(argv: list[str], **_: Any) -> process.Completed:
        return process.Completed(tuple(argv), 1, "", "Failed to connect to bus\n")

    monkeypatch.setattr(process, "run", run)
    assert launch._main_pids(["u"], {}) == {"u": (0, "Failed to connect to bus")}
