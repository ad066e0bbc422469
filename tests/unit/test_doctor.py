"""doctor: each check's verdict, with /dev and /proc pointed at files of the test's."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from microvm_run import doctor
from microvm_run.doctor import FAIL, OK, WARN, Check, DoctorPaths
from microvm_run.qemu import Accel

from .conftest import SAMPLE


def by_name(checks: list[Check], name: str) -> list[Check]:
    return [check for check in checks if check.name == name]


@pytest.fixture
def proc_sys(tmp_path: Path) -> Path:
    path = tmp_path / "proc-sys"
    (path / "kernel").mkdir(parents=True)
    (path / "user").mkdir()
    (path / "user" / "max_user_namespaces").write_text("15000\n")
    return path


@pytest.fixture
def tools(tmp_path: Path) -> Path:
    """A PATH directory with newuidmap and newgidmap."""
    path = tmp_path / "tools"
    path.mkdir()
    for name in ("newuidmap", "newgidmap"):
        (path / name).write_text("#!/bin/sh\n")
        (path / name).chmod(0o755)
    return path


def fake_program(path: Path, output: str, status: int = 0) -> Path:
    path.write_text(f"#!/bin/sh\necho '{output}'\nexit {status}\n")
    path.chmod(0o755)
    return path


@pytest.fixture
def spec_file(tmp_path: Path) -> Path:
    """A spec whose qemu and virtiofsd are scripts that print a version."""
    data: dict[str, Any] = {**SAMPLE}
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    data["host"] = {
        "qemu": str(fake_program(bin_dir / "qemu", "QEMU emulator version 9.9.9")),
        "virtiofsd": str(fake_program(bin_dir / "virtiofsd", "virtiofsd 1.13.2")),
    }
    for name in ("kernel", "initrd"):
        (tmp_path / name).write_text("")
    data["guest"] = {**SAMPLE["guest"], "kernel": "kernel", "initrd": "initrd"}
    path = tmp_path / "spec.toml"
    path.write_text(tomli_w.dumps(data))
    return path


@pytest.fixture
def env(tmp_path: Path, tools: Path) -> dict[str, str]:
    runtime = tmp_path / "xdg-run"
    runtime.mkdir(mode=0o700)
    return {
        "HOME": str(tmp_path / "home"),
        "XDG_DATA_HOME": str(tmp_path / "data"),
        "XDG_RUNTIME_DIR": str(runtime),
        "PATH": f"{tools}:/usr/bin:/bin",
    }


# -- the line format ------------------------------------------------------------------------


def test_a_line_says_status_what_and_fix() -> None:
    assert Check(FAIL, "/dev/kvm", "does not exist", "use --accel tcg").line() == (
        "FAIL  /dev/kvm: does not exist  — use --accel tcg"
    )
    assert Check(OK, "spec", "/s.toml", "never shown").line() == "ok    spec: /s.toml"
    assert doctor.exit_status([Check(OK, "a", ""), Check(WARN, "b", "")]) == 0
    assert doctor.exit_status([Check(OK, "a", ""), Check(FAIL, "b", "")]) == 1


# -- /dev/kvm ---------------------------------------------------------------------------------


def test_missing_kvm_fails_and_names_tcg(tmp_path: Path) -> None:
    check = doctor.check_kvm(tmp_path / "kvm", Accel.KVM)
    assert check.status == FAIL
    assert "does not exist" in check.detail
    assert "--accel tcg" in check.fix
    assert check.line().startswith(f"FAIL  {tmp_path / 'kvm'}: does not exist  — ")


def test_missing_kvm_is_only_a_warning_under_tcg(tmp_path: Path) -> None:
    assert doctor.check_kvm(tmp_path / "kvm", Accel.TCG).status == WARN


def test_kvm_that_is_not_a_device_fails(tmp_path: Path) -> None:
    (tmp_path / "kvm").write_text("")
    check = doctor.check_kvm(tmp_path / "kvm", Accel.KVM)
    assert check.status == FAIL
    assert "not a character device" in check.detail


def test_an_accessible_character_device_is_ok() -> None:
    # /dev/null stands in for a usable /dev/kvm.
    assert doctor.check_kvm(Path("/dev/null"), Accel.KVM).status == OK


def test_the_checks_use_the_injected_kvm_path(
    tmp_path: Path, env: dict[str, str], spec_file: Path, proc_sys: Path
) -> None:
    paths = DoctorPaths(kvm=tmp_path / "no-kvm", proc_sys=proc_sys)
    checks = list(doctor.iter_checks(env, spec_path=str(spec_file), paths=paths, uid=1000))
    (kvm,) = by_name(checks, str(tmp_path / "no-kvm"))
    assert kvm.status == FAIL
    assert doctor.exit_status(checks) == 1


# -- user namespaces ---------------------------------------------------------------------------


def test_user_namespaces_ok(proc_sys: Path, env: dict[str, str]) -> None:
    checks = doctor.check_userns(proc_sys, env, 1000)
    assert [c.status for c in checks] == [OK, OK]


@pytest.mark.parametrize(
    ("file", "value", "fix"),
    [
        ("kernel/unprivileged_userns_clone", "0", "unprivileged_userns_clone=1"),
        ("user/max_user_namespaces", "0", "max_user_namespaces="),
    ],
)
def test_disabled_user_namespaces_fail(
    proc_sys: Path, env: dict[str, str], file: str, value: str, fix: str
) -> None:
    (proc_sys / file).write_text(value + "\n")
    (check, _) = doctor.check_userns(proc_sys, env, 1000)
    assert check.status == FAIL
    assert "virtiofsd" in check.detail
    assert fix in check.fix


def test_apparmor_restriction_warns(proc_sys: Path, env: dict[str, str]) -> None:
    (proc_sys / "kernel" / "apparmor_restrict_unprivileged_userns").write_text("1\n")
    checks = doctor.check_userns(proc_sys, env, 1000)
    assert [c.status for c in by_name(checks, "AppArmor")] == [WARN]


def test_missing_newuidmap_fails(proc_sys: Path, env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "tools" / "newgidmap").unlink()
    env["PATH"] = str(tmp_path / "tools")
    (check,) = by_name(doctor.check_userns(proc_sys, env, 1000), "newuidmap")
    assert check.status == FAIL
    assert "newgidmap not on PATH" in check.detail
    assert "uidmap" in check.fix


def test_root_needs_no_user_namespaces(proc_sys: Path) -> None:
    (proc_sys / "user" / "max_user_namespaces").write_text("0\n")
    (check,) = doctor.check_userns(proc_sys, {"PATH": ""}, 0)
    assert check.status == OK
    assert "not needed as root" in check.detail


# -- the spec and its programs ------------------------------------------------------------------


def test_no_spec_fails() -> None:
    checks, spec = doctor.check_spec(None)
    assert spec is None
    assert [c.status for c in checks] == [FAIL]
    assert "MICROVM_RUN_SPEC" in checks[0].fix


def test_a_broken_spec_fails_with_its_reason(tmp_path: Path) -> None:
    (tmp_path / "spec.toml").write_text("spec_version = 99\n")
    checks, spec = doctor.check_spec(str(tmp_path / "spec.toml"))
    assert spec is None
    assert checks[0].status == FAIL
    assert "newer than this microvm-run" in checks[0].detail


def test_a_good_spec_and_its_versions(spec_file: Path, env: dict[str, str]) -> None:
    checks, spec = doctor.check_spec(str(spec_file))
    assert spec is not None
    assert [c.status for c in checks] == [OK] * 5
    versions = doctor.check_versions(spec, env)
    assert [(c.name, c.status, c.detail) for c in versions] == [
        ("qemu --version", OK, "QEMU emulator version 9.9.9"),
        ("virtiofsd --version", OK, "virtiofsd 1.13.2"),
    ]


def test_missing_kernel_and_failing_virtiofsd(
    spec_file: Path, env: dict[str, str], tmp_path: Path
) -> None:
    (tmp_path / "kernel").unlink()
    fake_program(tmp_path / "bin" / "virtiofsd", "error while loading shared libraries", 127)
    checks, spec = doctor.check_spec(str(spec_file))
    assert spec is not None
    (kernel,) = by_name(checks, "kernel")
    assert kernel.status == FAIL
    assert "missing or not readable" in kernel.detail
    versions = doctor.check_versions(spec, env)
    assert versions[1].status == FAIL
    assert versions[1].detail == "exit status 127: error while loading shared libraries"


# -- the user's environment -----------------------------------------------------------------------


def test_no_user_manager_is_a_warning_that_explains_the_fallback(env: dict[str, str]) -> None:
    check = doctor.check_user_manager(env)
    assert check.status == WARN
    assert "child processes" in check.detail


def test_runtime_dir(env: dict[str, str], tmp_path: Path) -> None:
    (check,) = doctor.check_runtime_dir(env, os.getuid())
    assert check.status == OK
    Path(env["XDG_RUNTIME_DIR"]).chmod(0o755)
    (check,) = doctor.check_runtime_dir(env, os.getuid())
    assert check.status == WARN
    assert "mode 0o755" in check.detail
    (check,) = doctor.check_runtime_dir(env | {"XDG_RUNTIME_DIR": ""}, 4242)
    assert check.status == WARN
    assert "/tmp/microvm-run-4242" in check.detail


def test_a_runtime_base_owned_by_someone_else_fails(env: dict[str, str]) -> None:
    base = Path(env["XDG_RUNTIME_DIR"]) / "microvm-run"
    base.mkdir()
    checks = doctor.check_runtime_dir(env, os.getuid() + 1)
    assert checks[-1].name == "runtime base"
    assert checks[-1].status == FAIL


def test_writable_data_home(tmp_path: Path) -> None:
    assert doctor.check_writable("homes", tmp_path / "a" / "b", "fix").status == OK
    assert "can be created" in doctor.check_writable("homes", tmp_path / "a", "fix").detail
    (tmp_path / "file").write_text("")
    # A regular file is no directory to create homes in.
    check = doctor.check_writable("homes", tmp_path / "file" / "x", "fix")
    assert check.status == FAIL


def test_free_space_warns_below_the_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert doctor.check_free_space("space", tmp_path / "not-yet").status == OK
    monkeypatch.setattr(doctor, "MIN_FREE_BYTES", 1 << 62)
    check = doctor.check_free_space("space", tmp_path / "not-yet")
    assert check.status == WARN
    assert f"GiB free at {tmp_path}" in check.detail


# -- --boot ----------------------------------------------------------------------------------------


def test_boot_runs_the_given_function_and_times_it(spec_file: Path) -> None:
    _, spec = doctor.check_spec(str(spec_file))
    calls: list[tuple[Path, str]] = []
    ticks = iter([10.0, 14.25])

    def boot(path: Path, accel: str) -> int:
        calls.append((path, accel))
        return 0

    check = doctor.check_boot(boot, spec, "tcg", clock=lambda: next(ticks))
    assert calls == [(spec_file, "tcg")]
    assert check.status == OK
    assert check.detail == "booted and ran `true` in 4.2 s (accel tcg)"


def test_boot_failures(spec_file: Path) -> None:
    _, spec = doctor.check_spec(str(spec_file))
    failed = doctor.check_boot(lambda *_: 124, spec, "kvm")
    assert failed.status == FAIL
    assert failed.detail.startswith("exit status 124 after ")

    def broken(*_: Any) -> int:
        raise RuntimeError("no qemu")

    assert "no qemu" in doctor.check_boot(broken, spec, "kvm").detail
    skipped = doctor.check_boot(lambda *_: 0, None, "kvm")
    assert skipped.status == FAIL
    assert "skipped" in skipped.detail


def test_the_checks_boot_last_and_only_when_asked(
    tmp_path: Path, env: dict[str, str], spec_file: Path, proc_sys: Path
) -> None:
    paths = DoctorPaths(kvm=Path("/dev/null"), proc_sys=proc_sys)
    checks = list(doctor.iter_checks(env, spec_path=str(spec_file), paths=paths, uid=os.getuid()))
    assert not by_name(checks, "boot")
    names = [c.name for c in checks]
    assert names[:1] == ["/dev/null"]
    assert "qemu --version" in names
    assert "free space for runtime files" in names
    booted = list(
        doctor.iter_checks(
            env, spec_path=str(spec_file), paths=paths, uid=os.getuid(), boot=lambda *_: 0
        )
    )
    assert booted[-1].name == "boot"
    assert booted[-1].status == OK
