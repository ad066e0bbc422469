"""The open-file bound of virtiofsd: a cheap count and a clear warning."""

from __future__ import annotations

import os
from pathlib import Path

from microvm_run import doctor, openfiles


def tree(root: Path, dirs: int, files_per_dir: int) -> int:
    for d in range(dirs):
        sub = root / f"d{d}"
        sub.mkdir()
        for f in range(files_per_dir):
            (sub / f"f{f}").write_text("")
    return dirs * (files_per_dir + 1)


def test_the_count_sees_every_file_and_directory(tmp_path: Path) -> None:
    total = tree(tmp_path, 5, 7)
    assert openfiles.count_entries(tmp_path, 10_000) == total


def test_the_count_stops_at_the_bound(tmp_path: Path) -> None:
    tree(tmp_path, 5, 7)
    assert openfiles.count_entries(tmp_path, 12) == 12


def test_the_count_follows_no_symlink(tmp_path: Path) -> None:
    (tmp_path / "project").mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    tree(outside, 3, 3)
    (tmp_path / "project" / "link").symlink_to(outside)
    (tmp_path / "project" / "loop").symlink_to(tmp_path / "project")
    assert openfiles.count_entries(tmp_path / "project", 10_000) == 2


def test_an_unreadable_directory_counts_as_itself(tmp_path: Path) -> None:
    tree(tmp_path, 2, 2)
    (tmp_path / "d0").chmod(0)
    try:
        expected = 6 if os.geteuid() == 0 else 4  # root reads it anyway
        assert openfiles.count_entries(tmp_path, 10_000) == expected
    finally:
        (tmp_path / "d0").chmod(0o755)


def test_a_project_larger_than_the_limit_gets_one_line_with_the_fix(tmp_path: Path) -> None:
    total = tree(tmp_path, 10, 20)  # 210 entries
    limit = openfiles.RESERVED + total - 1
    line = openfiles.warning(tmp_path, limit)
    assert line is not None and "\n" not in line
    assert f"more than {total - 1} files and directories" in line
    assert f"hard limit on open files: {limit}" in line
    assert "ulimit -Hn" in line
    assert openfiles.warning(tmp_path, limit + 1) is None
    assert openfiles.warning(tmp_path, None) is None


def test_doctor_warns_with_the_fix_or_says_how_much_room_there_is(tmp_path: Path) -> None:
    total = tree(tmp_path, 3, 3)
    tight = doctor.check_open_files(tmp_path, openfiles.RESERVED + total - 1)
    assert tight.status == doctor.WARN
    assert "ulimit -Hn" in tight.line()
    roomy = doctor.check_open_files(tmp_path, 100_000)
    assert roomy.status == doctor.OK
    assert roomy.detail == f"hard limit 100000; {tmp_path} has {total} files and directories"
