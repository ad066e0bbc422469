from __future__ import annotations

import json
import re
import shlex
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from microvm_run.plan import PlanError, RunOptions, build_plan, decide
from microvm_run.spec import Spec, parse_spec

from .conftest import make_facts


def test_plan_is_plain_data_and_serialisable(spec: Spec) -> None:
    plan = build_plan(spec, RunOptions(), make_facts())
    text = json.dumps(plan.to_dict())
    assert "sk-secret" not in text  # keys are named, never carried
    assert plan.to_dict()["credentials"] == [
        ["ANTHROPIC_API_KEY", "/run/user/1000/microvm-run/deadbeef/credentials/ANTHROPIC_API_KEY"]
    ]


def test_runtime_files_live_in_the_instance_dir(spec: Spec) -> None:
    plan = build_plan(spec, RunOptions(), make_facts())
    run = Path("/run/user/1000/microvm-run/deadbeef")
    assert plan.runtime_dir == run
    for path in (plan.status_socket, plan.qmp_socket, plan.launch_file):
        assert path.parent == run
    assert {d.socket.parent for d in plan.virtiofsd} == {run}


def test_one_virtiofsd_per_share_with_user_mapping(spec: Spec) -> None:
    plan = build_plan(spec, RunOptions(), make_facts())
    by_tag = {d.tag: d for d in plan.virtiofsd}
    assert set(by_tag) == {"ro-store", "work", "home"}
    work = by_tag["work"]
    assert work.shared_dir == Path("/home/alice/src/my project!")
    assert work.unit == "myproject-claude-vm-virtiofsd-work-deadbeef"
    assert "--uid-map=:0:1000:1:" in work.argv and "--gid-map=:0:100:1:" in work.argv
    assert "--translate-uid=map:1000:0:1" in work.argv
    assert "--readonly" not in work.argv
    assert "--readonly" in by_tag["ro-store"].argv
    assert by_tag["ro-store"].shared_dir == Path("/nix/store")
    assert not any(arg.startswith("--tag") for arg in work.argv)


def test_only_the_read_only_store_is_cached_for_good(sample: dict[str, Any]) -> None:
    sample["shares"].append(
        {"tag": "cri", "source": "cri-storage", "mount_point": "/var/lib/containers"}
    )
    plan = build_plan(parse_spec(sample, Path("/s.toml")), RunOptions(), make_facts())
    cache = {d.tag: [arg for arg in d.argv if arg.startswith("--cache=")] for d in plan.virtiofsd}
    # The store never changes under a name; the rest may change on the host.
    assert cache == {
        "ro-store": ["--cache=always"],
        "work": ["--cache=auto"],
        "home": ["--cache=auto"],
        "cri": ["--cache=auto"],
    }


def test_root_gets_no_id_maps_which_virtiofsd_refuses_for_root(spec: Spec) -> None:
    plan = build_plan(spec, RunOptions(), make_facts(uid=0, gid=0))
    for daemon in plan.virtiofsd:
        assert not any(arg.startswith(("--uid-map", "--gid-map")) for arg in daemon.argv)
        assert "--translate-uid=map:1000:0:1" in daemon.argv


def test_cri_storage_is_a_root_of_its_own_outside_the_home_and_keeps_overlay_xattrs(
    sample: dict[str, Any],
) -> None:
    sample["shares"].append(
        {"tag": "cri", "source": "cri-storage", "mount_point": "/var/lib/containers"}
    )
    spec = parse_spec(sample, Path("/s.toml"))
    storage = Path("/home/alice/.cache/microvm-run/cri-storage/claude/myproject-0123456789ab")
    facts = make_facts(cri_storage=storage)
    plan = build_plan(spec, RunOptions(), facts)
    cri = next(d for d in plan.virtiofsd if d.tag == "cri")
    # Not under the guest-writable home: the guest cannot swap it for a symlink.
    assert cri.shared_dir == storage
    assert not cri.shared_dir.is_relative_to(facts.agent_home)
    assert any(arg.startswith("--xattrmap=") for arg in cri.argv)
    assert plan.dirs_to_create == (facts.agent_home, storage)


