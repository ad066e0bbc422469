"""Local directories: which, where, and how the plan hands them to the guest."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from microvm_run import contract, localdirs
from microvm_run.cli import main
from microvm_run.plan import PlanError, RunOptions, build_plan
from microvm_run.spec import Spec

from .conftest import make_facts

STATE = Path("/home/alice/.local/state/microvm-run/projects/myproject-0123456789ab")


def test_lockfiles_imply_their_build_trees(tmp_path: Path) -> None:
    for name in ("package-lock.json", "package.json", "Cargo.lock", "uv.lock", ".envrc"):
        (tmp_path / name).write_text("")
    assert localdirs.implied(tmp_path) == ("node_modules", "dist", "target", ".venv", ".direnv")


def test_a_project_without_lockfiles_implies_nothing(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "Cargo.lock").write_text("")  # only the top counts
    assert localdirs.implied(tmp_path) == ()


@pytest.mark.parametrize(
    "raw", ["../x", "/etc", "a/../b", ".git", ".git/hooks", "a//b", "a b/c d/./e", "x;rm"]
)
def test_a_local_dir_must_stay_inside_the_project(raw: str) -> None:
    with pytest.raises(localdirs.LocalDirsError):
        localdirs.parse(raw)


def test_a_local_dir_list_is_split_on_commas_and_spaces_once_each() -> None:
    assert localdirs.parse("node_modules, target build/out,target") == (
        "node_modules",
        "target",
        "build/out",
    )


def test_the_plan_gives_the_guest_a_disk_and_the_list(spec: Spec) -> None:
    facts = make_facts(state_dir=STATE, implied_local_dirs=("node_modules",), local_slot=1)
    plan = build_plan(spec, RunOptions(), facts)
    image = STATE / "local-dirs" / "1.img"
    assert plan.local_dirs == ("node_modules",)
    assert plan.local_image == image
    assert plan.local_size_bytes == localdirs.DEFAULT_SIZE_GIB << 30
    argv = list(plan.qemu_argv)
    drive = argv[argv.index("-drive") + 1]
    assert drive.startswith(f"file={image},") and "format=raw" in drive
    assert f"serial={contract.LOCAL_DISK_SERIAL}" in argv[argv.index("-drive") + 3]
    assert "MICROVM_LOCAL_DIRS=node_modules" in plan.launch_data
    assert f"PYTHONPYCACHEPREFIX={contract.LOCAL_PYCACHE}" in plan.launch_data


@pytest.mark.parametrize("dirs", [(), None])
def test_no_dirs_no_disk(spec: Spec, dirs: tuple[str, ...] | None) -> None:
    facts = make_facts(state_dir=STATE)  # no lockfiles: nothing implied
    plan = build_plan(spec, RunOptions(local_dirs=dirs), facts)
    assert plan.local_image is None
    assert "-drive" not in plan.qemu_argv
    assert "MICROVM_LOCAL_DIRS" not in plan.launch_data
    assert "PYTHONPYCACHEPREFIX" not in plan.launch_data


def test_an_explicit_list_wins_over_the_lockfiles(spec: Spec) -> None:
    facts = make_facts(state_dir=STATE, implied_local_dirs=("node_modules",))
    plan = build_plan(spec, RunOptions(local_dirs=("build",)), facts)
    assert plan.local_dirs == ("build",)
    none = build_plan(spec, RunOptions(local_dirs=()), facts)
    assert none.local_dirs == ()


def test_a_comma_in_the_image_path_is_refused(spec: Spec) -> None:
    facts = make_facts(state_dir=Path("/home/a,b/state"), implied_local_dirs=("target",))
    with pytest.raises(PlanError, match="comma"):
        build_plan(spec, RunOptions(), facts)


def test_the_chosen_cache_mode_applies_to_work_and_home_only(spec: Spec) -> None:
    plan = build_plan(spec, RunOptions(fs_cache="always"), make_facts())
    cache = {d.tag: [a for a in d.argv if a.startswith("--cache=")] for d in plan.virtiofsd}
    assert cache == {
        "ro-store": ["--cache=always"],
        "work": ["--cache=always"],
        "home": ["--cache=always"],
    }
    never = build_plan(spec, RunOptions(fs_cache="never"), make_facts())
    store = next(d for d in never.virtiofsd if d.tag == "ro-store")
    assert "--cache=always" in store.argv  # the immutable store keeps its cache


def test_an_unknown_cache_mode_is_a_plan_error(spec: Spec) -> None:
    with pytest.raises(PlanError, match="--fs-cache"):
        build_plan(spec, RunOptions(fs_cache="writeback"), make_facts())


def test_instances_at_once_each_claim_a_slot_of_their_own(tmp_path: Path) -> None:
    assert localdirs.free_slot(tmp_path) == 0
    first, first_fd = localdirs.claim_slot(tmp_path)
    second, second_fd = localdirs.claim_slot(tmp_path)
    try:
        assert (first, second) == (0, 1)
        assert localdirs.free_slot(tmp_path) == 2
    finally:
        os.close(first_fd)
    assert localdirs.free_slot(tmp_path) == 0  # a runner that ended frees its slot
    os.close(second_fd)


def test_every_slot_in_use_is_one_clear_error(tmp_path: Path) -> None:
    fds = [localdirs.claim_slot(tmp_path)[1] for _ in range(localdirs.MAX_SLOTS)]
    try:
        with pytest.raises(localdirs.LocalDirsError, match="in use"):
            localdirs.claim_slot(tmp_path)
    finally:
        for fd in fds:
            os.close(fd)


def test_an_image_is_sparse_private_and_never_resized(tmp_path: Path) -> None:
    image = localdirs.image_dir(tmp_path / "state") / "0.img"
    assert localdirs.ensure_image(image, 1 << 30)
    for directory in (image.parent, image.parent.parent):
        assert directory.stat().st_mode & 0o777 == 0o700
    info = image.stat()
    assert info.st_size == 1 << 30 and info.st_blocks == 0
    assert info.st_mode & 0o777 == 0o600
    assert not localdirs.ensure_image(image, 2 << 30)
    assert image.stat().st_size == 1 << 30


def test_a_symlink_in_place_of_the_image_is_refused(tmp_path: Path) -> None:
    image = localdirs.image_dir(tmp_path) / "0.img"
    image.parent.mkdir()
    image.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OSError):
        localdirs.ensure_image(image, 1 << 20)
    assert not (tmp_path / "elsewhere").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--local-dirs", "../up"], "inside the project"),
        (["--local-dirs", "a", "--no-local-dirs"], "contradict"),
        (["--local-dirs-size", "0"], "out of range"),
        (["--fs-cache", "sometimes"], "invalid choice"),
    ],
)
def test_bad_local_dir_options_are_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    import tomli_w  # noqa: PLC0415

    from .conftest import SAMPLE  # noqa: PLC0415

    spec = tmp_path / "spec.toml"
    spec.write_bytes(tomli_w.dumps(SAMPLE).encode())
    work = tmp_path / "work"
    work.mkdir()
    env = {"HOME": str(tmp_path), "XDG_RUNTIME_DIR": str(tmp_path / "run"), "PATH": "/bin"}
    code = main(["--spec", str(spec), "--work-dir", str(work), *argv, "--dry-run"], env)
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1
