from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from microvm_run.plan import PlanError, RunOptions, build_plan
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


def test_root_gets_no_id_maps_which_virtiofsd_refuses_for_root(spec: Spec) -> None:
    plan = build_plan(spec, RunOptions(), make_facts(uid=0, gid=0))
    for daemon in plan.virtiofsd:
        assert not any(arg.startswith(("--uid-map", "--gid-map")) for arg in daemon.argv)
        assert "--translate-uid=map:1000:0:1" in daemon.argv


def test_cri_storage_lives_in_the_home_and_keeps_overlay_xattrs(sample: dict[str, Any]) -> None:
    sample["shares"].append(
        {"tag": "cri", "source": "cri-storage", "mount_point": "/var/lib/containers"}
    )
    spec = parse_spec(sample, Path("/s.toml"))
    facts = make_facts()
    plan = build_plan(spec, RunOptions(), facts)
    cri = next(d for d in plan.virtiofsd if d.tag == "cri")
    assert cri.shared_dir == facts.agent_home / "cri-storage"
    assert any(arg.startswith("--xattrmap=") for arg in cri.argv)
    assert plan.dirs_to_create == (facts.agent_home, facts.agent_home / "cri-storage")


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
