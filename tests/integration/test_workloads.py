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
