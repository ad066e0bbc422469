"""Allowlist presets (presets.py): found by file names, applied only when asked."""

from __future__ import annotations

import pytest

from microvm_run import presets


def test_auto_applies_every_preset_whose_lockfile_the_project_has() -> None:
    uses = presets.resolve(["auto"], ["Cargo.lock", "requirements-dev.txt", "README.md"])
    assert [(u.name, u.found, u.applied) for u in uses] == [
        ("cargo", "Cargo.lock", True),
        ("python", "requirements-dev.txt", True),
    ]


def test_a_named_preset_applies_without_its_file_and_others_are_only_offered() -> None:
    uses = presets.resolve(["go"], ["pnpm-lock.yaml"])
    assert [(u.name, u.found, u.applied) for u in uses] == [
        ("npm", "pnpm-lock.yaml", False),
        ("go", "", True),
    ]
    assert uses[1].hosts == ("proxy.golang.org", "sum.golang.org")


def test_an_unknown_preset_is_refused_with_the_known_names() -> None:
    with pytest.raises(ValueError, match="known: npm, cargo, go, python, nix, or auto"):
        presets.resolve(["pip"], [])


@pytest.mark.parametrize(
    ("name", "lockfile"),
    [("package-lock.json", True), ("requirements.txt", True), ("requirements", False)],
)
def test_lockfile_names(name: str, lockfile: bool) -> None:
    assert presets.is_lockfile(name) is lockfile


def test_every_preset_host_is_a_valid_allowlist_entry() -> None:
    from microvm_run import netpolicy  # noqa: PLC0415

    for preset in presets.PRESETS:
        for entry in preset.hosts:
            assert str(netpolicy.parse_allow(entry)) == entry
