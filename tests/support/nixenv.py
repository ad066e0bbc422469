"""The environment every Nix started by the tests gets: the suite's own configuration.

Nothing of the machine's Nix set-up is read (``/etc/nix/nix.conf``, the
user's ``~/.config/nix``), so a fresh machine and a developer's machine run
the same configuration: ``tests/support/nix-conf/nix.conf``, which says why
each setting is there.
"""

from __future__ import annotations

from pathlib import Path

NIX_CONF_DIR = Path(__file__).resolve().parent / "nix-conf"

NIX_TEST_ENV: dict[str, str] = {
    "NIX_CONF_DIR": str(NIX_CONF_DIR),
    # Set and empty: Nix reads no user configuration file at all.
    "NIX_USER_CONF_FILES": "",
}