def test_resources_default_to_the_spec_and_options_override(spec: Spec) -> None:
    plan = build_plan(spec, RunOptions(), make_facts())
    assert (plan.memory_mib, plan.vcpus) == (4096, 4)
    plan = build_plan(spec, RunOptions(memory_mib=8192, vcpus=2), make_facts())
    assert (plan.memory_mib, plan.vcpus) == (8192, 2)
    assert "8192M" in plan.qemu_argv and "2" in plan.qemu_argv


def test_agent_args_are_appended_to_the_spec_command(spec: Spec) -> None:
    plan = build_plan(spec, RunOptions(agent_args=("--resume", "a b")), make_facts())
    assert plan.launch_data.splitlines()[-1] == (
        "set -- claude --dangerously-skip-permissions --resume 'a b'"
    )


def test_terminal_variables_pass_through_and_others_do_not(spec: Spec) -> None:
    environ = {"TERM": "xterm-kitty", "COLORTERM": "truecolor", "SECRET_THING": "x",
               "ANTHROPIC_API_KEY": "sk-secret"}  # fmt: skip
    plan = build_plan(spec, RunOptions(), make_facts(environ=environ))
    assert "export TERM=xterm-kitty" in plan.launch_data
    assert "export COLORTERM=truecolor" in plan.launch_data
    assert "SECRET_THING" not in plan.launch_data
    assert "sk-secret" not in plan.launch_data


def test_absent_keys_get_no_credential(spec: Spec) -> None:
    plan = build_plan(spec, RunOptions(), make_facts(environ={"TERM": "dumb"}))
    assert plan.credentials == ()
    assert not any("io.systemd.credentials" in arg for arg in plan.qemu_argv)


def test_supervisor_falls_back_honestly(spec: Spec) -> None:
    facts = make_facts(user_manager=False, user_manager_reason="XDG_RUNTIME_DIR is not set")
    plan = build_plan(spec, RunOptions(), facts)
    assert plan.supervisor == "child"
    assert "fallback: XDG_RUNTIME_DIR is not set" in plan.supervisor_reason
    assert build_plan(spec, RunOptions(supervisor="child"), make_facts()).supervisor == "child"
    with pytest.raises(PlanError, match="no systemd user manager"):
        build_plan(spec, RunOptions(supervisor="systemd"), facts)


def test_a_comma_in_the_runtime_dir_is_refused(spec: Spec) -> None:
    with pytest.raises(PlanError, match="contains a comma"):
        build_plan(spec, RunOptions(), make_facts(runtime_base=Path("/tmp/a,b")))


def test_long_runtime_dir_is_refused_before_anything_starts(spec: Spec) -> None:
    facts = make_facts(runtime_base=Path("/run/" + "x" * 100))
    with pytest.raises(PlanError, match="longer than 107 bytes"):
        build_plan(spec, RunOptions(), facts)


@pytest.mark.parametrize(
    ("options", "message"),
    [(RunOptions(accel="hvf"), "--accel"), (RunOptions(net="bridge"), "--net"),
     (RunOptions(supervisor="init"), "--supervisor")],
)  # fmt: skip
def test_bad_options_are_plan_errors(spec: Spec, options: RunOptions, message: str) -> None:
    with pytest.raises(PlanError, match=message):
        build_plan(spec, options, make_facts())


def test_instances_differ_only_by_id(spec: Spec) -> None:
    one = build_plan(spec, RunOptions(), make_facts(instance_id="aaaa0001"))
    two = build_plan(spec, RunOptions(), make_facts(instance_id="aaaa0002"))
    assert one.runtime_dir != two.runtime_dir
    assert one.agent_home == two.agent_home
    assert replace(one, instance_id="x") != one


