"""`microvm-run new` and `check` with the real Nix and git: what new writes evaluates against
the real lib.mkAgentVM's arguments, a clone is detected, and check's nix eval fallback.

nix-eval-jobs itself is not in CI (it builds only from source): `make eval-modules` runs
check with it for real and records its output (tests/unit/test_check_cli.py parses that).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.cli import host_roots, origin_repo, run
from tests.support.nixenv import NIX_TEST_ENV
from tests.support.prereq import require

REPO = Path(__file__).resolve().parents[2]
VMS = REPO / "tests" / "fixtures" / "check" / "vms.nix"


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    require(shutil.which("nix") is not None, "nix (Debian: nix-bin)")
    require(shutil.which("git") is not None, "git")
    home = tmp_path / "home"
    home.mkdir()
    return {
        "HOME": str(home),
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        # The fallback is what CI has; nix-eval-jobs is never picked up by accident.
        "MICROVM_RUN_NIX_EVAL_JOBS": str(tmp_path / "no-nix-eval-jobs"),
        **NIX_TEST_ENV,
    }


def nix_eval(expr: str, env: dict[str, str]) -> object:
    done = subprocess.run(
        ["nix-instantiate", "--eval", "--strict", "--json", "-E", expr],
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


# A stand-in for agent-microvm whose mkAgentVM takes exactly the real one's arguments
# (read from flake.nix), and a pkgs whose attributes are their own names.
STUB = f"""
let
  outputs = (import {REPO}/flake.nix).outputs {{ self = {{ }}; nixpkgs = {{ }}; microvm = {{ }}; }};
  real = builtins.functionArgs outputs.lib.mkAgentVM;
  pkgs = builtins.listToAttrs (map (n: {{ name = n; value = "pkg:" + n; }})
    [ "go" "gopls" "nodejs" "rustc" "cargo" "python3" "uv" "git" "postgresql" ]);
  check = args:
    let unknown = builtins.filter (n: !(real ? ${{n}})) (builtins.attrNames args);
        missing = builtins.filter (n: !real.${{n}} && !(args ? ${{n}})) (builtins.attrNames real);
    in if unknown != [ ] || missing != [ ]
      then throw "mkAgentVM: unknown ${{toString unknown}}, missing ${{toString missing}}"
      else args // {{
        packages = if args ? packages then args.packages pkgs else [ ];
        modules = map (m: m) (args.modules or [ ]);
      }};
  agent-microvm = {{ lib.mkAgentVM = check; }};
