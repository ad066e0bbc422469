"""shareroots: the identities the runner checks, and a virtiofsd that never confines itself."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from microvm_run import shareroots


def test_a_process_still_at_the_host_root_is_not_taken_for_a_confined_virtiofsd(
    tmp_path: Path,
) -> None:
    share = tmp_path / "share"
    share.mkdir()
    info = share.stat()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with pytest.raises(shareroots.ShareSwapped, match="did not confine itself"):
            shareroots.confirm(
                [("work", share, child.pid)], {share: (info.st_dev, info.st_ino)}, 0.2
            )
    finally:
        child.kill()
        child.wait()


def test_a_virtiofsd_that_is_gone_is_reported_in_one_line(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    with pytest.raises(shareroots.ShareSwapped, match="cannot tell which directory"):
        shareroots.confirm([("work", tmp_path, child.pid)], {tmp_path: (0, 0)}, 0.2)
