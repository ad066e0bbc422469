"""safefs: what the runner may open in a tree the guest writes."""

from __future__ import annotations

import os
import pickle
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
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
    repair = safefs.strip_unsafe_modes(root, os.getuid())
    assert (repair.setid, repair.failed) == (["d/tool"], [])
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
    (root / "gdir").mkdir()
    (root / "gdir").chmod(0o2775)
    assert safefs.strip_unsafe_modes(root, os.getuid()) == safefs.ModeRepair()
    # Group write too: on NixOS every user is in the group `users`.
    assert stat.S_IMODE((root / "open").stat().st_mode) == 0o755
    assert stat.S_IMODE((root / "open" / "script").stat().st_mode) == 0o755
    assert stat.S_IMODE((root / "group").stat().st_mode) == 0o644
    assert stat.S_IMODE((root / "gdir").stat().st_mode) == 0o2755


NOBODY = 65534


def strip_as_the_owner(root: Path) -> safefs.ModeRepair:
    """strip_unsafe_modes as an unprivileged owner of ``root``, for whom
    permission bits count (root's would open a mode-0 directory anyway)."""
    if os.geteuid() != 0:
        return safefs.strip_unsafe_modes(root, os.getuid())
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            mode = os.lstat(path).st_mode
            os.chown(path, NOBODY, NOBODY, follow_symlinks=False)
            os.chmod(path, stat.S_IMODE(mode))  # chown cleared the set-id bits
    os.chown(root, NOBODY, NOBODY)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            os.write(write_end, pickle.dumps(safefs.strip_unsafe_modes(root, NOBODY)))
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        data = reader.read()
    os.waitpid(pid, 0)
    repair: safefs.ModeRepair = pickle.loads(data)
    return repair


@pytest.fixture
def open_root() -> Iterator[Path]:
    """A share root every user can reach (tmp_path's parents are root's own)."""
    top = Path(tempfile.mkdtemp(prefix="amvm-strip-"))
    top.chmod(0o755)
    try:
        yield top / "root"
    finally:
        for dirpath, dirnames, _ in os.walk(top):
            for name in dirnames:
                os.chmod(os.path.join(dirpath, name), 0o700)
        shutil.rmtree(top)


@pytest.mark.parametrize("hidden_mode", [0o111, 0o000, 0o300, 0o400])
def test_a_directory_the_guest_made_unreadable_is_opened_and_cleared(
    open_root: Path, hidden_mode: int
) -> None:
    root = open_root
    hidden = root / "hidden"
    (hidden / "inner").mkdir(parents=True)
    (hidden / "inner" / "tool").write_text("")
    (hidden / "inner" / "tool").chmod(0o4755)
    (hidden / "inner").chmod(hidden_mode)
    hidden.chmod(hidden_mode)
    repair = strip_as_the_owner(root)
    assert (repair.setid, repair.failed) == (["hidden/inner/tool"], [])
    assert stat.S_IMODE((hidden / "inner" / "tool").stat().st_mode) == 0o755
    assert stat.S_IMODE(hidden.stat().st_mode) & 0o700 == 0o700


DEPTH = 2100  # deeper than the recursion limit, and a path longer than PATH_MAX


def remove_chain(fd: int) -> None:
    """Remove a chain of ``d`` directories from its bottom ``fd`` (closed)
    up, without recursion (pytest's clean-up would raise RecursionError)."""
    for _ in range(DEPTH):
        parent = os.open("..", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = parent
        os.rmdir("d", dir_fd=fd)
    os.close(fd)


def test_a_chain_deeper_than_any_recursion_is_walked_to_the_end(root: Path) -> None:
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(DEPTH):
        os.mkdir("d", dir_fd=fd)
        child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = child
    try:
        tool = os.open("tool", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.fchmod(tool, 0o6777)
        os.close(tool)
        repair = safefs.strip_unsafe_modes(root, os.getuid())
        assert repair.failed == []
        assert repair.setid == ["/".join(["d"] * DEPTH + ["tool"])]
        assert stat.S_IMODE(os.stat("tool", dir_fd=fd).st_mode) == 0o755
    finally:
        os.unlink("tool", dir_fd=fd)
        remove_chain(fd)


def test_a_missing_root_is_nothing_to_do(tmp_path: Path) -> None:
    assert safefs.strip_unsafe_modes(tmp_path / "gone", os.getuid()) == safefs.ModeRepair()


def test_a_root_owned_by_someone_else_is_reported(tmp_path: Path) -> None:
    repair = safefs.strip_unsafe_modes(tmp_path, os.getuid() + 1)
    assert repair.setid == [] and len(repair.failed) == 1


def test_guest_names_are_shown_escaped() -> None:
    assert safefs.shown("a\x1b]0;pwned\x07\nb") == "a\\x1b]0;pwned\\x07\\x0ab"
    assert safefs.shown(os.fsdecode(b"caf\xc3\xa9 \xff")) == "caf\\xc3\\xa9 \\xff"


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


def test_a_resolved_path_opens_only_if_no_component_became_a_symlink(tmp_path: Path) -> None:
    project = tmp_path / "outer" / "proj"
    project.mkdir(parents=True)
    fd = safefs.open_resolved_dir(project)
    try:
        assert os.fstat(fd).st_ino == project.stat().st_ino
    finally:
        os.close(fd)
    # An agent on the outer directory swaps a component for a symlink.
    (tmp_path / "elsewhere" / "proj").mkdir(parents=True)
    (tmp_path / "outer").rename(tmp_path / "outer.real")
    (tmp_path / "outer").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(safefs.UnsafeFile, match="changed after it was resolved"):
        safefs.open_resolved_dir(project)
    with pytest.raises(ValueError):
        safefs.open_resolved_dir(Path("relative"))


def test_a_directory_with_more_names_than_the_cap_is_refused_not_listed(tmp_path: Path) -> None:
    for i in range(5):
        (tmp_path / f"f{i}").write_text("")
    with safefs.opened_dir(tmp_path) as fd:
        assert sorted(safefs.names_in(fd, limit=5)) == [f"f{i}" for i in range(5)]
        with pytest.raises(safefs.UnsafeFile, match="more than 4 entries"):
            safefs.names_in(fd, limit=4)