def test_enable_cri_is_checked_before_boot(sample: dict[str, Any]) -> None:
    no_cri = parse_spec(sample, Path("/s.toml"))
    with pytest.raises(PlanError, match="use the claude-cri flavor"):
        build_plan(no_cri, RunOptions(), make_facts(environ={"ENABLE_CRI": "docker"}))
    sample["shares"].append(
        {"tag": "cri", "source": "cri-storage", "mount_point": "/var/lib/containers"}
    )
    cri = parse_spec(sample, Path("/s.toml"))
    with pytest.raises(PlanError, match="unknown runtime 'dokcer'"):
        build_plan(cri, RunOptions(), make_facts(environ={"ENABLE_CRI": "podman,dokcer"}))
    plan = build_plan(cri, RunOptions(), make_facts(environ={"ENABLE_CRI": "docker, podman"}))
    assert "export ENABLE_CRI=docker,podman" in plan.launch_data


# -- networking --------------------------------------------------------------------

EGRESS_SOCKET = "/run/user/1000/microvm-run/deadbeef/egress.sock"


def qemu_option(value: str) -> list[str]:
    """Split a QEMU option string at single commas; ",," is a literal comma."""
    parts, current, i = [], "", 0
    while i < len(value):
        if value[i] == ",":
            if value[i + 1 : i + 2] == ",":
                current += ","
                i += 2
                continue
            parts.append(current)
            current = ""
        else:
            current += value[i]
        i += 1
    return [*parts, current]


def netdev(plan: Any) -> list[str]:
    argv = list(plan.qemu_argv)
    values = [argv[i + 1] for i, arg in enumerate(argv) if arg == "-netdev"]
    assert len(values) == 1
    return qemu_option(values[0])


def guestfwds(plan: Any) -> dict[int, list[str]]:
    """Guest port -> the command QEMU runs for it, as argv."""
    out = {}
    for part in netdev(plan):
        if part.startswith("guestfwd="):
            rule, _, command = part.removeprefix("guestfwd=").partition("-cmd:")
            proto, addr, port = rule.split(":")
            assert (proto, addr) == ("tcp", "10.0.2.100")
            out[int(port)] = shlex.split(command)
    return out


@pytest.fixture
def key_spec(sample: dict[str, Any]) -> Spec:
    sample["spec_version"] = 2
    sample["network"] = {"allow": ["api.anthropic.com", "*.example.com"]}
    sample["key_proxy"] = [
        {
            "var": "ANTHROPIC_API_KEY",
            "upstream": "https://api.anthropic.com",
            "header": "x-api-key",
            "base_url_var": "ANTHROPIC_BASE_URL",
        }
    ]
    return parse_spec(sample, Path("/specs/claude.toml"))


def test_net_none_has_no_netdev_and_no_egress(spec: Spec) -> None:
    plan = build_plan(spec, RunOptions(net="none"), make_facts())
    assert plan.egress is None and plan.net == "none"
    assert "-netdev" not in plan.qemu_argv
    assert "MICROVM_NET=none" in plan.launch_data
    assert "proxy" not in plan.launch_data


def test_open_is_the_default_and_restricted_to_the_egress_proxy(spec: Spec) -> None:
    facts = make_facts(python=Path("/nix/store/p-python/bin/python3"),
                       relay=Path("/nix/store/r-runner/relay.py"))  # fmt: skip
    plan = build_plan(spec, RunOptions(), facts)
    assert plan.net == "open"
    assert plan.egress is not None and plan.egress.mode == "open"
    assert str(plan.egress.socket) == EGRESS_SOCKET
    parts = netdev(plan)
    assert parts[:3] == ["user", "id=net0", "restrict=on"]
    assert not any(p.startswith("hostfwd=") for p in parts)
    fwds = guestfwds(plan)
    assert sorted(fwds) == [53, 80, 443, 3128]
    for port, command in fwds.items():
        assert command == ["/nix/store/p-python/bin/python3", "-I", "-S",
                           "/nix/store/r-runner/relay.py", str(port), EGRESS_SOCKET]  # fmt: skip
    assert "virtio-net-device,netdev=net0" in plan.qemu_argv


