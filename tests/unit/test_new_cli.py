"""`microvm-run new` on real directories: each mode, idempotency, bad input writes nothing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from microvm_run import newvm
from tests.support.cli import host_roots, run


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path below root with its content (None for a directory or a symlink)."""
    found: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            found[rel] = path.read_bytes() if path.is_file() and not path.is_symlink() else None
    return found


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {"HOME": str(tmp_path / "home"), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}


@pytest.fixture
def project(tmp_path: Path) -> Path:
    path = tmp_path / "project"
    path.mkdir()
    (path / "go.mod").write_text("module x\n")
    (path / "Cargo.toml").write_text("[package]\n")
    return path


def test_new_flavor_writes_agent_nix_and_flake_then_changes_nothing(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], project: Path
) -> None:
    code, out, err = run(capsys, ["new", "web", "--work-dir", str(project)], env)
    assert (code, err) == (0, "")
    assert f"created web in {project}/agent.nix" in out
    assert f"created {project}/flake.nix" in out
    assert "packages: go gopls rustc cargo" in out
    assert "next: microvm-run check" in out
    agent_nix = (project / "agent.nix").read_text()
    assert "pkgs.rustc" in agent_nix
    before = snapshot(project)
    code, out, _ = run(capsys, ["new", "web", "--work-dir", str(project)], env)
    assert code == 0
    assert "nothing to do" in out
    assert snapshot(project) == before


def test_work_dir_comes_from_the_environment(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], project: Path
) -> None:
    code, _, _ = run(capsys, ["new", "web", "--no-detect"], env | {"WORK_DIR": str(project)})
    assert code == 0
    assert "pkgs." not in (project / "agent.nix").read_text()


@pytest.mark.parametrize(
    "argv",
    [
        ["new", "Web"],
        ["new", "web", "--agent", "copilot"],
        ["new", "web", "--memory", "lots"],
        ["new", "web", "--vcpus", "0"],
        ["new", "web", "--package", "go;rm"],
        ["new", "web", "--clone", "https://x/y"],
        ["new", "web", "--address", "10.77.0.9"],
        ["new", "web", "--bogus"],
        ["new"],
    ],
)
def test_bad_flavor_input_is_one_line_exit_2_and_writes_nothing(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], project: Path, argv: list[str]
) -> None:
    before = snapshot(project)
    code, out, err = run(capsys, [*argv, "--work-dir", str(project)], env)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("microvm-run new: ")
    assert snapshot(project) == before


def test_an_edited_entry_is_refused_with_exit_1_and_left_as_it_is(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], project: Path
) -> None:
    assert run(capsys, ["new", "web", "--work-dir", str(project)], env)[0] == 0
    agent_nix = project / "agent.nix"
    agent_nix.write_text(agent_nix.read_text().replace("pkgs.go\n", "pkgs.go_1_23\n"))
    before = snapshot(project)
    for extra in ([], ["--vcpus", "2"], ["--vcpus", "2", "--replace"]):
        code, _, err = run(capsys, ["new", "web", "--work-dir", str(project), *extra], env)
        assert code == 1, extra
        assert "changed by hand" in err
    assert snapshot(project) == before


def test_a_symlinked_agent_nix_is_refused_and_its_target_untouched(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], project: Path, tmp_path: Path
) -> None:
    target = tmp_path / "elsewhere.nix"
    target.write_text("mine\n")
    (project / "agent.nix").symlink_to(target)
    code, _, err = run(capsys, ["new", "web", "--work-dir", str(project)], env)
    assert code == 2
    assert "symlink" in err
    assert target.read_text() == "mine\n"
    assert not (project / "flake.nix").exists()


def test_a_foreign_flake_is_not_touched(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], project: Path
) -> None:
    (project / "flake.nix").write_text("{ outputs = _: { devShells = { }; }; }\n")
    code, out, _ = run(capsys, ["new", "web", "--work-dir", str(project)], env)
    assert code == 0
    assert (project / "flake.nix").read_text() == "{ outputs = _: { devShells = { }; }; }\n"
    assert "DIRENV_ALLOW=1" in out
    assert "packages: (none)" in out
    assert "add the input agent-microvm.url" in out


def test_dry_run_writes_nothing(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], project: Path
) -> None:
    before = snapshot(project)
    code, out, _ = run(capsys, ["new", "web", "--work-dir", str(project), "--dry-run"], env)
    assert code == 0
    assert f"would: created web in {project}/agent.nix" in out
    assert snapshot(project) == before


@pytest.fixture
def hostdirs(tmp_path: Path) -> tuple[Path, Path]:
    config = tmp_path / "etc-nixos"
    config.mkdir()
    return config, tmp_path / "state"


def test_new_host_vm_writes_the_module_and_makes_its_dirs(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], hostdirs: tuple[Path, Path]
) -> None:
    config, state = hostdirs
    argv = [
        "new",
        "web",
        "--host-config",
        str(config),
        "--state-root",
        str(state / "vms"),
        *host_roots(state),
    ]
    code, out, err = run(capsys, [*argv, "--package", "git"], env)
    assert (code, err) == (0, "")
    assert "address: 10.77.0.2" in out
    text = (config / newvm.HOST_FILE).read_text()
    assert 'address = "10.77.0.2";' in text
    assert (state / "vms" / "web").stat().st_mode & 0o777 == 0o700
    assert (state / "workspaces" / "web").is_dir()
    code, out, _ = run(capsys, [*argv, "--package", "git"], env)
    assert code == 0 and "nothing to do" in out
    code, out, _ = run(
        capsys,
        [
            "new",
            "api",
            "--host-config",
            str(config),
            "--state-root",
            str(state / "vms"),
            *host_roots(state),
        ],
        env,
    )
    assert code == 0
    assert "address: 10.77.0.3" in out
    assert set(newvm.parse_managed((config / newvm.HOST_FILE).read_text(), config).entries) == {
        "web",
        "api",
    }


@pytest.mark.parametrize(
    "extra",
    [
        ["--address", "10.77.0.1"],
        ["--address", "10.200.0.2"],
        ["--address", "ten"],
        ["--subnet", "10.77.0.0/33"],
        ["--state-root", "relative"],
        ["--clone", "--upload-pack=x"],
    ],
)
def test_bad_host_input_is_exit_2_and_writes_nothing(
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    hostdirs: tuple[Path, Path],
    tmp_path: Path,
    extra: list[str],
) -> None:
    config, state = hostdirs
    before = snapshot(tmp_path)
    argv = [
        "new",
        "web",
        "--host-config",
        str(config),
        "--state-root",
        str(state / "vms"),
        *host_roots(state),
        *extra,
    ]
    code, out, err = run(capsys, argv, env)
    assert code == 2, err
    assert out == "" and err.count("\n") == 1
    assert snapshot(tmp_path) == before


def test_a_missing_host_config_dir_is_bad_input(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], tmp_path: Path
) -> None:
    code, _, err = run(capsys, ["new", "web", "--host-config", str(tmp_path / "nope")], env)
    assert code == 2
    assert "is not a directory" in err
    assert list(tmp_path.iterdir()) == []


def test_a_failed_clone_leaves_nothing_behind(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], hostdirs: tuple[Path, Path]
) -> None:
    config, state = hostdirs
    argv = [
        "new",
        "web",
        "--host-config",
        str(config),
        "--state-root",
        str(state / "vms"),
        *host_roots(state),
    ]
    code, _, err = run(capsys, [*argv, "--clone", str(config / "no-such-repo")], env)
    assert code == 1
    assert "git clone" in err
    assert not state.exists()
    assert list(config.iterdir()) == []
