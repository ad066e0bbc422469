"""atomic.write_atomic: whole files or none, and no temporary files left."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from microvm_run.atomic import write_atomic


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