def test_user_is_an_alias_for_open(spec: Spec) -> None:
    plan = build_plan(spec, RunOptions(net="user"), make_facts())
    assert plan.net == "open"
    assert plan.egress is not None and plan.egress.mode == "open"
    assert plan.qemu_argv == build_plan(spec, RunOptions(net="open"), make_facts()).qemu_argv


def test_launch_data_points_the_guest_at_the_proxy(spec: Spec) -> None:
    plan = build_plan(spec, RunOptions(net="allowlist"), make_facts())
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        assert f"export {var}=http://10.0.2.100:3128" in plan.launch_data
    assert "export NO_PROXY=localhost,127.0.0.1,10.0.2.100" in plan.launch_data
    assert "MICROVM_NET=allowlist" in plan.launch_data


def test_allowlist_rules_come_from_spec_project_and_options(key_spec: Spec) -> None:
    facts = make_facts(project_allow=("git.corp.example:8443", "API.anthropic.com"))
    options = RunOptions(net="allowlist", allow=("*.example.com", "ssh.corp.example:22"))
    plan = build_plan(key_spec, options, facts)
    assert plan.egress is not None
    assert [str(r) for r in plan.egress.rules] == [
        "api.anthropic.com", "*.example.com", "git.corp.example:8443", "ssh.corp.example:22"
    ]  # fmt: skip
    assert sorted(guestfwds(plan)) == [22, 53, 80, 443, 3128, 4180, 8443]


def test_allow_private_rules_are_marked_and_forward_their_ports(spec: Spec) -> None:
    options = RunOptions(net="open", allow_private=("db.lan.example:5432", "*.corp.example"))
    plan = build_plan(spec, options, make_facts())
    assert plan.egress is not None
    assert [(str(r), r.private) for r in plan.egress.rules] == [
        ("db.lan.example:5432 (private)", True), ("*.corp.example (private)", True)
    ]  # fmt: skip
    assert sorted(guestfwds(plan)) == [53, 80, 443, 3128, 5432]
    with pytest.raises(PlanError, match="allow entry 'http://x'"):
        build_plan(spec, RunOptions(allow_private=("http://x",)), make_facts())


def test_rule_ports_that_are_already_forwarded_are_not_doubled(spec: Spec) -> None:
    options = RunOptions(net="allowlist", allow=("a.example:443", "b.example:53", "c:4180"))
    plan = build_plan(spec, options, make_facts())
    assert sorted(guestfwds(plan)) == [53, 80, 443, 3128]


@pytest.mark.parametrize("entry", ["a..b", "*", "host:0", "http://x", ""])
def test_a_bad_allow_entry_is_a_plan_error(spec: Spec, entry: str) -> None:
    with pytest.raises(PlanError, match="allow entry"):
        build_plan(spec, RunOptions(net="allowlist", allow=(entry,)), make_facts())
    with pytest.raises(PlanError, match="allow entry"):
        build_plan(spec, RunOptions(), make_facts(project_allow=(entry,)))


def test_port_forwards_become_hostfwd_rules(spec: Spec) -> None:
    options = RunOptions(ports=("8080:80", "0.0.0.0:2222:22"))
    plan = build_plan(spec, options, make_facts())
    assert plan.port_forwards == ("127.0.0.1:8080:80", "0.0.0.0:2222:22")
    hostfwds = [p for p in netdev(plan) if p.startswith("hostfwd=")]
    assert hostfwds == [
        "hostfwd=tcp:127.0.0.1:8080-10.0.2.15:80",
        "hostfwd=tcp:0.0.0.0:2222-10.0.2.15:22",
    ]