in
"""


def test_a_new_flavor_evaluates_with_the_real_mkagentvm_arguments(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], tmp_path: Path
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "go.mod").write_text("module x\n")
    (project / "pyproject.toml").write_text("[project]\n")
    assert run(capsys, ["new", "web", "--work-dir", str(project)], env)[0] == 0
    argv = ["new", "api", "--work-dir", str(project), "--agent", "codex", "--cri"]
    assert run(capsys, [*argv, "--memory", "8192", "--vcpus", "2", "--no-detect"], env)[0] == 0
    flake = f"(import {project}/flake.nix).outputs {{ inherit agent-microvm; }}"
    got = nix_eval(f"{STUB} ({flake}).packages.x86_64-linux", env)
    assert got == {
        "web": {
            "agent": "claude",
            "packages": ["pkg:go", "pkg:gopls", "pkg:python3", "pkg:uv"],
            "modules": [],
        },
        "api": {
            "agent": "codex",
            "cri": True,
            "packages": [],
            "modules": [{"agentVM": {"resources": {"memoryMiB": 8192, "vcpus": 2}}}],
        },
    }


def test_a_host_vm_is_cloned_detected_and_its_module_evaluates(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], tmp_path: Path
) -> None:
    origin = origin_repo(tmp_path / "origin", {"Cargo.toml": "[package]\n"})
    config, state = tmp_path / "etc-nixos", tmp_path / "state"
    config.mkdir()
    argv = [
        "new",
        "web",
        "--host-config",
        str(config),
        "--state-root",
        str(state / "vms"),
        *host_roots(state),
    ]
    code, out, err = run(capsys, [*argv, "--clone", str(origin)], env)
    assert code == 0, err
    assert f"cloned {origin} into {state}/workspaces/web" in out
    assert "packages: rustc cargo" in out
    assert (state / "workspaces" / "web" / "Cargo.toml").is_file()
    code, out, _ = run(capsys, [*argv, "--clone", str(origin)], env)
    assert code == 0 and "nothing to do" in out
    module = f"(import {config}/agent-vms.nix {{ inherit pkgs; }})"
    got = nix_eval(f"{STUB} {module}.services.agent-microvm.vms.web", env)
    assert got == {
        "flavor": "claude",
        "workspace": f"{state}/workspaces/web",
        "user": "alice",
        "address": "10.77.0.2",
        "mac": "02:00:0a:4d:00:02",
        "packages": ["pkg:rustc", "pkg:cargo"],
    }


def test_check_falls_back_to_nix_eval_and_reports_each_vm(
    capsys: pytest.CaptureFixture[str], env: dict[str, str]
) -> None:
    code, out, err = run(capsys, ["check", "--file", str(VMS)], env)
    assert code == 1
    assert "nix-eval-jobs not found: evaluating with nix eval, one VM at a time" in err
    lines = out.splitlines()
    assert any(line.startswith("ok   claude ") and "4096 MiB" in line for line in lines)
    assert any(line.startswith("ok   codex-cri ") and "cri-storage" in line for line in lines)
    assert any(
        line.startswith("FAIL broken ") and "this VM does not evaluate" in line for line in lines
    )
    assert any(line.startswith("FAIL newer-spec ") and "spec_version 99" in line for line in lines)
    assert "not agent VMs: tool" in out
    assert lines[-1].endswith("2 fine, 2 not (nix eval, one at a time)")
    code, out, _ = run(capsys, ["check", "--file", str(VMS), "--arg", "broken", "false"], env)
    assert code == 0, out


def test_check_of_a_flake_with_the_fallback(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], tmp_path: Path
) -> None:
    # The fixture and what it imports, laid out as in the repository, under a flake.
    flake = tmp_path / "flake"
    for rel in ("lib", "tests/nix/samples.nix", "tests/fixtures/check/vms.nix"):
        (flake / rel).parent.mkdir(parents=True, exist_ok=True)
        if (REPO / rel).is_dir():
            shutil.copytree(REPO / rel, flake / rel)
        else:
            shutil.copy(REPO / rel, flake / rel)
    (flake / "flake.nix").write_text(
        "{ outputs = _: { packages.x86_64-linux = import ./tests/fixtures/check/vms.nix "
        "{ broken = false; }; }; }\n"
    )
    code, out, err = run(capsys, ["check", f"path:{flake}", "--no-eval-jobs"], env)
    assert code == 0, err
    assert "--no-eval-jobs: evaluating with nix eval" in err
    assert out.splitlines()[-1] == (
        f"check: 2 agent VMs in path:{flake}#packages.x86_64-linux: 2 fine, 0 not "
        "(nix eval, one at a time)"
    )
    code, _, err = run(capsys, ["check", f"path:{tmp_path}/none", "--no-eval-jobs"], env)
    assert code == 1
    assert err.splitlines()[-1].startswith(
        f"microvm-run check: nix eval failed on path:{tmp_path}/none"
    )


def test_a_refusal_after_a_clone_leaves_the_workspace_as_it_was(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], tmp_path: Path
) -> None:
    origin = origin_repo(tmp_path / "origin", {"go.mod": "module x\n"})
    config, state = tmp_path / "etc-nixos", tmp_path / "state"
    config.mkdir()
    argv = [
        "new",
        "web",
        "--host-config",
        str(config),
        "--state-root",
        str(state / "vms"),
        *host_roots(state),
    ]
    assert run(capsys, argv, env)[0] == 0  # the entry, with no packages, and an empty workspace
    before = (config / "agent-vms.nix").read_text()
    # The clone's go.mod would change the entry: refused, and the clone is undone.
    code, _, err = run(capsys, [*argv, "--clone", str(origin)], env)
    assert code == 1
    assert "--replace" in err
    assert list((state / "workspaces" / "web").iterdir()) == []
    assert (config / "agent-vms.nix").read_text() == before
