"""Where an agent's persistent home lives for a project.

The formula matches the reference setup (systemstart/claude-microvm), so
users who move over keep their agent logins:

    $XDG_DATA_HOME/<agent>-microvm/<basename>-<hash>

basename: the work dir's last component with everything but [A-Za-z0-9_-]
removed, cut to 12 characters, or ``root`` when nothing is left;
hash: the first 12 hex digits of sha256 over the resolved (symlink-free)
absolute path, UTF-8, no trailing newline.
"""

from __future__ import annotations

import re
from pathlib import Path

_NOT_NAME = re.compile(r"[^A-Za-z0-9_-]")


def project_basename(work_dir: Path) -> str:
    """The work dir's name as it appears in host-visible identifiers."""
    return _NOT_NAME.sub("", work_dir.name)[:12] or "root"


def project_hash(work_dir: Path) -> str:
    # hashlib loads OpenSSL (about 3 ms): `ps` and `gc` without instances never hash.
    import hashlib  # noqa: PLC0415

    return hashlib.sha256(str(work_dir).encode()).hexdigest()[:12]


def agent_home(agent: str, work_dir: Path, data_home: Path) -> Path:
    """The default agent home; ``work_dir`` must already be resolved."""
    return data_home / f"{agent}-microvm" / f"{project_basename(work_dir)}-{project_hash(work_dir)}"