@pytest.mark.parametrize(
    ("ports", "message"),
    [(("8080",), "expected"), (("8080:80", "8080:81"), "forwarded twice"),
     (("8080:80", "0.0.0.0:8080:81"), "forwarded twice"), (("1.2.3:1:1",), "-p")],
)  # fmt: skip
def test_bad_port_forwards_are_plan_errors(
    spec: Spec, ports: tuple[str, ...], message: str
) -> None:
    with pytest.raises(PlanError, match=message):
        build_plan(spec, RunOptions(ports=ports), make_facts())


def test_port_forwards_need_a_network(spec: Spec) -> None:
    with pytest.raises(PlanError, match="cannot be combined with --net none"):
        build_plan(spec, RunOptions(net="none", ports=("8080:80",)), make_facts())


def test_a_comma_in_a_guestfwd_command_is_doubled(spec: Spec) -> None:
    facts = make_facts(python=Path("/opt/py,thon/bin/python3"), relay=Path("/opt/a,b/relay.py"))
    plan = build_plan(spec, RunOptions(), facts)
    raw = next(arg for arg in plan.qemu_argv if arg.startswith("user,"))
    assert "/opt/py,,thon/bin/python3" in raw and "/opt/a,,b/relay.py" in raw
    for command in guestfwds(plan).values():
        assert command[0] == "/opt/py,thon/bin/python3"
        assert command[3] == "/opt/a,b/relay.py"


def test_a_space_or_quote_in_a_guestfwd_command_is_quoted(spec: Spec) -> None:
    facts = make_facts(python=Path("/opt/my python/python3"), relay=Path("/opt/it's/relay.py"))
    plan = build_plan(spec, RunOptions(), facts)
    for command in guestfwds(plan).values():
        assert command[0] == "/opt/my python/python3"
        assert command[3] == "/opt/it's/relay.py"


def test_inject_keys_keeps_the_key_on_the_host(key_spec: Spec) -> None:
    plan = build_plan(key_spec, RunOptions(), make_facts())
    assert plan.inject_keys
    assert plan.credentials == ()
    # Kept from every child's environment although it is no credential.
    assert plan.secret_vars == ("ANTHROPIC_API_KEY",)
    assert "export ANTHROPIC_API_KEY=microvm-run-placeholder" in plan.launch_data
    assert "export ANTHROPIC_BASE_URL=http://10.0.2.100:4180/anthropic-api-key" in plan.launch_data
    assert plan.egress is not None
    (route,) = plan.egress.key_routes
    assert (route.prefix, route.var, route.upstream, route.header) == (
        "anthropic-api-key", "ANTHROPIC_API_KEY", "https://api.anthropic.com", "x-api-key"
    )  # fmt: skip
    assert (route.methods, route.paths) == (("GET", "POST"), ("/v1/",))
    assert 4180 in guestfwds(plan)
    assert not any("io.systemd.credentials" in arg for arg in plan.qemu_argv)
    # The key's value is nowhere in what the runner writes, shows or passes.
    assert "sk-secret" not in json.dumps(plan.to_dict())
    assert "sk-secret" not in plan.launch_data
    assert not any("sk-secret" in arg for arg in plan.qemu_argv)


def test_inject_keys_appends_the_base_url_path(sample: dict[str, Any]) -> None:
    sample["key_proxy"] = [
        {"var": "ANTHROPIC_API_KEY", "upstream": "https://example.com", "header": "authorization",
         "base_url_var": "OPENAI_BASE_URL", "base_url_path": "/v1"}
    ]  # fmt: skip
    sample["key_proxy"][0] |= {"methods": ["POST"], "paths": ["/v1beta/"]}
    spec = parse_spec(sample, Path("/s.toml"))
    plan = build_plan(spec, RunOptions(), make_facts())
    assert "export OPENAI_BASE_URL=http://10.0.2.100:4180/anthropic-api-key/v1" in (
        plan.launch_data
    )
    assert plan.egress is not None
    (route,) = plan.egress.key_routes  # the spec's route data reaches the proxy
    assert (route.methods, route.paths) == (("POST",), ("/v1beta/",))


