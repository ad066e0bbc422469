"""DIRENV_ALLOW bound to content, as ``direnv allow`` is.

The agent writes the project, and the host evaluates the project's dev
shell: consent given once must not cover whatever the agent writes later.
So the runner remembers, outside the project (in its own per-project state
dir), a digest of every file that defines the shell at the moment the user
allowed it.  Later launches evaluate only that content; changed files are
not evaluated until the user allows the new digest by value
(``DIRENV_ALLOW=<digest>``), after reviewing the change.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from microvm_run import safefs
from microvm_run.atomic import make_private_dir

RECORD = "devshell-allowed.json"
RECORD_VERSION = 1
# Enough of the digest to name it in a message and type it back.
SHOWN = 16
MAX_RECORD_BYTES = 1 << 20
_HEX = re.compile(r"[0-9a-f]{12,64}")


def digest(files: Mapping[str, str]) -> str:
    """One digest over every (name, content digest) pair, length-prefixed."""
    h = hashlib.sha256()
    for name in sorted(files):
        for part in (name, files[name]):
            raw = os.fsencode(part)  # a name that is not UTF-8 too
            h.update(f"{len(raw)}:".encode() + raw)
    return h.hexdigest()


def is_allow_value(value: str | None) -> bool:
    """DIRENV_ALLOW=1, or a digest (prefix) the runner printed."""
    return value == "1" or (value is not None and _HEX.fullmatch(value) is not None)


@dataclass(frozen=True)
class Decision:
    allowed: bool
    message: str | None  # one line for the user when not allowed


def decide(
    state_dir: Path,
    files: Mapping[str, str],
    allow: str,
    *,
    may_record: bool = True,
    write: bool = True,
) -> Decision:
    """May these files be evaluated?  Records a new consent when given.

    ``may_record`` False (another VM on the project could be changing the
    files right now): only a consent given before counts.  ``write`` False
    (--dry-run): the same answer, and a consent that would be recorded is not.
    """
    current = digest(files)
    shown = current[:SHOWN]
    encoded = _encode(files, current)
    if len(encoded) > MAX_RECORD_BYTES:
        # Never write a record the reader would refuse: the next launch
        # would find no valid record, not the consent given here.
        return Decision(
            False,
            f"dev shell not evaluated: its {len(files)} files are too many to record a "
            f"consent for ({len(encoded)} bytes, limit {MAX_RECORD_BYTES})",
        )
    try:
        record = _read(state_dir)
    except DamagedRecord as damaged:
        if allow != "1" and current.startswith(allow):
            # Allowed by value: the user reviewed exactly this content.
            return _record(state_dir, encoded) if write else Decision(True, None)
        # A record that cannot be read is not "never allowed": the first
        # DIRENV_ALLOW=1 would then allow whatever the agent wrote.
        return Decision(
            False,
            f"dev shell not evaluated: the consent record {state_dir / RECORD} is "
            f"unusable ({damaged}); review the files, then allow them with "
            f"DIRENV_ALLOW={shown}",
        )
    if not may_record and (allow != "1" or record is None):
        return Decision(
            False,
            "dev shell not evaluated: another VM runs on this project, and its agent "
            "could be changing the files you would allow",
        )
    if allow != "1":
        if current.startswith(allow):
            return _record(state_dir, encoded) if write else Decision(True, None)
        return Decision(
            False,
            f"DIRENV_ALLOW={allow} does not match the dev shell's files now "
            f"(digest {shown}); review them, then allow with DIRENV_ALLOW={shown}",
        )
    if record is None:
        # The first DIRENV_ALLOW=1 for this project is the user's consent to
        # what is there now, as `direnv allow` is.
        return _record(state_dir, encoded) if write else Decision(True, None)
    allowed_digest, allowed_files = record
    if allowed_digest == current:
        return Decision(True, None)
    changed = sorted(
        name
        for name in set(files) | set(allowed_files)
        if files.get(name) != allowed_files.get(name)
    )
    # The agent chose these names: escaped, they can drive no terminal.
    named = ", ".join(safefs.shown(name) for name in changed[:5])
    named += f" and {len(changed) - 5} more" if len(changed) > 5 else ""
    return Decision(
        False,
        f"dev shell not evaluated: {named} changed since you allowed it; review the "
        f"change, then allow it with DIRENV_ALLOW={shown}",
    )


class DamagedRecord(Exception):
    """The consent record exists but cannot be used; the reason in a few words."""


def _read(state_dir: Path) -> tuple[str, dict[str, str]] | None:
    """The recorded consent; None only when there is none (no file, no dir)."""
    try:
        with safefs.opened_dir(state_dir) as fd:
            raw = safefs.read_regular(fd, RECORD, MAX_RECORD_BYTES)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise DamagedRecord(getattr(error, "strerror", None) or str(error)) from None
    if raw is None:
        return None
    try:
        data = json.loads(raw)
        files = data["files"]
        if data.get("version") != RECORD_VERSION or not isinstance(files, dict):
            raise DamagedRecord("unknown version or format")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
            raise DamagedRecord("unknown format")
        return str(data["digest"]), files
    except (ValueError, KeyError, TypeError, RecursionError):
        raise DamagedRecord("not a consent record") from None


def _encode(files: Mapping[str, str], current: str) -> bytes:
    data = {"version": RECORD_VERSION, "digest": current, "files": dict(files)}
    return json.dumps(data, indent=1).encode()


def _record(state_dir: Path, encoded: bytes) -> Decision:
    """Allowed once the consent is written; a consent not kept allows nothing."""
    try:
        _write(state_dir, encoded)
    except OSError as error:
        return Decision(
            False,
            f"dev shell not evaluated: cannot record your consent in {state_dir / RECORD} "
            f"({error.strerror or error})",
        )
    return Decision(True, None)


def _write(state_dir: Path, encoded: bytes) -> None:
    make_private_dir(state_dir)
    with safefs.opened_dir(state_dir) as fd, contextlib.suppress(FileNotFoundError):
        safefs.write_replacing(fd, RECORD, encoded, 0o600)
