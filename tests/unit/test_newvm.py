"""newvm: the plan of `microvm-run new` from a request and what was observed (pure)."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

import pytest

from microvm_run import newvm
from microvm_run.newvm import (
    Clone,
    MakeDir,
    NewError,
    NewRefused,
    Observed,
    Request,
    WriteFile,
    plan_new,
)

REPO = Path(__file__).resolve().parents[2]
PROJECT = Path("/p")
HOST = Path("/etc/nixos")


def flavor(name: str = "web", **kw: object) -> Request:
    return Request(name=name, mode="flavor", project=PROJECT, **kw)  # type: ignore[arg-type]


def host(name: str = "web", **kw: object) -> Request:
    kw.setdefault("state_root", Path("/srv/vms"))
    kw.setdefault("workspace_root", Path("/srv/ws"))
    kw.setdefault("user", "alice")
    return Request(name=name, mode="host", host_config=HOST, **kw)  # type: ignore[arg-type]


def written(plan: newvm.Plan, path: Path) -> str:
    texts = [a.text for a in plan.actions if isinstance(a, WriteFile) and a.path == path]
    assert len(texts) == 1, plan.actions
    return texts[0]


def test_agents_are_the_flavors_of_lib_flavors_nix() -> None:
    # The table's entries: its top-level attributes, two spaces in.
    text = (REPO / "lib" / "flavors.nix").read_text()
    names = re.findall(r"^  ([a-z][a-z0-9-]*) = \{$", text, re.M)
    assert names and tuple(sorted(names)) == newvm.AGENTS


@pytest.mark.parametrize(
    "name", ["", "Web", "1web", "-web", "web-", "we_b", "web.x", "a" * 33, "web\n", "we b"]
)
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(NewError, match="bad VM name"):
        plan_new(flavor(name), Observed(managed=None))


@pytest.mark.parametrize("name", ["a", "web", "my-vm-2", "a" * 32])
def test_good_names_pass(name: str) -> None:
    assert newvm.check_name(name) == name


@pytest.mark.parametrize("package", ["", "pkgs go", "go;", "${x}", ".go", "go.", "a..b", "-x"])
def test_bad_packages_are_refused(package: str) -> None:
    with pytest.raises(NewError, match="bad package"):
        plan_new(flavor(packages=(package,)), Observed(managed=None))


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"agent": "copilot"}, "unknown agent"),
        ({"memory_mib": 10}, "--memory"),
        ({"vcpus": 0}, "--vcpus"),
        ({"vcpus": 1000}, "--vcpus"),
        ({"clone": "https://x/y"}, "--clone needs --host-config"),
    ],
)
def test_bad_flavor_options_are_refused(kw: dict[str, object], match: str) -> None:
    with pytest.raises(NewError, match=match):
        plan_new(flavor("web", **kw), Observed(managed=None))


def test_detection_maps_project_files_to_packages_in_order_without_repeats() -> None:
    files = frozenset({"go.mod", "Cargo.toml", "pyproject.toml", "package.json"})
    assert newvm.detect(files, None) == (
        ("go", "gopls", "nodejs", "rustc", "cargo", "python3", "uv"),
        (),
    )
    assert newvm.detect(frozenset(), None) == ((), ())


def test_a_flake_dev_shell_suggests_direnv_allow_instead_of_packages() -> None:
    flake = "{ outputs = _: { devShells.x86_64-linux.default = 1; }; }"
    packages, notes = newvm.detect(frozenset({"flake.nix", "go.mod"}), flake)
    assert packages == ()
    assert "DIRENV_ALLOW=1" in notes[0]


def test_a_flake_without_a_dev_shell_does_not_stop_detection() -> None:
    assert newvm.detect(frozenset({"flake.nix", "go.mod"}), "{ outputs = _: {}; }")[0] == (
        "go",
        "gopls",
    )


def test_a_new_flavor_writes_agent_nix_and_a_flake_and_names_the_next_commands() -> None:
    seen = Observed(managed=None, files=frozenset({"go.mod"}), git=True)
    plan = plan_new(flavor(memory_mib=8192, vcpus=8, cri=True, packages=("postgresql",)), seen)
    text = written(plan, PROJECT / "agent.nix")
    assert "{ agent-microvm }:" in text
    assert "web = agent-microvm.lib.mkAgentVM {" in text
    assert 'agent = "claude";' in text
    assert "cri = true;" in text
    assert "pkgs.go\n" in text and "pkgs.gopls\n" in text and "pkgs.postgresql\n" in text
    assert "agentVM.resources.memoryMiB = 8192;" in text
    assert "agentVM.resources.vcpus = 8;" in text
    assert "import ./agent.nix" in written(plan, PROJECT / "flake.nix")
    assert plan.next_steps == ("microvm-run check", "nix run .#web")
    assert any("git add flake.nix agent.nix" in n for n in plan.notes)


def test_a_users_own_flake_is_left_alone_and_the_wiring_is_shown() -> None:
    flake = "{ outputs = _: { }; }"
    plan = plan_new(flavor(), Observed(managed=None, flake=flake, files=frozenset({"flake.nix"})))
    assert [a.path for a in plan.actions if isinstance(a, WriteFile)] == [PROJECT / "agent.nix"]
    assert any("import ./agent.nix" in n for n in plan.notes)


def test_the_same_request_again_changes_nothing() -> None:
    first = plan_new(flavor(), Observed(managed=None))
    text = written(first, PROJECT / "agent.nix")
    flake = written(first, PROJECT / "flake.nix")
    again = plan_new(flavor(), Observed(managed=text, flake=flake))
    assert again.actions == ()
    assert again.changes == ()


def test_a_second_vm_is_added_before_the_tail_and_the_first_is_kept() -> None:
    text = written(plan_new(flavor("web"), Observed(managed=None)), PROJECT / "agent.nix")
    both = written(
        plan_new(flavor("api", agent="codex"), Observed(managed=text, flake="import ./agent.nix")),
        PROJECT / "agent.nix",
    )
    assert both.index("web = ") < both.index("api = ") < both.index(newvm.TAIL)
    assert set(newvm.parse_managed(both, PROJECT).entries) == {"web", "api"}


def test_other_settings_need_replace_and_replace_rewrites_only_that_entry() -> None:
    text = written(plan_new(flavor("web"), Observed(managed=None)), PROJECT / "agent.nix")
    text = written(plan_new(flavor("api"), Observed(managed=text, flake="")), PROJECT / "agent.nix")
    seen = Observed(managed=text, flake="import ./agent.nix")
    with pytest.raises(NewRefused, match="--replace"):
        plan_new(flavor("web", vcpus=2), seen)
    new = written(plan_new(flavor("web", vcpus=2, replace=True), seen), PROJECT / "agent.nix")
    entries = newvm.parse_managed(new, PROJECT).entries
    assert "vcpus = 2" in entries["web"].body
    assert entries["api"].body == newvm.parse_managed(text, PROJECT).entries["api"].body
    assert not any(e.edited for e in entries.values())


def test_an_entry_changed_by_hand_is_never_replaced() -> None:
    text = written(plan_new(flavor("web"), Observed(managed=None)), PROJECT / "agent.nix")
    edited = text.replace('agent = "claude";', 'agent = "claude"; # mine')
    seen = Observed(managed=edited, flake="import ./agent.nix")
    for request in (flavor("web", vcpus=2), flavor("web", vcpus=2, replace=True)):
        with pytest.raises(NewRefused, match="changed by hand"):
            plan_new(request, seen)
    # Asking for what is there is fine only if it matches exactly; the edit stays.
    assert newvm.parse_managed(edited, PROJECT).entries["web"].edited


@pytest.mark.parametrize(
    "text",
    [
        "{ }\n",
        f"{{\n  {newvm.TAIL}\n  {newvm.TAIL}\n}}\n",
        f"{{\n  {newvm.MARK} begin web\n  web = 1;\n  {newvm.TAIL}\n}}\n",
        f"{{\n  web = 1;\n  {newvm.MARK} end web 0123456789ab\n  {newvm.TAIL}\n}}\n",
    ],
)
def test_a_file_new_did_not_make_or_with_broken_markers_is_refused(text: str) -> None:
    with pytest.raises(NewRefused):
        plan_new(flavor(), Observed(managed=text))


def test_a_host_vm_gets_the_first_free_address_a_derived_mac_and_its_dirs() -> None:
    plan = plan_new(host(packages=("git",)), Observed(managed=None))
    text = written(plan, HOST / "agent-vms.nix")
    assert "{ pkgs, ... }:" in text
    assert "services.agent-microvm.vms.web = {" in text
    assert 'address = "10.77.0.2";' in text
    assert 'mac = "02:00:0a:4d:00:02";' in text
    assert 'workspace = "/srv/ws/web";' in text
    assert 'user = "alice";' in text
    assert "packages = [\n      pkgs.git\n    ];" in text
    assert [a for a in plan.actions if isinstance(a, MakeDir)] == [
        MakeDir(Path("/srv/vms/web"), 0o700),
        MakeDir(Path("/srv/ws/web"), 0o755),
    ]
    assert plan.address == "10.77.0.2"


def test_host_option_names_come_from_the_one_table() -> None:
    text = written(
        plan_new(host(memory_mib=2048, vcpus=2, cri=True, packages=("go",)), Observed(None)),
        HOST / "agent-vms.nix",
    )
    for option in newvm.HOST_VM_OPTIONS.values():
        assert re.search(rf"^    {option} = ", text, re.M), option


def test_addresses_skip_used_ones_and_an_entry_keeps_its_own() -> None:
    text = written(plan_new(host("a"), Observed(None)), HOST / "agent-vms.nix")
    text = text.replace(newvm.TAIL, f'# by hand: address = "10.77.0.3";\n  {newvm.TAIL}')
    b = plan_new(host("b"), Observed(text))
    assert b.address == "10.77.0.4"
    text_b = written(b, HOST / "agent-vms.nix")
    assert plan_new(host("a"), Observed(text_b)).address == "10.77.0.2"
    assert plan_new(host("a"), Observed(text_b)).actions == (
        MakeDir(Path("/srv/vms/a"), 0o700),
        MakeDir(Path("/srv/ws/a"), 0o755),
    )


@pytest.mark.parametrize(
    ("address", "match"),
    [
        ("10.77.1.2", "not in the subnet"),
        ("10.77.0.0", "not a host"),
        ("10.77.0.255", "not a host"),
        ("10.77.0.1", "the host's own"),
    ],
)
def test_bad_addresses_are_refused(address: str, match: str) -> None:
    with pytest.raises(NewError, match=match):
        plan_new(host(address=ipaddress.IPv4Address(address)), Observed(None))


def test_an_address_in_use_by_another_vm_is_refused() -> None:
    text = written(plan_new(host("a"), Observed(None)), HOST / "agent-vms.nix")
    with pytest.raises(NewError, match="already used"):
        plan_new(host("b", address=ipaddress.IPv4Address("10.77.0.2")), Observed(text))


def test_a_full_subnet_is_refused() -> None:
    subnet = ipaddress.IPv4Network("10.9.0.0/30")  # .1 host, .2 the only VM
    text = written(plan_new(host("a", subnet=subnet), Observed(None)), HOST / "agent-vms.nix")
    with pytest.raises(NewError, match="no free address"):
        plan_new(host("b", subnet=subnet), Observed(text))


def test_clone_goes_into_an_empty_workspace_only() -> None:
    url = "https://example.org/x.git"
    plan = plan_new(host(clone=url), Observed(None))
    assert Clone(url, Path("/srv/ws/web")) in plan.actions
    ws = frozenset({Path("/srv/ws/web"), Path("/srv/vms/web")})
    with pytest.raises(NewRefused, match="not empty"):
        plan_new(host(clone=url), Observed(None, existing_dirs=ws, workspace_empty=False))
    again = plan_new(
        host(clone=url),
        Observed(None, existing_dirs=ws, workspace_empty=False, workspace_origin=url),
    )
    assert not any(isinstance(a, Clone) for a in again.actions)


@pytest.mark.parametrize("user", ["", "Alice", "al ice", "-x", "a" * 40])
def test_bad_users_are_refused(user: str) -> None:
    with pytest.raises(NewError, match="--user"):
        plan_new(host(user=user), Observed(None))


@pytest.mark.parametrize("url", ["-uhttps://x", "", "https://x/y z", "x\ny", "a;b"])
def test_bad_clone_urls_are_refused(url: str) -> None:
    with pytest.raises(NewError, match="--clone"):
        plan_new(host(clone=url), Observed(None))


def test_nix_strings_are_escaped() -> None:
    text = written(
        plan_new(host(workspace=Path('/srv/a"${b}\\c')), Observed(None)), HOST / "agent-vms.nix"
    )
    assert 'workspace = "/srv/a\\"\\${b}\\\\c";' in text
