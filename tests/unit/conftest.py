from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from microvm_run.plan import HostFacts
from microvm_run.spec import Spec, parse_spec

SAMPLE: dict[str, Any] = {
    "spec_version": 1,
    "agent": {
        "name": "claude",
        "command": ["claude", "--dangerously-skip-permissions"],
        "api_key_vars": ["ANTHROPIC_API_KEY"],
    },
    "guest": {
        "contract": 1,
        "machine": "microvm",
        "kernel": "/nix/store/k-linux/bzImage",
        "initrd": "/nix/store/i-initrd/initrd",
        "kernel_params": ["init=/nix/store/t-toplevel/init"],
        "memory_mib": 4096,
        "vcpus": 4,
    },
    "host": {
        "qemu": "/nix/store/q-qemu/bin/qemu-system-x86_64",
        "virtiofsd": "/nix/store/v-virtiofsd/bin/virtiofsd",
    },
    "shares": [
        {
            "tag": "ro-store",
            "source": "nix-store",
            "mount_point": "/nix/.ro-store",
            "read_only": True,
        },
        {"tag": "work", "source": "work", "mount_point": "/work"},
        {"tag": "home", "source": "home", "mount_point": "/home/agent"},
    ],
}


@pytest.fixture
def sample() -> dict[str, Any]:
    return copy.deepcopy(SAMPLE)


@pytest.fixture
def spec_file(tmp_path: Path) -> Path:
    """SAMPLE as a spec file (its binaries do not exist: no launch gets past preflight)."""
    path = tmp_path / "spec.toml"
    path.write_bytes(tomli_w.dumps(SAMPLE).encode())
    return path


@pytest.fixture
def spec(sample: dict[str, Any]) -> Spec:
    return parse_spec(sample, Path("/specs/claude.toml"))


def make_facts(**overrides: Any) -> HostFacts:
    values: dict[str, Any] = {
        "uid": 1000,
        "gid": 100,
        "work_dir": Path("/home/alice/src/my project!"),
        "agent_home": Path("/home/alice/.local/share/claude-microvm/myproject-0123456789ab"),
        "runtime_base": Path("/run/user/1000/microvm-run"),
        "instance_id": "deadbeef",
        "environ": {"TERM": "xterm-256color", "ANTHROPIC_API_KEY": "sk-secret"},
        "user_manager": True,
        "user_manager_reason": "user manager at /run/user/1000/systemd/private",
    }
    values.update(overrides)
    return HostFacts(**values)
