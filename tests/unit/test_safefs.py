"""safefs: what the runner may open in a tree the guest writes."""

from __future__ import annotations

import os
import stat
import threading
import time
from pathlib import Path

import pytest

from microvm_run import safefs
from microvm_run.safefs import UnsafeFile


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "share"
    path.mkdir(mode=0o700)
    return path


def read(root: Path, relative: str, limit: int = 1024) -> bytes | None:
    with safefs.opened_dir(root) as fd:
        return safefs.read_regular(fd, relative, limit)


def test_a_regular_file_is_read_and_an_absent_one_is_none(root: Path) -> None:
    (root / "sub").mkdir()
    (root / "sub" / "f").write_bytes(b"data")
    assert read(root, "sub/f") == b"data"
    assert read(root, "missing") is None
    assert read(root, "nodir/missing") is None


def test_a_symlinked_file_is_refused_not_followed(root: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("key")
    (root / "link").symlink_to(secret)
    with pytest.raises(UnsafeFile, match="is a symlink"):
        read(root, "link")


def test_a_symlinked_directory_on_the_way_is_refused(root: Path, tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "f").write_text("outside")
    (root / "d").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UnsafeFile, match="on the way is a symlink"):
        read(root, "d/f")


def test_a_fifo_is_refused_at_once_without_blocking(root: Path) -> None:
    os.mkfifo(root / "fifo")
    started = time.monotonic()
    with pytest.raises(UnsafeFile, match="not a regular file"):
        read(root, "fifo")
    assert time.monotonic() - started < 1


def test_a_device_through_a_link_and_a_device_itself_are_refused(root: Path) -> None:
    (root / "zero").symlink_to("/dev/zero")
    with pytest.raises(UnsafeFile):
        read(root, "zero")
    with safefs.opened_dir(Path("/dev")) as fd, pytest.raises(UnsafeFile, match="not a regular"):
        safefs.read_regular(fd, "zero", 1024)


def test_an_oversized_file_is_refused(root: Path) -> None:
    (root / "big").write_bytes(b"x" * 1025)
    with pytest.raises(UnsafeFile, match="larger than 1024"):
        read(root, "big")
    (root / "fits").write_bytes(b"x" * 1024)
    assert read(root, "fits") == b"x" * 1024


def test_dotdot_and_absolute_paths_are_not_accepted(root: Path) -> None:
    for bad in ("../etc/passwd", "/etc/passwd", "a/../../b"):
        with pytest.raises(ValueError):
            read(root, bad)


def test_write_replacing_replaces_a_planted_symlink_and_leaves_its_target(
    root: Path, tmp_path: Path
) -> None:
    victim = tmp_path / "bashrc"
    victim.write_text("mine\n")
    (root / "report").symlink_to(victim)
    with safefs.opened_dir(root) as fd:
        safefs.write_replacing(fd, "report", b"new", 0o644)
    assert victim.read_text() == "mine\n"
    assert not (root / "report").is_symlink() and (root / "report").read_bytes() == b"new"
    assert stat.S_IMODE((root / "report").stat().st_mode) == 0o644
    assert [p.name for p in root.iterdir()] == ["report"]  # no temp file left


def test_remove_unlinks_a_symlink_not_its_target(root: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("x")
    (root / "link").symlink_to(victim)
    with safefs.opened_dir(root) as fd:
        safefs.remove(fd, "link")
        safefs.remove(fd, "absent")
    assert victim.exists() and not (root / "link").is_symlink()


def test_a_share_root_must_be_a_real_directory_of_the_user(root: Path, tmp_path: Path) -> None:
    uid = os.getuid()
    link = tmp_path / "link"
    link.symlink_to(root)
    with pytest.raises(UnsafeFile, match="not a real directory"):
        safefs.check_share_root(link, uid)
    with pytest.raises(UnsafeFile, match="owned by uid"):
        safefs.check_share_root(root, uid + 1)


def test_a_share_root_gets_its_mode_back(root: Path) -> None:
    root.chmod(0o777)
    os.close(safefs.check_share_root(root, os.getuid(), 0o700))
    assert stat.S_IMODE(root.stat().st_mode) == 0o700


def test_strip_unsafe_modes_clears_the_bits_and_follows_no_link(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside-suid"
    outside.write_text("")
    outside.chmod(0o4755)
    (root / "d").mkdir()
    (root / "d" / "tool").write_text("")
    (root / "d" / "tool").chmod(0o6755)
    (root / "plain").write_text("")
    (root / "plain").chmod(0o644)
    (root / "link").symlink_to(outside)
    (root / "dirlink").symlink_to(tmp_path)
    fixed = safefs.strip_unsafe_modes(root, os.getuid())
    assert fixed == ["d/tool"]
    assert stat.S_IMODE((root / "d" / "tool").stat().st_mode) == 0o755
    assert stat.S_IMODE((root / "plain").stat().st_mode) == 0o644
    assert stat.S_IMODE(outside.stat().st_mode) == 0o4755  # not ours to touch


def test_strip_unsafe_modes_also_closes_what_the_guest_opened_to_everyone(root: Path) -> None:
    (root / "open").mkdir()
    (root / "open").chmod(0o777)
    (root / "open" / "script").write_text("")
    (root / "open" / "script").chmod(0o777)
    (root / "group").write_text("")
    (root / "group").chmod(0o664)
    assert safefs.strip_unsafe_modes(root, os.getuid()) == []
    assert stat.S_IMODE((root / "open").stat().st_mode) == 0o775
    assert stat.S_IMODE((root / "open" / "script").stat().st_mode) == 0o775
    assert stat.S_IMODE((root / "group").stat().st_mode) == 0o664


def test_a_directory_swapped_for_a_symlink_mid_walk_is_not_followed(
    root: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x").write_text("")
    (outside / "x").chmod(0o4755)
    for n in range(50):
        (root / f"d{n}").mkdir()
    stop = threading.Event()

    def swap() -> None:
        while not stop.is_set():
            for n in range(50):
                path = root / f"d{n}"
                try:
                    path.rmdir()
                    path.symlink_to(outside)
                    path.unlink()
                    path.mkdir()
                except OSError:
                    pass

    worker = threading.Thread(target=swap)
    worker.start()
    try:
        for _ in range(20):
            safefs.strip_unsafe_modes(root, os.getuid())
    finally:
        stop.set()
        worker.join()
    assert stat.S_IMODE((outside / "x").stat().st_mode) == 0o4755
