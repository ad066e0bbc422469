"""host: where the runner's own files go, decided before anything is created."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from microvm_run import host


def test_without_a_runtime_dir_the_tmp_fallback_is_used_when_free_or_ours(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake_tmp = tmp_path / "tmp"
    fake_tmp.mkdir()
    real = Path

    def in_fake_tmp(*parts: str) -> Path:
        if parts == ("/tmp",):
            return fake_tmp
        return real(*parts)

    monkeypatch.setattr(host, "Path", in_fake_tmp)
    env = {"HOME": str(tmp_path / "home")}
    uid = os.getuid()
    assert host.runtime_base(env, uid) == fake_tmp / f"microvm-run-{uid}"
    (fake_tmp / f"microvm-run-{uid}").mkdir()
    assert host.runtime_base(env, uid) == fake_tmp / f"microvm-run-{uid}"


def test_a_squatted_tmp_fallback_moves_to_the_users_state_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake_tmp = tmp_path / "tmp"
    fake_tmp.mkdir()
    real = Path
    monkeypatch.setattr(host, "Path", lambda *p: fake_tmp if p == ("/tmp",) else real(*p))
    env = {"HOME": str(tmp_path / "home")}
    squatted = fake_tmp / f"microvm-run-{os.getuid() + 1}"
    squatted.symlink_to(tmp_path)  # another user's trap: not a directory of ours
    expected = tmp_path / "home" / ".local" / "state" / "microvm-run" / "runtime"
    assert host.runtime_base(env, os.getuid() + 1) == expected
    squatted.unlink()
    squatted.mkdir()  # a real directory, but owned by us, not by uid + 1
    assert host.runtime_base(env, os.getuid() + 1) == expected


def test_the_runners_own_files_are_outside_the_agent_home(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path)}
    work = Path("/src/proj")
    home = host.data_home(env)
    for path in (host.project_state_dir(work, env), host.cri_storage_dir("claude", work, env)):
        assert not path.is_relative_to(home)
        assert path.name == host.project_key(work)


def test_a_work_dir_of_another_user_is_refused(tmp_path: Path) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root to chown")
    other = tmp_path / "other"
    other.mkdir()
    os.chown(other, 4242, 4242)
    with pytest.raises(host.HostError, match="owned by uid 4242"):
        host.resolve_work_dir(str(other), None, allow_home=False)


def test_the_user_manager_answers_only_where_something_listens(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("systemd-run", "systemctl"):
        (bin_dir / tool).write_text("#!/bin/sh\n")
        (bin_dir / tool).chmod(0o755)
    run = tmp_path / "run"
    (run / "systemd").mkdir(parents=True)
    environ = {"PATH": str(bin_dir), "XDG_RUNTIME_DIR": str(run)}
    private = run / "systemd" / "private"
    answers, why = host.user_manager(environ)
    assert not answers
    assert f"no user manager at {private}" in why
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(private))
        listener.listen()
        assert host.user_manager(environ) == (True, f"user manager at {private}")
    # A socket file left behind by a manager that is gone.
    assert private.exists()
    assert not host.user_manager(environ)[0]
    assert not host.user_manager({**environ, "PATH": str(tmp_path / "none")})[0]
