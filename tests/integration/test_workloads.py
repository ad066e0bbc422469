"""Correct under real workloads: a relative spec, a true guest clock, big trees."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from .conftest import VM, VM_TIMEOUT_S

pytestmark = pytest.mark.integration


def _run_in(vm: VM, cwd: Path, argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        vm.as_user(argv),
        cwd=cwd,
        env=vm.env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=VM_TIMEOUT_S,
        check=False,
    )


def test_a_relative_spec_launches_as_it_dry_runs(vm: VM) -> None:
    work = vm.project()
    argv = [
        str(vm.python), "-m", "microvm_run", "--spec", vm.spec.name, "--accel", "tcg",
        "--work-dir", str(work), "--", "echo relative > /work/out; exit 3",
    ]  # fmt: skip
    dry = _run_in(vm, vm.spec.parent, [*argv[:-2], "--dry-run"])
    assert dry.returncode == 0, dry.stderr
    result = _run_in(vm, vm.spec.parent, argv)
    assert result.returncode == 3, result.stderr
    assert (work / "out").read_text() == "relative\n"


# The guest sleeps this long between two files it creates in /work; the host
# stamps both (virtiofsd creates them, so their mtimes are the host's clock).
GUEST_SLEEP_S = 8


def test_the_guest_clock_runs_at_the_hosts_rate(vm: VM) -> None:
    # The microvm machine under TCG is the case the runner's tsc_early_khz
    # decides (q35 calibrates against its PIT; seen at 8.02 s for 8 s).
    work = vm.project()
    result = vm.run(work, f": > /work/t0; sleep {GUEST_SLEEP_S}; : > /work/t1")
    assert result.returncode == 0, result.stderr
    elapsed = (work / "t1").stat().st_mtime - (work / "t0").stat().st_mtime
    print(f"guest sleep {GUEST_SLEEP_S} s took {elapsed:.3f} s of host time")
    # A guest clock that runs fast sleeps short: no load makes a sleep
    # shorter, so the lower bound is tight (a TSC off by 2% fails it).
    # A loaded host can make a sleep overshoot, so the upper bound is loose.
    assert GUEST_SLEEP_S * 0.98 <= elapsed <= GUEST_SLEEP_S * 1.25 + 1, elapsed
