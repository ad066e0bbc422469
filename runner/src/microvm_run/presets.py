"""Per-ecosystem allowlist presets, found by the project's lockfiles.

Data, not code: each preset is the files that show the ecosystem is in use
(names at the project's top level, ``*`` as in a shell pattern) and the
hosts its package manager fetches from.  ``--allow-preset NAME`` adds a
preset's hosts to the allowlist, ``--allow-preset auto`` every preset whose
files the project has.  Only names are looked at: no file in the project is
opened (the agent writes them).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass

AUTO = "auto"


@dataclass(frozen=True)
class Preset:
    name: str
    files: tuple[str, ...]  # any one of these at the top level: the project uses it
    hosts: tuple[str, ...]  # allowlist entries (netpolicy.parse_allow)


PRESETS: tuple[Preset, ...] = (
    Preset("npm", ("package-lock.json", "pnpm-lock.yaml"), ("registry.npmjs.org",)),
    Preset("cargo", ("Cargo.lock",), ("index.crates.io", "static.crates.io")),
    Preset("go", ("go.sum",), ("proxy.golang.org", "sum.golang.org")),
    Preset("python", ("uv.lock", "requirements*.txt"), ("pypi.org", "files.pythonhosted.org")),
    Preset(
        "nix",
        ("flake.lock",),
        ("cache.nixos.org", "github.com", "api.github.com", "codeload.github.com"),
    ),
)
NAMES = tuple(preset.name for preset in PRESETS)


@dataclass(frozen=True)
class PresetUse:
    """A preset in a plan: why it is there (the file found), and whether it applies."""

    name: str
    hosts: tuple[str, ...]
    found: str  # the project file that names it; "" when only asked for
    applied: bool


def is_lockfile(name: str) -> bool:
    """Does any preset look for a file of this name?"""
    return any(fnmatch.fnmatchcase(name, pattern) for p in PRESETS for pattern in p.files)


def resolve(wanted: Iterable[str], project_files: Iterable[str]) -> tuple[PresetUse, ...]:
    """Presets asked for (names or ``auto``) and those the project's files suggest.

    Raises ValueError naming an unknown preset.
    """
    asked = set()
    for word in wanted:
        if word != AUTO and word not in NAMES:
            raise ValueError(
                f"--allow-preset {word!r} is not a preset (known: {', '.join(NAMES)}, or auto)"
            )
        asked.add(word)
    files = sorted(project_files)
    uses = []
    for preset in PRESETS:
        found = next(
            (f for f in files for pattern in preset.files if fnmatch.fnmatchcase(f, pattern)), ""
        )
        applied = preset.name in asked or (AUTO in asked and bool(found))
        if applied or found:
            uses.append(PresetUse(preset.name, preset.hosts, found, applied))
    return tuple(uses)
