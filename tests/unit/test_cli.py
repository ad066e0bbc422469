"""The command line: bad input is one clear line, exit status 2, nothing created."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from microvm_run.cli import main

from .conftest import SAMPLE


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir()
    return {
        "HOME": str(home),
        "XDG_DATA_HOME": str(tmp_path / "data"),
        "XDG_RUNTIME_DIR": str(tmp_path / "run"),
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "TERM": "xterm",
    }


@pytest.fixture
def spec_file(tmp_path: Path) -> Path:
    path = tmp_path / "spec.toml"
    path.write_bytes(tomli_w.dumps(SAMPLE).encode())
    return path


@pytest.fixture
def work(tmp_path: Path) -> Path:
    path = tmp_path / "project"
    path.mkdir()
    return path


def run(capsys: pytest.CaptureFixture[str], argv: list[str], env: dict[str, str]) -> Any:
    code = main(argv, env)
    out, err = capsys.readouterr()
    return code, out, err


def test_dry_run_prints_the_plan_and_creates_nothing(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], spec_file: Path, work: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    code, out, _ = run(
        capsys, ["--spec", str(spec_file), "--work-dir", str(work), "--dry-run", "--json"], env
    )
    assert code == 0
    plan = json.loads(out)
    assert plan["work_dir"] == str(work)
    assert plan["agent_home"].startswith(str(tmp_path / "data" / "claude-microvm" / "project-"))
    assert not (tmp_path / "data").exists()
    assert not (tmp_path / "run").exists()


def test_spec_comes_from_the_environment_and_work_dir_from_work_dir(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], spec_file: Path, work: Path
) -> None:
    env |= {"MICROVM_RUN_SPEC": str(spec_file), "WORK_DIR": str(work)}
    code, out, _ = run(capsys, ["--dry-run", "--json"], env)
    assert code == 0
    assert json.loads(out)["work_dir"] == str(work)


@pytest.mark.parametrize(
    ("args", "extra_env", "message"),
    [
        (["--work-dir", "{tmp}/absent"], {}, "does not exist"),
        (["--work-dir", "{tmp}/spec.toml"], {}, "is not a directory"),
        (["--work-dir", "/"], {}, "refusing to share the whole file system"),
        (["--work-dir", "{tmp}/home"], {}, "your home directory"),
        (["--mem", "0"], {}, "--mem 0 is out of range"),
        (["--mem", "lots"], {}, "--mem must be a whole number"),
        (["--vcpus", "999"], {}, "--vcpus 999 is out of range"),
        ([], {"MICROVM_MEM": "-5"}, "--mem must be a whole number"),
        (["--boot-timeout", "0"], {}, "--boot-timeout must be positive"),
        ([], {"MICROVM_BOOT_TIMEOUT": "soon"}, "--boot-timeout must be a number of seconds"),
        (["--boot-timeout", "nan"], {}, "--boot-timeout must be positive"),
        ([], {"ENABLE_CRI": "dokcer"}, "ENABLE_CRI: unknown runtime 'dokcer'"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_created(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], spec_file: Path, work: Path,
    tmp_path: Path, args: list[str], extra_env: dict[str, str], message: str,
) -> None:  # fmt: skip
    argv = ["--spec", str(spec_file), "--work-dir", str(work)]
    argv += [a.replace("{tmp}", str(tmp_path)) for a in args]
    code, out, err = run(capsys, argv, env | extra_env)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "data").exists()
    assert not (tmp_path / "run").exists()


def test_home_itself_is_allowed_with_allow_home(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], spec_file: Path
) -> None:
    argv = ["--spec", str(spec_file), "--work-dir", env["HOME"], "--allow-home", "--dry-run"]
    code, _, _ = run(capsys, argv, env)
    assert code == 0


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"spec_version = [", "not valid TOML"),
        (b"spec_version = 99\n", "newer than this microvm-run understands"),
        (b"\xff\xfe", "not valid TOML"),
    ],
)
def test_corrupt_or_future_specs_are_refused(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], work: Path, tmp_path: Path,
    content: bytes, message: str,
) -> None:  # fmt: skip
    spec = tmp_path / "bad.toml"
    spec.write_bytes(content)
    code, _, err = run(capsys, ["--spec", str(spec), "--work-dir", str(work)], env)
    assert code == 2
    assert message in err and err.count("\n") == 1


def test_no_spec_names_the_fix(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], work: Path
) -> None:
    code, _, err = run(capsys, ["--work-dir", str(work)], env)
    assert code == 2
    assert "MICROVM_RUN_SPEC" in err


def test_missing_qemu_is_refused_before_anything_starts(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], spec_file: Path, work: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    code, _, err = run(
        capsys, ["--spec", str(spec_file), "--work-dir", str(work), "--accel", "tcg"], env
    )
    assert code == 2
    assert "qemu /nix/store/q-qemu/bin/qemu-system-x86_64 is missing" in err
    assert not (tmp_path / "data").exists()


def test_missing_kvm_names_the_fix(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], work: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    # A spec whose binaries exist, so the KVM check is what fails.
    sample = json.loads(json.dumps(SAMPLE))
    true = shutil.which("true")
    assert true is not None
    sample["host"] = {"qemu": true, "virtiofsd": true}
    sample["guest"] |= {"kernel": str(tmp_path / "k"), "initrd": str(tmp_path / "i")}
    (tmp_path / "k").write_text("")
    (tmp_path / "i").write_text("")
    spec = tmp_path / "ok.toml"
    spec.write_bytes(tomli_w.dumps(sample).encode())
    real_exists = Path.exists
    monkeypatch.setattr(
        Path, "exists", lambda self: False if str(self) == "/dev/kvm" else real_exists(self)
    )
    code, _, err = run(capsys, ["--spec", str(spec), "--work-dir", str(work)], env)
    assert code == 2
    assert "/dev/kvm does not exist" in err and "--accel tcg" in err
