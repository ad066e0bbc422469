"""Local directories: node_modules & co. on the guest's own disk, not on the share."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from .conftest import VM

pytestmark = pytest.mark.integration

# A small disk: the busybox guest formats it with mke2fs, which writes every
# inode table (a NixOS guest's mkfs.ext4 initialises them lazily).
SIZE = ("--local-dirs-size", "1")


def node_project(vm: VM) -> Path:
    work = vm.project()
    (work / "package-lock.json").write_text("{}\n")
    os.chown(work / "package-lock.json", vm.user.uid, vm.user.gid)
    return work


def images(vm: VM, work: Path) -> list[Path]:
    from microvm_run import host  # noqa: PLC0415

    env = {"HOME": str(vm.user.home)}
    return sorted((host.project_state_dir(work.resolve(), env) / "local-dirs").glob("*.img"))


def test_local_dirs_persist_across_runs_and_the_host_never_sees_them(vm: VM) -> None:
    work = node_project(vm)
    first = vm.run(
        work,
        "mkdir -p node_modules/left-pad && echo kept > node_modules/left-pad/index.js && "
        "grep ' /work/node_modules ' /proc/mounts > /work/mounts",
        *SIZE,
    )
    assert first.returncode == 0, first.stderr
    assert " ext4 " in (work / "mounts").read_text()
    # The host has the mount point the guest made, empty: the files are on the disk.
    assert (work / "node_modules").is_dir()
    assert list((work / "node_modules").iterdir()) == []
    [image] = images(vm, work)
    info = image.stat()
    assert (info.st_mode & 0o777, info.st_uid) == (0o600, vm.user.uid)
    assert info.st_blocks * 512 < info.st_size  # sparse

    second = vm.run(work, "cat node_modules/left-pad/index.js > /work/seen", *SIZE)
    assert second.returncode == 0, second.stderr
    assert (work / "seen").read_text() == "kept\n"


def test_no_local_dirs_keeps_everything_on_the_share(vm: VM) -> None:
    work = node_project(vm)
    result = vm.run(work, "mkdir node_modules && echo shared > node_modules/x", "--no-local-dirs")
    assert result.returncode == 0, result.stderr
    assert (work / "node_modules" / "x").read_text() == "shared\n"
    assert images(vm, work) == []


def test_an_explicit_list_replaces_what_the_lockfiles_imply(vm: VM) -> None:
    work = node_project(vm)
    result = vm.run(
        work,
        "echo a > build/out/a && mkdir -p node_modules && echo b > node_modules/b",
        "--local-dirs", "build/out", *SIZE,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert list((work / "build" / "out").iterdir()) == []
    assert (work / "node_modules" / "b").read_text() == "b\n"


def test_a_symlink_the_agent_planted_is_never_mounted_over(vm: VM) -> None:
    work = node_project(vm)
    # The agent, in a run without local dirs, points node_modules at a guest
    # directory it hopes guest root will later bind its own disk over.
    planted = vm.run(work, "ln -s /etc /work/node_modules", "--no-local-dirs")
    assert planted.returncode == 0, planted.stderr
    result = vm.run(work, "echo ran > /work/ran", *SIZE)
    assert result.returncode == 125
    assert not (work / "ran").exists()
    assert (work / "node_modules").is_symlink()


def test_gc_prune_removes_the_disk_of_a_vanished_project(vm: VM) -> None:
    work = node_project(vm)
    result = vm.run(work, "mkdir -p node_modules/p && echo x > node_modules/p/x", *SIZE)
    assert result.returncode == 0, result.stderr
    [image] = images(vm, work)
    shutil.rmtree(work)
    pruned = vm.ops("gc", "--prune", "--yes")
    assert pruned.returncode == 0, pruned.stderr
    assert not image.exists()


def test_two_instances_at_once_each_get_a_disk_of_their_own(vm: VM) -> None:
    work = node_project(vm)
    # Each waits until the other is up, so both disks are mounted at once.
    command = (
        "me=$(cat /proc/sys/kernel/random/uuid); : > /work/up-$me; "
        "n=0; while [ $(ls /work | grep -c '^up-') -lt 2 ] && [ $n -lt 600 ]; do "
        "sleep 0.1; n=$((n + 1)); done; "
        "ls node_modules | wc -l > /work/count-$me; "
        ": > node_modules/mine"
    )
    runs = [vm.start(work, command, *SIZE) for _ in range(2)]
    for run in runs:
        _, err = run.communicate(timeout=300)
        assert run.returncode == 0, err
    counts = sorted(work.glob("count-*"))
    assert [c.read_text() for c in counts] == ["0\n", "0\n"]  # neither saw the other's file
    assert [p.name for p in images(vm, work)] == ["0.img", "1.img"]
