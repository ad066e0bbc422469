"""VMs declared on a NixOS host: the registry, `ps`'s table and `attach`.

systemctl and ssh are fakes at the process boundary: small programs on PATH
that answer from a file and record their argv.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from microvm_run import hostvms, ops_cli

RUNNER_SRC = Path(hostvms.__file__).resolve().parents[1]


def registry(tmp_path: Path, vms: list[dict[str, Any]] | None = None) -> Path:
    path = tmp_path / "vms.json"
    known = tmp_path / "known_hosts"
    known.write_text("10.77.0.142 ssh-ed25519 AAAA\n")
    entries = vms or [
        {"name": "alpha", "address": "10.77.0.142", "user": "alice", "known_hosts": str(known)},
        {"name": "beta", "address": "10.77.0.37", "user": "alice", "known_hosts": str(known)},
    ]
    path.write_text(json.dumps({"version": 1, "vms": entries}))
    return path


def fake_tools(tmp_path: Path, states: dict[str, str]) -> Path:
    """systemctl answering is-active from ``states``; ssh recording its argv."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (tmp_path / "states.json").write_text(json.dumps(states))
    (bin_dir / "systemctl").write_text(
        f"#!{sys.executable}\n"
        "import json, sys\n"
        f"states = json.load(open({str(tmp_path / 'states.json')!r}))\n"
        "unit = sys.argv[2].removeprefix('microvm@').removesuffix('.service')\n"
        "print(states.get(unit, 'inactive'))\n"
        "sys.exit(0 if states.get(unit) == 'active' else 3)\n"
    )
    (bin_dir / "ssh").write_text(
        f"#!{sys.executable}\n"
        "import json, sys\n"
        f"open({str(tmp_path / 'ssh-argv.json')!r}, 'w').write(json.dumps(sys.argv[1:]))\n"
    )
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return bin_dir


def env_for(tmp_path: Path, bin_dir: Path, path: Path) -> dict[str, str]:
    return {"PATH": f"{bin_dir}:{os.environ.get('PATH', '')}", "MICROVM_HOST_VMS": str(path)}


def test_the_registry_the_module_writes_is_read_strictly(tmp_path: Path) -> None:
    vms = hostvms.load(registry(tmp_path))
    assert [(vm.name, vm.address, vm.unit) for vm in vms] == [
        ("alpha", "10.77.0.142", "microvm@alpha.service"),
        ("beta", "10.77.0.37", "microvm@beta.service"),
    ]
    assert hostvms.load(tmp_path / "absent.json") == ()
    bad = registry(tmp_path, [{"name": "Alpha!", "address": "x", "user": "u", "known_hosts": "/k"}])
    with pytest.raises(hostvms.RegistryError, match="is not a VM name"):
        hostvms.load(bad)
    bad.write_text(json.dumps({"version": 1, "vms": [{"name": "alpha"}]}))
    with pytest.raises(hostvms.RegistryError, match="a VM needs exactly"):
        hostvms.load(bad)


def test_ps_lists_declared_vms_with_their_unit_state_and_address(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bin_dir = fake_tools(tmp_path, {"alpha": "active"})
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    env = env_for(tmp_path, bin_dir, registry(tmp_path)) | {"XDG_RUNTIME_DIR": str(runtime)}
    assert ops_cli.main(["ps"], env) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "no running instances"
    assert out[2].split() == ["VM", "STATE", "ADDRESS"]
    assert out[3].split() == ["alpha", "active", "10.77.0.142"]
    assert out[4].split() == ["beta", "inactive", "10.77.0.37"]


def attach(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "microvm_run", "attach", *args],
        # This interpreter's own path too: plumbum may live anywhere (a Nix build).
        env=env | {"PYTHONPATH": os.pathsep.join([str(RUNNER_SRC), *sys.path])},
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def test_attach_runs_ssh_with_the_host_key_checked_strictly(tmp_path: Path) -> None:
    path = registry(tmp_path)
    bin_dir = fake_tools(tmp_path, {"alpha": "active"})
    done = attach(tmp_path, env_for(tmp_path, bin_dir, path), "alpha")
    assert done.returncode == 0, done.stderr
    argv = json.loads((tmp_path / "ssh-argv.json").read_text())
    assert argv[-2:] == ["agent@10.77.0.142", "agent-microvm-attach"]
    assert "StrictHostKeyChecking=yes" in argv
    assert f"UserKnownHostsFile={tmp_path / 'known_hosts'}" in argv
    assert "-t" in argv


@pytest.mark.parametrize(
    ("args", "states", "code", "message"),
    [
        (["gamma"], {}, 2, "no VM 'gamma' is declared on this host"),
        ([], {}, 2, "attach takes one VM name"),
        (["alpha", "beta"], {}, 2, "attach takes one VM name"),
        (["beta"], {"alpha": "active"}, 1, "VM beta is inactive: start it with systemctl start"),
    ],
)
def test_attach_refuses_in_one_line_without_running_ssh(
    tmp_path: Path, args: list[str], states: dict[str, str], code: int, message: str
) -> None:
    bin_dir = fake_tools(tmp_path, states)
    done = attach(tmp_path, env_for(tmp_path, bin_dir, registry(tmp_path)), *args)
    assert done.returncode == code
    assert done.stderr.count("\n") == 1 and message in done.stderr
    assert not (tmp_path / "ssh-argv.json").exists()


def test_attach_forwards_no_agent_display_or_ports_to_the_vm() -> None:
    vm = hostvms.HostVM("dev", "10.77.0.2", "alice", Path("/etc/agent-microvm/dev/known_hosts"))
    argv = hostvms.attach_argv(vm)
    for option in ("-a", "-x", "ForwardAgent=no", "ForwardX11=no", "ClearAllForwardings=yes"):
        assert option in argv
