"""The dev-shell evaluation keeps every variable a user's Nix set-up is made of.

A multi-user install names its daemon, its configuration and its
certificates through the environment; if the runner dropped one of them,
``nix print-dev-env`` would fall back to defaults that do not work for the
user (tests/integration/test_devshell_daemon.py shows the daemon case with
a real Nix). Here a fake nix records the environment it was given.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.test_devshell import Fake

# What Nix reads its configuration from (Nix manual, "Configuration file"
# and "Environment variables"), and what it needs to reach a daemon or a cache.
NIX_SETUP = {
    "NIX_CONFIG": "store = daemon",
    "NIX_REMOTE": "daemon",
    "NIX_PATH": "nixpkgs=/some/where",
    "NIX_SSL_CERT_FILE": "/etc/ssl/certs/ca-certificates.crt",
    "NIX_USER_CONF_FILES": "/home/u/nix.conf",
    "NIX_CONF_DIR": "/etc/nix-elsewhere",
    "XDG_CONFIG_HOME": "/home/u/.config",
    "XDG_CONFIG_DIRS": "/etc/xdg:/opt/xdg",
    "XDG_CACHE_HOME": "/home/u/.cache",
    "HOME": "/home/u",
}

ENV_DUMPING_NIX = """#!/bin/sh
export -p > "$FAKE_CALLS.env"
cat "$FAKE_JSON"
"""


@pytest.fixture
def fake(tmp_path: Path) -> Fake:
    fake = Fake(tmp_path)
    (fake.bin / "nix").write_text(ENV_DUMPING_NIX)
    return fake


def test_every_nix_setting_variable_reaches_the_evaluation(fake: Fake) -> None:
    result, _ = fake.prepare(env={**fake.env, **NIX_SETUP})
    assert result.status == "evaluated"
    seen = (fake.calls.parent / "calls.env").read_text()
    missing = [
        name
        for name, value in NIX_SETUP.items()
        if f"{name}='{value}'" not in seen and f'{name}="{value}"' not in seen
    ]
    assert missing == []