def test_inject_keys_without_the_key_in_the_environment(key_spec: Spec) -> None:
    plan = build_plan(key_spec, RunOptions(), make_facts(environ={"TERM": "dumb"}))
    assert plan.credentials == ()
    assert "ANTHROPIC_API_KEY" not in plan.launch_data
    assert "ANTHROPIC_BASE_URL" not in plan.launch_data


def test_no_inject_keys_passes_the_credential_as_before(key_spec: Spec) -> None:
    plan = build_plan(key_spec, RunOptions(inject_keys=False), make_facts())
    assert not plan.inject_keys
    assert plan.credentials == (
        ("ANTHROPIC_API_KEY",
         Path("/run/user/1000/microvm-run/deadbeef/credentials/ANTHROPIC_API_KEY")),
    )  # fmt: skip
    assert "placeholder" not in plan.launch_data
    assert "ANTHROPIC_BASE_URL" not in plan.launch_data
    assert plan.egress is not None and plan.egress.key_routes == ()
    assert 4180 not in guestfwds(plan)
    assert "sk-secret" not in json.dumps(plan.to_dict())


def test_a_spec_without_key_proxies_passes_the_credential(spec: Spec) -> None:
    plan = build_plan(spec, RunOptions(), make_facts())
    assert not plan.inject_keys
    assert [var for var, _ in plan.credentials] == ["ANTHROPIC_API_KEY"]
    assert 4180 not in guestfwds(plan)


def test_inject_keys_on_a_spec_without_key_proxies_is_a_plan_error(spec: Spec) -> None:
    with pytest.raises(PlanError, match="--inject-keys: the claude flavor has no key proxy"):
        build_plan(spec, RunOptions(inject_keys=True), make_facts())


def test_net_none_never_injects(key_spec: Spec) -> None:
    plan = build_plan(key_spec, RunOptions(net="none"), make_facts())
    assert not plan.inject_keys
    assert [var for var, _ in plan.credentials] == ["ANTHROPIC_API_KEY"]
    assert "placeholder" not in plan.launch_data


def test_egress_log_and_instance_come_from_the_facts(spec: Spec) -> None:
    plan = build_plan(spec, RunOptions(), make_facts(egress_log=Path("/state/egress.log")))
    assert plan.egress is not None
    assert plan.egress.log == Path("/state/egress.log")
    assert plan.egress.instance_id == "deadbeef"
    assert plan.to_dict()["egress"]["socket"] == EGRESS_SOCKET


def test_what_only_a_launch_gathers_changes_no_decision(spec: Spec) -> None:
    # The launch decides (and refuses bad input) before it claims a disk slot
    # and prepares the dev shell; its one plan then differs only in those.
    options = RunOptions(ports=("8080:80",), allow=("example.org",))
    facts = make_facts(implied_local_dirs=("node_modules",))
    gathered = replace(
        facts, local_slot=3, devshell_guest_file="/home/agent/.microvm-devshell.sh", devshell="ok"
    )
    assert decide(spec, options, facts) == decide(spec, options, gathered)
    before, after = build_plan(spec, options, facts), build_plan(spec, options, gathered)
    assert after.local_image is not None and after.local_image.name == "3.img"
    assert "MICROVM_DEVSHELL=/home/agent/.microvm-devshell.sh" in after.launch_data
    assert "MICROVM_DEVSHELL" not in before.launch_data
    assert (before.egress, before.virtiofsd) == (after.egress, after.virtiofsd)


def test_decide_refuses_what_build_plan_refuses(spec: Spec) -> None:
    for options in (RunOptions(net="none", ports=("8080:80",)), RunOptions(fs_cache="x")):
        with pytest.raises(PlanError) as refused:
            decide(spec, options, make_facts())
        with pytest.raises(PlanError, match=re.escape(str(refused.value))):
            build_plan(spec, options, make_facts())
