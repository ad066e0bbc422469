"""state: the instance state file, /proc facts, and the agent homes' records."""

from __future__ import annotations

import os
import re
import shutil
import signal
import tomllib
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from microvm_run import home, process, state
from microvm_run.state import InstanceState
from tests.support.interrupt import wait_for

SLEEP = ["sleep", "60"]


def make_state(runtime_dir: Path, **overrides: Any) -> InstanceState:
    values: dict[str, Any] = {
        "id": runtime_dir.name,
        "agent": "claude",
        "project": Path("/home/alice/src/webapp"),
        "agent_home": Path("/home/alice/.local/share/claude-microvm/webapp-5d41402abc4b"),
        "spec": Path("/nix/store/s-claude-spec.toml"),
        "started": "2026-11-22T10:00:00+00:00",
        "runner_pid": 1234,
        "runner_start": 987654,
        "qmp_socket": runtime_dir / "qmp.sock",
        "qemu_pid": 1250,
        "qemu_start": 987700,
        "virtiofsd_pids": (1240, 1241),
        "virtiofsd_starts": (987690, 987691),
        "supervisor": "systemd",
        "units": ("webapp-claude-vm-virtiofsd-work-" + runtime_dir.name,),
        "memory_mib": 8192,
        "vcpus": 4,
        "net": "open",
        "ports": ("127.0.0.1:8080:80",),
    }
    values.update(overrides)
    return InstanceState(**values)


def make_instance(base: Path, instance_id: str, **overrides: Any) -> Path:
    """A runtime dir with a state file, as a runner would leave it."""
    runtime_dir = base / instance_id
    runtime_dir.mkdir(mode=0o700, parents=True)
    state.write_state(runtime_dir, make_state(runtime_dir, **overrides))
    return runtime_dir


def own_process() -> dict[str, int]:
    """Runner fields naming the test process itself: certainly alive."""
    start = state.process_start_time(os.getpid())
    assert start is not None
    return {"runner_pid": os.getpid(), "runner_start": start}


def spawn_sleep(name: str | None = None, tmp_path: Path | None = None) -> Any:
    argv = list(SLEEP)
    if name is not None:
        assert tmp_path is not None
        link = tmp_path / name
        link.symlink_to(shutil.which("sleep") or "/bin/sleep")
        argv[0] = str(link)
    child = process.spawn(argv, stdin=process.DEVNULL)
    wait_for(lambda: state.process_start_time(child.pid) is not None, 5)
    return child


# -- write / read ----------------------------------------------------------------------


def test_state_round_trips_and_the_file_is_private(tmp_path: Path) -> None:
    runtime_dir = tmp_path / "ab12cd34"
    runtime_dir.mkdir()
    written = make_state(runtime_dir)
    state.write_state(runtime_dir, written)
    read = state.read_state(runtime_dir)
    assert read == state.StateRead(written, None)
    info = (runtime_dir / state.STATE_FILE).stat()
    assert info.st_mode & 0o777 == 0o600
    assert sorted(p.name for p in runtime_dir.iterdir()) == ["state.toml"]


def test_the_file_has_the_documented_keys(tmp_path: Path) -> None:
    runtime_dir = tmp_path / "ab12cd34"
    runtime_dir.mkdir()
    state.write_state(runtime_dir, make_state(runtime_dir))
    data = tomllib.loads((runtime_dir / "state.toml").read_text())
    assert data["version"] == 1
    assert data["project"] == "/home/alice/src/webapp"
    assert data["virtiofsd_pids"] == [1240, 1241]
    assert data["qmp_socket"] == str(runtime_dir / "qmp.sock")
    assert list(data)[:3] == ["version", "id", "agent"]


def test_rewriting_replaces_and_a_leftover_tmp_does_not_block(tmp_path: Path) -> None:
    runtime_dir = tmp_path / "ab12cd34"
    runtime_dir.mkdir()
    state.write_state(runtime_dir, make_state(runtime_dir, qemu_pid=0, qemu_start=0))
    # A writer that died between creating the temporary file and renaming it.
    (runtime_dir / "state.toml.tmp").write_text("half a sta")
    later = make_state(runtime_dir, qemu_pid=4321, qemu_start=55)
    state.write_state(runtime_dir, later)
    assert state.read_state(runtime_dir).state == later
    assert not (runtime_dir / "state.toml.tmp").exists()


def test_a_leftover_tmp_symlink_is_replaced_not_followed(tmp_path: Path) -> None:
    runtime_dir = tmp_path / "ab12cd34"
    runtime_dir.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    (runtime_dir / "state.toml.tmp").symlink_to(victim)
    state.write_state(runtime_dir, make_state(runtime_dir))
    assert victim.read_text() == "keep me"
    assert state.read_state(runtime_dir).state is not None


