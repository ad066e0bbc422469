"""Dev-shell fixture projects that Nix can build with its sandbox on.

The fixtures (tests/fixtures/devshell) build their shells from
``builtins.derivation`` with no nixpkgs, so their builder must come from
the project itself: ``fixture-bin/bash``, a copy of Debian's statically
linked bash (package ``bash-static``, installed by scripts/setup-host).
``nix print-dev-env`` insists on a builder named ``bash``, and inside the
sandbox there is no ``/bin/bash``, nor the libraries a dynamic one needs.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.support.prereq import require

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "devshell"
STATIC_BASH = Path("/bin/bash-static")


def copy_fixture(name: str, project: Path) -> Path:
    """Copy fixture ``name`` into ``project`` (made if missing), with its builder."""
    require(STATIC_BASH.is_file(), f"{STATIC_BASH} (Debian: apt-get install bash-static)")
    shutil.copytree(FIXTURES / name, project, dirs_exist_ok=True)
    tools = project / "fixture-bin"
    tools.mkdir(exist_ok=True)
    shutil.copy2(STATIC_BASH, tools / "bash")
    return project
