"""atomic.write_atomic: whole files or none, and no temporary files left."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from microvm_run.atomic import make_private_dir, write_atomic


@pytest.mark.parametrize("shared", [False, True])
def test_the_file_is_replaced_whole_with_its_mode_and_nothing_else_stays(
    tmp_path: Path, shared: bool
) -> None:
    target = tmp_path / "entry"
    target.write_text("old")
    write_atomic(target, b"new", 0o640, shared=shared)
    assert target.read_bytes() == b"new"
    assert target.stat().st_mode & 0o777 == 0o640 & ~_umask()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]


def test_a_failed_rename_leaves_the_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "entry"
    target.write_text("old")

    def refuse(*_: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, b"new", shared=True)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.fixture
def umask_000() -> Iterator[None]:
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


@pytest.mark.usefixtures("umask_000")
def test_a_private_dir_and_the_parents_it_makes_are_0700_under_any_umask(
    tmp_path: Path,
) -> None:
    tmp_path.chmod(0o755)
    target = tmp_path / "local" / "state" / "microvm-run"
    make_private_dir(target)
    for made in (tmp_path / "local", tmp_path / "local" / "state", target):
        assert stat.S_IMODE(made.stat().st_mode) == 0o700, made
    # What existed is left as it was; a second call is harmless.
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o755
    make_private_dir(target)


def test_a_file_in_the_way_of_a_private_dir_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "state").write_text("")
    with pytest.raises(FileExistsError):
        make_private_dir(tmp_path / "state")
    with pytest.raises(NotADirectoryError):
        make_private_dir(tmp_path / "state" / "microvm-run")
