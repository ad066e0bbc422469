"""A directory chain deeper than any recursive walk survives (the guest can make one)."""

from __future__ import annotations

import os
from pathlib import Path


def dig(top: Path, depth: int) -> int:
    """Make ``top/d/d/.../d``, ``depth`` levels below ``top`` (through directory
    fds: the path would outgrow PATH_MAX); returns an fd of the bottom one."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(depth):
        os.mkdir("d", dir_fd=fd)
        below = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = below
    return fd