def test_a_state_that_would_not_read_back_is_refused_at_the_writer(tmp_path: Path) -> None:
    runtime_dir = tmp_path / "ab12cd34"
    runtime_dir.mkdir()
    with pytest.raises(ValueError, match="not this directory"):
        state.write_state(runtime_dir, make_state(runtime_dir, id="other"))
    with pytest.raises(ValueError, match="net"):
        state.write_state(runtime_dir, make_state(runtime_dir, net="user"))
    assert list(runtime_dir.iterdir()) == []


def _valid(runtime_dir: Path) -> dict[str, Any]:
    return make_state(runtime_dir).to_toml()


GARBAGE: list[tuple[str, Any, str]] = [
    ("missing", None, "no state.toml"),
    ("empty", b"", "missing or non-integer version"),
    ("not toml", b"version = = 1\n", "not valid TOML"),
    ("not utf-8", b'version = 1\nid = "\xff\xfe"\n', "not UTF-8"),
    ("future version", {"version": 2}, "version 2 is newer"),
    ("version zero", {"version": 0}, "invalid version 0"),
    ("version string", {"version": "1"}, "non-integer version"),
    ("pid as string", {"runner_pid": "1234"}, "runner_pid must be an integer, not str"),
    ("pid as bool", {"runner_pid": True}, "runner_pid must be an integer, not bool"),
    ("pid zero", {"runner_pid": 0}, "runner_pid 0 is out of range"),
    ("pids not ints", {"virtiofsd_pids": [1, "2"]}, "virtiofsd_pids must be a list"),
    ("relative path", {"project": "src/webapp"}, "not an absolute path"),
    ("bad time", {"started": "yesterday"}, "not an ISO 8601 time"),
    ("bad net", {"net": "user"}, "net 'user' is not one of"),
    ("bad supervisor", {"supervisor": "cron"}, "supervisor"),
    ("unit like an option", {"units": ["--now"]}, "units has a malformed entry"),
    ("starts mismatch", {"virtiofsd_starts": [1]}, "virtiofsd_starts does not match"),
    ("other id", {"id": "ffffffff"}, "is not this directory's"),
    ("missing field", {"runner_start": None}, "missing runner_start"),
]


@pytest.mark.parametrize(("case", "change", "why"), GARBAGE, ids=[g[0] for g in GARBAGE])
def test_garbage_is_a_problem_not_an_exception(
    tmp_path: Path, case: str, change: Any, why: str
) -> None:
    runtime_dir = tmp_path / "ab12cd34"
    runtime_dir.mkdir()
    path = runtime_dir / "state.toml"
    if isinstance(change, bytes):
        path.write_bytes(change)
    elif isinstance(change, dict):
        data = _valid(runtime_dir)
        for key, value in change.items():
            if value is None:
                del data[key]
            else:
                data[key] = value
        path.write_text(tomli_w.dumps(data))
    read = state.read_state(runtime_dir)
    assert read.state is None
    assert read.problem is not None
    assert read.problem.startswith("unreadable state: ")
    assert why in read.problem


def test_a_huge_file_or_a_directory_is_unreadable(tmp_path: Path) -> None:
    huge = tmp_path / "aaaa"
    huge.mkdir()
    (huge / "state.toml").write_bytes(b"# " + b"x" * (state.MAX_STATE_BYTES + 10))
    assert "larger than" in (state.read_state(huge).problem or "")
    odd = tmp_path / "bbbb"
    (odd / "state.toml").mkdir(parents=True)
    assert "cannot read state.toml" in (state.read_state(odd).problem or "")


@pytest.mark.parametrize("nesting", [b"x = " + b"[" * 100_000, b"x = " + b"{a = " * 100_000])
def test_deeply_nested_toml_is_a_problem_not_a_recursion_error(
    tmp_path: Path, nesting: bytes
) -> None:
    runtime_dir = tmp_path / "ab12cd34"
    runtime_dir.mkdir()
    (runtime_dir / "state.toml").write_bytes(nesting[: state.MAX_STATE_BYTES])
    read = state.read_state(runtime_dir)
    assert read.state is None and read.problem is not None
    data = tmp_path / "data"
    path = make_home(data, tmp_path / "p", record=False)
    state.home_record_path(path).write_bytes(nesting[: state.MAX_STATE_BYTES])
    (record,) = state.scan_homes(data)
    assert record.project is None and (record.problem or "").startswith("record: ")


def test_unknown_keys_of_the_same_version_are_ignored(tmp_path: Path) -> None:
    runtime_dir = tmp_path / "ab12cd34"
    runtime_dir.mkdir()
    data = _valid(runtime_dir) | {"added_later": "x"}
    (runtime_dir / "state.toml").write_text(tomli_w.dumps(data))
    assert state.read_state(runtime_dir).state == make_state(runtime_dir)


