"""Correct under real workloads: a relative spec, a true guest clock, big trees."""

from __future__ import annotations

import subprocess
import time
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
    clocksource = "/sys/devices/system/clocksource/clocksource0/current_clocksource"
    result = vm.run(
        work, f": > /work/t0; sleep {GUEST_SLEEP_S}; : > /work/t1; cat {clocksource} > /work/cs"
    )
    assert result.returncode == 0, result.stderr
    # Still the TSC: on a busy host the watchdog used to swap it for jiffies.
    assert (work / "cs").read_text() == "tsc\n"
    elapsed = (work / "t1").stat().st_mtime - (work / "t0").stat().st_mtime
    print(f"guest sleep {GUEST_SLEEP_S} s took {elapsed:.3f} s of host time")
    # A guest clock that runs fast sleeps short: no load makes a sleep
    # shorter, so the lower bound is tight (a TSC off by 2% fails it).
    # A loaded host can make a sleep overshoot, so the upper bound is loose.
    assert GUEST_SLEEP_S * 0.98 <= elapsed <= GUEST_SLEEP_S * 1.25 + 1, elapsed


def _big_tree(root: Path, dirs: int, files_per_dir: int, owner: VM) -> int:
    for d in range(dirs):
        sub = root / f"d{d:03}"
        sub.mkdir()
        for f in range(files_per_dir):
            (sub / f"f{f:03}").write_bytes(b"")
    subprocess.run(["chown", "-R", f"{owner.user.uid}:{owner.user.gid}", str(root)], check=True)
    return sum(1 for _ in root.rglob("*"))


# The guest walks the whole project, as `find`, a build or an indexer does,
# which makes virtiofsd hold one descriptor per file and directory.
COUNT_IN_GUEST = "n=$(find /work -mindepth 1 | wc -l); echo $n > /work/guest-count"


@pytest.mark.parametrize(
    ("soft", "hard", "warned"),
    [
        # The soft limit is far below the tree, the hard one above it:
        # virtiofsd raises its soft limit to the hard one, so nothing is lost.
        (256, 4096, False),
        # The hard limit is below the tree: the launch says so, with the fix.
        (256, 1024, True),
    ],
)
def test_a_tree_larger_than_the_open_file_limit(
    vm_no_manager: VM, soft: int, hard: int, warned: bool
) -> None:
    vm = vm_no_manager  # virtiofsd is the runner's child and inherits its limits
    work = vm.project()
    on_host = _big_tree(work, 30, 40, vm)  # 1230 entries
    argv = ["prlimit", f"--nofile={soft}:{hard}", *vm.argv(work, COUNT_IN_GUEST)]
    result = subprocess.run(
        vm.as_user(argv), env=vm.env(), stdin=subprocess.DEVNULL, capture_output=True,
        text=True, timeout=VM_TIMEOUT_S, check=False,
    )  # fmt: skip
    warning = [line for line in result.stderr.splitlines() if "warning:" in line]
    count_file = work / "guest-count"
    text = count_file.read_text().strip() if count_file.exists() else ""
    in_guest = int(text) if text.isdigit() else None
    print(f"nofile {soft}:{hard}: {on_host} entries on the host, {in_guest} seen in the guest")
    if warned:
        # Past the limit the guest cannot even create the count file
        # (EMFILE): that is the failure the warning announces.
        (line,) = warning
        assert f"more than {hard - 610} files and directories" in line
        assert "ulimit -Hn" in line
    else:
        assert result.returncode == 0, result.stderr
        assert warning == []
        assert in_guest == on_host


# The guest reads a file, the host rewrites it in place (same size), and the
# guest reads it again once the documented bound (1 s) has passed.
COHERENCE_GUEST = (
    "cat /work/f > /work/before; : > /work/go; i=0; "
    "while [ ! -e /work/edited ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; "
    "sleep 1.2; cat /work/f > /work/after"
)


def test_a_host_edit_is_seen_in_work_within_the_bound(vm: VM) -> None:
    work = vm.project()
    (work / "f").write_text("old content\n")
    subprocess.run(["chown", f"{vm.user.uid}:{vm.user.gid}", str(work / "f")], check=True)
    proc = vm.start(work, COHERENCE_GUEST)
    try:
        deadline = time.monotonic() + VM_TIMEOUT_S
        while not (work / "go").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with (work / "f").open("r+") as file:  # in place: same inode, same size
            file.write("new content\n")
        (work / "edited").write_text("")
        _, err = proc.communicate(timeout=VM_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert (work / "before").read_text() == "old content\n"
    assert (work / "after").read_text() == "new content\n"
