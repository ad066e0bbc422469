from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from microvm_run.spec import SpecError, load_spec, parse_spec


def test_valid_spec_parses_to_typed_values(sample: dict[str, Any]) -> None:
    spec = parse_spec(sample, Path("/specs/claude.toml"))
    assert spec.agent == "claude"
    assert spec.command == ("claude", "--dangerously-skip-permissions")
    assert spec.memory_mib == 4096 and spec.vcpus == 4
    assert spec.kernel == Path("/nix/store/k-linux/bzImage")
    assert [s.source for s in spec.shares] == ["nix-store", "work", "home"]
    assert spec.shares[0].read_only and not spec.shares[1].read_only


def test_relative_paths_resolve_against_the_spec_dir(sample: dict[str, Any]) -> None:
    sample["guest"]["kernel"] = "vmlinuz"
    spec = parse_spec(sample, Path("/guests/test/spec.toml"))
    assert spec.kernel == Path("/guests/test/vmlinuz")


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop("spec_version"), "spec_version"),
        (lambda d: d.update(spec_version=2), "newer than this microvm-run"),
        (lambda d: d.update(extra=1), "unknown key 'extra'"),
        (lambda d: d["agent"].update(name="Bad Name"), "agent.name"),
        (lambda d: d["agent"].update(command=[]), "must not be empty"),
        (lambda d: d["agent"].update(api_key_vars=["1BAD"]), "invalid name"),
        (lambda d: d["guest"].update(contract=9), "contract 9 is not supported"),
        (lambda d: d["guest"].update(machine="pc"), "guest.machine"),
        (lambda d: d["guest"].update(memory_mib=0), "out of range"),
        (lambda d: d["guest"].update(vcpus="4"), "must be an integer"),
        (lambda d: d["guest"].update(vcpus=True), "must be an integer"),
        (lambda d: d["host"].pop("qemu"), "qemu must be a non-empty string"),
        (lambda d: d["shares"][1].update(source="usb"), "source 'usb'"),
        (lambda d: d["shares"][1].update(mount_point="work"), "must be absolute"),
        (lambda d: d["shares"][1].update(tag="a b"), "tag 'a b'"),
        (lambda d: d["shares"][0].update(read_only=False), "must be read_only"),
        (lambda d: d["shares"][2].update(tag="work"), "same tag 'work'"),
        (lambda d: d["shares"].pop(1), "no share with source 'work'"),
        (lambda d: d.update(shares={}), "array of tables"),
    ],
)
def test_bad_specs_are_rejected_with_one_clear_line(
    sample: dict[str, Any], mutate: Any, message: str
) -> None:
    mutate(sample)
    with pytest.raises(SpecError, match=message) as caught:
        parse_spec(sample, Path("/specs/claude.toml"))
    assert "\n" not in str(caught.value)


def test_load_spec_reports_corrupt_toml(tmp_path: Path) -> None:
    path = tmp_path / "spec.toml"
    path.write_text("spec_version = [\n")
    with pytest.raises(SpecError, match="not valid TOML"):
        load_spec(path)


def test_load_spec_reports_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="cannot read spec"):
        load_spec(tmp_path / "absent.toml")