def test_scan_lists_directories_only_with_their_state_or_problem(tmp_path: Path) -> None:
    base = tmp_path / "run"
    make_instance(base, "bbbb")
    (base / "aaaa").mkdir()
    (base / "stray-file").write_text("x")
    (base / "link").symlink_to(base / "bbbb")
    entries = state.scan(base)
    assert [e.id for e in entries] == ["aaaa", "bbbb"]
    assert entries[0].state is None
    assert entries[0].problem == "unreadable state: no state.toml"
    assert entries[1].state is not None
    assert entries[1].problem is None
    assert state.scan(tmp_path / "absent") == []


def test_base_problem_refuses_what_is_not_our_directory(tmp_path: Path) -> None:
    assert state.base_problem(tmp_path / "absent", os.getuid()) is None
    assert state.base_problem(tmp_path, os.getuid()) is None
    assert "not a directory owned by you" in (state.base_problem(tmp_path, os.getuid() + 1) or "")
    (tmp_path / "file").write_text("")
    assert state.base_problem(tmp_path / "file", os.getuid()) is not None


# -- /proc --------------------------------------------------------------------------------


def _fake_stat(proc: Path, pid: int, comm: str, state_letter: str, start: int) -> None:
    fields = [state_letter] + ["0"] * 18 + [str(start)] + ["0"] * 30
    (proc / str(pid)).mkdir(parents=True)
    (proc / str(pid) / "stat").write_text(f"{pid} ({comm}) {' '.join(fields)}\n")


def test_start_time_is_counted_from_the_last_parenthesis(tmp_path: Path) -> None:
    # A comm such as "a) R 1 2 (b" would shift every field if split naively.
    _fake_stat(tmp_path, 42, "a) R 1 2 3 (b", "S", 777)
    assert state.process_start_time(42, tmp_path) == 777
    assert state.is_alive(42, 777, tmp_path)
    assert not state.is_alive(42, 778, tmp_path)


def test_a_zombie_or_a_mangled_stat_counts_as_gone(tmp_path: Path) -> None:
    _fake_stat(tmp_path, 43, "sleep", "Z", 777)
    assert state.process_start_time(43, tmp_path) is None
    (tmp_path / "44").mkdir()
    (tmp_path / "44" / "stat").write_text("44 no parenthesis at all")
    assert state.process_start_time(44, tmp_path) is None
    (tmp_path / "45").mkdir()
    (tmp_path / "45" / "stat").write_text("45 (short) S 1")
    assert state.process_start_time(45, tmp_path) is None
    assert state.process_start_time(46, tmp_path) is None
    assert state.process_start_time(0) is None
    assert state.process_start_time(-1) is None


def test_own_start_time_matches_proc(tmp_path: Path) -> None:
    raw = Path(f"/proc/{os.getpid()}/stat").read_text()
    expected = int(raw.rsplit(")", 1)[1].split()[19])
    assert state.process_start_time(os.getpid()) == expected
    assert state.is_alive(os.getpid(), expected)


def test_a_real_process_with_parentheses_in_its_name(tmp_path: Path) -> None:
    child = spawn_sleep("x) S 9 (y", tmp_path)
    try:
        stat_text = Path(f"/proc/{child.pid}/stat").read_text()
        assert "(x) S 9 (y)" in stat_text
        start = int(re.sub(r"^.*\) ", "", stat_text, flags=re.S).split()[19])
        assert state.process_start_time(child.pid) == start
        assert state.is_alive(child.pid, start)
        # The pid-reuse guard: same pid, other start time.
        assert not state.is_alive(child.pid, start + 1)
        assert not state.is_alive(child.pid, 0)
    finally:
        child.kill()
        child.wait()
    assert not state.is_alive(child.pid, start)


def test_an_exited_unreaped_child_is_not_alive() -> None:
    child = spawn_sleep()
    start = state.process_start_time(child.pid)
    assert start is not None
    os.kill(child.pid, signal.SIGTERM)
    wait_for(lambda: not state.is_alive(child.pid, start), 5)  # a zombie until reaped
    assert Path(f"/proc/{child.pid}").exists()
    child.wait()


def test_open_verified_checks_the_start_time_after_opening() -> None:
    child = spawn_sleep()
    try:
        start = state.process_start_time(child.pid)
        assert start is not None
        assert state.open_verified(child.pid, start + 1) is None
        assert state.open_verified(child.pid, 0) is None
        pidfd = state.open_verified(child.pid, start)
        assert pidfd is not None
        signal.pidfd_send_signal(pidfd, signal.SIGTERM)
        os.close(pidfd)
        assert child.wait(timeout=5) == -signal.SIGTERM
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_rss(tmp_path: Path) -> None:
    own = state.rss_kib(os.getpid())
    assert own is not None
    assert own > 1000  # a Python interpreter is more than a MiB
    (tmp_path / "7").mkdir()
    (tmp_path / "7" / "status").write_text("Name:\tkthreadd\nState:\tS\n")
    assert state.rss_kib(7, tmp_path) is None
    (tmp_path / "8").mkdir()
    (tmp_path / "8" / "status").write_text("Name:\tx\nVmRSS:\t  312 kB\n")
    assert state.rss_kib(8, tmp_path) == 312
    assert state.rss_kib(9, tmp_path) is None
    assert state.rss_kib(0) is None


