"""The --net modes, a closed set (README "Threat model"; netpolicy.py says
what each allows).  A module of their own so that what only records or reads
an instance's mode (state.py, and with it `ps`) does not load the policy."""

from __future__ import annotations

from enum import StrEnum


class NetMode(StrEnum):
    """--net: what the guest may reach (README "Threat model")."""

    OPEN = "open"
    ALLOWLIST = "allowlist"
    NONE = "none"


# Accepted for compatibility with earlier releases, where "user" was the
# default (QEMU user networking, host loopback reachable).  It now means open.
NET_ALIASES = {"user": NetMode.OPEN}