# -- agent homes ---------------------------------------------------------------------------


def make_home(data_home: Path, project: Path, agent: str = "claude", record: bool = True) -> Path:
    path = home.agent_home(agent, project, data_home)
    path.mkdir(parents=True)
    if record:
        state.write_home_record(path, project, agent)
    return path


def test_the_home_record_lives_beside_the_home(tmp_path: Path) -> None:
    project = tmp_path / "webapp"
    project.mkdir()
    path = make_home(tmp_path / "data", project)
    sidecar = path.parent / (path.name + ".project.toml")
    assert sidecar.is_file()
    assert sidecar.stat().st_mode & 0o777 == 0o600
    assert list(path.iterdir()) == []  # nothing inside the shared home
    assert not sidecar.with_name(sidecar.name + ".tmp").exists()


def test_scan_homes_reports_each_home(tmp_path: Path) -> None:
    data = tmp_path / "data"
    alive = tmp_path / "alive"
    alive.mkdir()
    gone = tmp_path / "gone"
    gone.mkdir()
    kept = make_home(data, alive)
    orphan = make_home(data, gone)
    gone.rmdir()
    unknown = make_home(data, tmp_path / "whatever", agent="codex", record=False)
    (data / "not-ours").mkdir()
    (data / "claude-microvm" / "symlinked").symlink_to(tmp_path)
    records = {r.path: r for r in state.scan_homes(data)}
    assert set(records) == {kept, orphan, unknown}
    assert records[kept].matches
    assert records[kept].project_exists is True
    assert records[orphan].matches
    assert records[orphan].project == gone
    assert records[orphan].project_exists is False
    assert records[unknown].project is None
    assert not records[unknown].matches
    assert records[unknown].agent == "codex"
    assert "no " in (records[unknown].problem or "")


def test_a_record_naming_another_project_does_not_match(tmp_path: Path) -> None:
    data = tmp_path / "data"
    path = make_home(data, tmp_path / "mine", record=False)
    state.write_home_record(path, tmp_path / "someone-else", "claude")
    (record,) = state.scan_homes(data)
    assert not record.matches
    assert "whose home is elsewhere" in (record.problem or "")
    # The agent is part of the formula too.
    state.write_home_record(path, tmp_path / "mine", "codex")
    (record,) = state.scan_homes(data)
    assert not record.matches


@pytest.mark.parametrize(
    "content",
    [b"garbage = = ", b"version = 2\nagent='claude'\nproject='/x'\n", b"version = 1\n"],
)
def test_a_garbage_record_is_unknown(tmp_path: Path, content: bytes) -> None:
    data = tmp_path / "data"
    path = make_home(data, tmp_path / "p", record=False)
    state.home_record_path(path).write_bytes(content)
    (record,) = state.scan_homes(data)
    assert record.project is None
    assert not record.matches
    assert (record.problem or "").startswith("record: ")


def test_project_exists_says_gone_only_when_certain(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    assert state.project_exists(tmp_path) is True
    assert state.project_exists(tmp_path / "absent") is False
    assert state.project_exists(tmp_path / "file" / "below") is False
    # Any other error (here ENAMETOOLONG; EACCES, EIO on a dead mount) is "cannot tell".
    assert state.project_exists(tmp_path / ("x" * 300)) is None


def test_scan_homes_uses_the_given_existence_check(tmp_path: Path) -> None:
    data = tmp_path / "data"
    make_home(data, tmp_path / "p")
    (record,) = state.scan_homes(data, exists=lambda _: None)
    assert record.project_exists is None


def test_the_agents_branch_round_trips_and_old_states_have_none(tmp_path: Path) -> None:
    runtime_dir = tmp_path / "ab12cd34"
    runtime_dir.mkdir()
    written = make_state(runtime_dir, branch="agent/fix-login")
    state.write_state(runtime_dir, written)
    assert state.read_state(runtime_dir).state == written
    path = runtime_dir / "state.toml"
    path.write_text(path.read_text().replace('branch = "agent/fix-login"\n', ""))
    assert state.read_state(runtime_dir).state == replace(written, branch="")
    path.write_text(path.read_text() + 'branch = "main; rm -rf"\n')
    assert state.read_state(runtime_dir).problem is not None
