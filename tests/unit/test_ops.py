"""ops: ps, stop and gc over fake runtime dirs, with real short-lived processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from microvm_run import host, ops, process, qmp, state
from microvm_run.state import Entry
from tests.support.deeptree import dig
from tests.support.interrupt import wait_for

from .test_state import make_home, make_instance, make_state, own_process, spawn_sleep

# A stand-in runner: says it is ready, then waits; on SIGTERM it records
# whether `microvm-run stop` left its mark, then exits (or ignores SIGTERM).
RUNNER = """
import os, signal, sys, time
runtime_dir, seen, ignore = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
def on_term(signum, frame):
    with open(seen, "w") as f:
        f.write(str(os.path.exists(os.path.join(runtime_dir, "stop-requested"))))
    if not ignore:
        sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
open(seen + ".ready", "w").close()
while True:
    time.sleep(0.05)
"""


@pytest.fixture
def base(tmp_path: Path) -> Path:
    path = tmp_path / "run" / "microvm-run"
    path.mkdir(parents=True, mode=0o700)
    return path


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    # No XDG_RUNTIME_DIR: no user manager, so nothing reaches the real systemctl.
    return {
        "HOME": str(tmp_path / "home"),
        "XDG_DATA_HOME": str(tmp_path / "data"),
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
    }


class Runner:
    """A real process standing in for a runner, started through microvm_run.process."""

    def __init__(self, runtime_dir: Path, tmp_path: Path, *, ignore_term: bool = False) -> None:
        self.seen = tmp_path / f"seen-{runtime_dir.name}"
        self.child = process.spawn(
            [sys.executable, "-c", RUNNER, str(runtime_dir), str(self.seen), str(int(ignore_term))],
            stdin=process.DEVNULL,
        )
        wait_for(Path(f"{self.seen}.ready").exists, 10)
        start = state.process_start_time(self.child.pid)
        assert start is not None
        self.fields = {"runner_pid": self.child.pid, "runner_start": start}

    def gone(self) -> bool:
        return self.child.poll() is not None

    def close(self) -> None:
        if self.child.poll() is None:
            self.child.kill()
        self.child.wait()


@pytest.fixture
def runners() -> Iterator[list[Runner]]:
    started: list[Runner] = []
    yield started
    for runner in started:
        runner.close()


def start_runner(
    runners: list[Runner], base: Path, tmp_path: Path, instance_id: str, **kwargs: Any
) -> tuple[Runner, Path]:
    runtime_dir = base / instance_id
    runtime_dir.mkdir(mode=0o700)
    runner = Runner(runtime_dir, tmp_path, ignore_term=kwargs.pop("ignore_term", False))
    runners.append(runner)
    fields = runner.fields | {"qemu_pid": 0, "qemu_start": 0} | kwargs
    state.write_state(runtime_dir, make_state(runtime_dir, **fields))
    return runner, runtime_dir


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


# -- judge -------------------------------------------------------------------------------


def entry(path: Path, *, with_state: bool, mtime: float = 0.0) -> Entry:
    st = make_state(path) if with_state else None
    problem = None if with_state else "unreadable state: no state.toml"
    return Entry(path, st, problem, mtime)


def never(_: Path) -> bool:
    return False


def test_judge_trusts_the_runner_pid_and_start_time() -> None:
    path = Path("/run/x/ab12cd34")
    seen: list[tuple[int, int]] = []

    def alive(pid: int, start: int) -> bool:
        seen.append((pid, start))
        return True

    verdict = ops.judge(entry(path, with_state=True), now=1e9, alive=alive, qmp_answers=never)
    assert verdict.live
    assert seen == [(1234, 987654)]
    verdict = ops.judge(
        entry(path, with_state=True), now=1e9, alive=lambda *_: False, qmp_answers=never
    )
    assert not verdict.live
    assert "runner 1234 has exited" in verdict.reason


def test_judge_leaves_a_young_or_answering_unreadable_dir_alone() -> None:
    path = Path("/run/x/ab12cd34")
    young = entry(path, with_state=False, mtime=1000.0)
    assert ops.judge(young, now=1000.0 + 59, alive=lambda *_: False, qmp_answers=never).live
    old = entry(path, with_state=False, mtime=1000.0)
    verdict = ops.judge(old, now=1000.0 + 61, alive=lambda *_: False, qmp_answers=never)
    assert not verdict.live
    assert "no state.toml" in verdict.reason
    probed: list[Path] = []

    def answers(sock: Path) -> bool:
        probed.append(sock)
        return True

    verdict = ops.judge(old, now=1000.0 + 61, alive=lambda *_: False, qmp_answers=answers)
    assert verdict.live
    assert probed == [path / "qmp.sock"]


# -- ps ------------------------------------------------------------------------------------


def test_ps_shows_a_live_instance_with_its_memory(base: Path) -> None:
    me = own_process()
    make_instance(
        base,
        "ab12cd34",
        **me,
        qemu_pid=me["runner_pid"],
        qemu_start=me["runner_start"],
        virtiofsd_pids=(me["runner_pid"], 999_999_999),
        virtiofsd_starts=(me["runner_start"], 5),
    )
    result = ops.ps(base)
    assert result.stale == 0
    (row,) = result.rows
    assert row.id == "ab12cd34"
    assert row.agent == "claude"
    assert row.project == Path("/home/alice/src/webapp")
    assert row.runner_pid == os.getpid()
    own = state.rss_kib(os.getpid())
    assert own is not None
    # qemu and one virtiofsd are this process; the other virtiofsd does not exist.
    assert row.memory_kib is not None
    assert abs(row.memory_kib - 2 * own) < 0.2 * own
    assert row.ports == ("127.0.0.1:8080:80",)
    assert json.loads(json.dumps(row.to_dict()))["memory_kib"] == row.memory_kib


def test_ps_counts_dead_instances_as_stale_and_hides_them(base: Path) -> None:
    make_instance(base, "dead0001", runner_pid=999_999_999, runner_start=5)
    make_instance(base, "live0001", **own_process(), qemu_pid=0, qemu_start=0)
    (base / "young001").mkdir()
    old = base / "old00001"
    old.mkdir()
    age(old, 120)
    result = ops.ps(base, qmp_answers=never)
    assert [row.id for row in result.rows] == ["live0001"]
    assert result.rows[0].memory_kib is None  # QEMU not started yet
    assert result.stale == 2


def test_ps_pid_reuse_is_not_a_live_instance(base: Path) -> None:
    me = own_process()
    make_instance(
        base, "reused01", runner_pid=me["runner_pid"], runner_start=me["runner_start"] + 1
    )
    result = ops.ps(base)
    assert result.rows == []
    assert result.stale == 1


# -- select -------------------------------------------------------------------------------


def test_select_by_id_prefix_and_all(tmp_path: Path) -> None:
    entries = [
        entry(tmp_path / "ab12cd34", with_state=True),
        entry(tmp_path / "ab99ffff", with_state=True),
        entry(tmp_path / "cd000000", with_state=False),
    ]
    assert ops.select(entries, ["ab12cd34"], lambda *_: True) == [entries[0]]
    assert ops.select(entries, ["ab1", "ab12"], lambda *_: True) == [entries[0]]
    assert ops.select(entries, ["cd"], lambda *_: True) == [entries[2]]
    with pytest.raises(ops.OpsError, match="ambiguous: ab12cd34, ab99ffff"):
        ops.select(entries, ["ab"], lambda *_: True)
    with pytest.raises(ops.OpsError, match="no instance 'ef'"):
        ops.select(entries, ["ef"], lambda *_: True)
    with pytest.raises(ops.OpsError):
        ops.select(entries, [""], lambda *_: True)
    assert ops.select(entries, None, lambda pid, start: True) == entries[:2]
    assert ops.select(entries, None, lambda pid, start: False) == []


# -- stop ------------------------------------------------------------------------------------


def test_stop_terminates_a_runner_without_qmp_and_marks_the_request(
    base: Path, tmp_path: Path, env: dict[str, str], runners: list[Runner]
) -> None:
    runner, runtime_dir = start_runner(runners, base, tmp_path, "ab12cd34")
    (result,) = ops.stop(base, ["ab12"], 5.0, env, uid=os.getuid())
    assert result.outcome == ops.StopOutcome.TERMINATED
    assert "QEMU not started" in result.detail
    assert runner.gone()
    assert runner.seen.read_text() == "True"
    # A real runner removes its runtime dir; this one did not, so stop did.
    assert not runtime_dir.exists()
    assert any(a.what == f"removed {runtime_dir}" for a in result.cleaned)


def test_stop_kills_a_runner_that_ignores_sigterm(
    base: Path, tmp_path: Path, env: dict[str, str], runners: list[Runner]
) -> None:
    runner, runtime_dir = start_runner(runners, base, tmp_path, "ab12cd34", ignore_term=True)
    started = time.monotonic()
    (result,) = ops.stop(base, None, 0.0, env, uid=os.getuid(), term_grace_s=0.5)
    assert result.outcome == ops.StopOutcome.KILLED
    assert time.monotonic() - started < 5
    assert runner.gone()
    assert runner.seen.read_text() == "True"  # SIGTERM came first
    assert not runtime_dir.exists()


def test_stop_never_signals_a_reused_pid(base: Path, env: dict[str, str], tmp_path: Path) -> None:
    stranger = spawn_sleep()
    try:
        start = state.process_start_time(stranger.pid)
        assert start is not None
        make_instance(base, "ab12cd34", runner_pid=stranger.pid, runner_start=start + 1)
        (result,) = ops.stop(base, ["ab12cd34"], 0.0, env, uid=os.getuid(), term_grace_s=0.2)
        assert result.outcome == ops.StopOutcome.NOT_RUNNING
        assert "gc" in result.detail
        time.sleep(0.1)
        assert stranger.poll() is None
        assert (base / "ab12cd34").exists()  # stop leaves stale dirs to gc
    finally:
        stranger.kill()
        stranger.wait()


def test_stop_unknown_or_ambiguous_ids_are_errors(base: Path, env: dict[str, str]) -> None:
    make_instance(base, "ab12cd34", runner_pid=999_999_999, runner_start=5)
    with pytest.raises(ops.OpsError, match="no instance"):
        ops.stop(base, ["ff"], 0.0, env, uid=os.getuid())
    assert ops.stop(base, None, 0.0, env, uid=os.getuid()) == []


def test_stop_refuses_a_base_that_is_not_ours(base: Path, env: dict[str, str]) -> None:
    with pytest.raises(ops.OpsError, match="not a directory owned by you"):
        ops.stop(base, None, 0.0, env, uid=os.getuid() + 1)


class FakeQmp:
    """A QMP server on a unix socket: greets, answers, and on system_powerdown
    ends the fake runner (as a guest powering off would end QEMU and the runner)."""

    def __init__(self, path: Path, on_powerdown: Any, error: str | None = None) -> None:
        self.commands: list[str] = []
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(1)
        self.on_powerdown = on_powerdown
        self.error = error
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.server.accept()
        with conn, conn.makefile("rwb") as stream:
            stream.write(b'{"QMP": {"version": {}, "capabilities": []}}\n')
            stream.flush()
            for line in stream:
                command = json.loads(line)["execute"]
                self.commands.append(command)
                if command == "system_powerdown" and self.error:
                    reply = {"error": {"class": "GenericError", "desc": self.error}}
                    stream.write(json.dumps(reply).encode() + b"\n")
                    stream.flush()
                    continue
                if command == "system_powerdown":
                    stream.write(b'{"event": "POWERDOWN", "data": {}}\n')
                stream.write(b'{"return": {}}\n')
                stream.flush()
                if command == "system_powerdown":
                    self.on_powerdown()

    def close(self) -> None:
        self.server.close()


def test_stop_powers_off_through_qmp_first(
    base: Path, tmp_path: Path, env: dict[str, str], runners: list[Runner]
) -> None:
    runtime_dir = base / "ab12cd34"
    runtime_dir.mkdir(mode=0o700)
    runner = Runner(runtime_dir, tmp_path)
    runners.append(runner)
    qmp = FakeQmp(runtime_dir / "qmp.sock", runner.child.kill)
    try:
        fields = runner.fields | {"qemu_pid": runner.fields["runner_pid"]}
        fields["qemu_start"] = runner.fields["runner_start"]
        state.write_state(runtime_dir, make_state(runtime_dir, **fields))
        (result,) = ops.stop(base, ["ab12cd34"], 5.0, env, uid=os.getuid())
    finally:
        qmp.close()
    assert result.outcome == ops.StopOutcome.POWERED_OFF
    assert qmp.commands == ["qmp_capabilities", "system_powerdown"]
    assert not runner.seen.exists()  # no SIGTERM was needed


def test_qmp_powerdown_reports_why_not(tmp_path: Path) -> None:
    assert "QMP" in (qmp.powerdown(tmp_path / "absent.sock") or "")
    fake = FakeQmp(tmp_path / "qmp.sock", lambda: None, error="guest refuses")
    try:
        assert qmp.powerdown(tmp_path / "qmp.sock") == ("system_powerdown failed: guest refuses")
    finally:
        fake.close()
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.bind(str(tmp_path / "silent.sock"))
    silent.listen(1)
    try:
        answer = qmp.powerdown(tmp_path / "silent.sock", timeout=0.2)
        assert answer == "QMP did not answer within 0.2 s"
        assert qmp.probe(tmp_path / "silent.sock")
        assert not qmp.probe(tmp_path / "absent.sock")
    finally:
        silent.close()


# -- gc ----------------------------------------------------------------------------------------


def run_gc(base: Path, env: dict[str, str], **kwargs: Any) -> ops.GcReport:
    options: dict[str, Any] = {"prune": False, "confirm": lambda _: False, "uid": os.getuid()}
    options.update(kwargs)
    return ops.gc(base, env, **options)


def test_gc_leaves_live_instances_alone(base: Path, env: dict[str, str]) -> None:
    me = own_process()
    live = make_instance(base, "live0001", **me, qemu_pid=me["runner_pid"],
                         qemu_start=me["runner_start"])  # fmt: skip
    young = base / "young001"
    young.mkdir()
    report = run_gc(base, env)
    assert report.actions == []
    assert {v.entry.id for v in report.live} == {"live0001", "young001"}
    assert live.exists()
    assert young.exists()


def test_gc_removes_a_dead_instance_and_reports_it(base: Path, env: dict[str, str]) -> None:
    dead = make_instance(base, "dead0001", runner_pid=999_999_999, runner_start=5, units=())
    (dead / "fs-work.sock").write_text("")
    (dead / "credentials").mkdir()
    (dead / "credentials" / "ANTHROPIC_API_KEY").write_text("sk-secret")
    report = run_gc(base, env)
    assert not dead.exists()
    whats = [(a.id, a.what) for a in report.actions]
    assert ("dead0001", "stale: runner 999999999 has exited") in whats
    assert ("dead0001", f"removed {dead}") in whats
    assert report.ok


def test_gc_undoes_what_the_guest_of_a_killed_runner_left_in_the_shares(
    base: Path, env: dict[str, str], tmp_path: Path
) -> None:
    project, home = tmp_path / "project", tmp_path / "agent-home"
    for directory in (project, home):
        directory.mkdir()
        directory.chmod(0o777)
        (directory / "tool").write_text("")
        (directory / "tool").chmod(0o4755)
    make_instance(
        base, "dead0002", runner_pid=999_999_999, runner_start=5, units=(),
        project=project, agent_home=home,
    )  # fmt: skip
    report = run_gc(base, env)
    assert (project.stat().st_mode & 0o777, home.stat().st_mode & 0o777) == (0o755, 0o700)
    assert all((d / "tool").stat().st_mode & 0o7777 == 0o755 for d in (project, home))
    assert ("dead0002", "removed set-uid/set-gid bits the guest set on 2 file(s)") in [
        (a.id, a.what) for a in report.actions
    ]


def test_gc_removes_an_old_unreadable_dir_but_not_one_whose_qemu_answers(
    base: Path, env: dict[str, str]
) -> None:
    old = base / "old00001"
    old.mkdir()
    (old / "state.toml").write_text("garbage = = =")
    age(old, 120)
    answering = base / "answer01"
    answering.mkdir()
    age(answering, 120)
    report = run_gc(base, env, qmp_answers=lambda sock: sock.parent == answering)
    assert not old.exists()
    assert answering.exists()
    assert any("not valid TOML" in a.what for a in report.actions)


def test_gc_kills_leftovers_whose_start_time_matches_only(base: Path, env: dict[str, str]) -> None:
    # A wedged leftover: it ignores SIGTERM, so only the ladder's SIGKILL ends it.
    # (An ignored signal stays ignored across exec.)
    leftover = process.spawn(["sh", "-c", "trap '' TERM; exec sleep 60"], stdin=process.DEVNULL)
    wait_for(lambda: state.process_start_time(leftover.pid) is not None, 5)
    stranger = spawn_sleep()
    try:
        leftover_start = state.process_start_time(leftover.pid)
        stranger_start = state.process_start_time(stranger.pid)
        assert leftover_start is not None
        assert stranger_start is not None
        make_instance(
            base,
            "dead0001",
            runner_pid=999_999_999,
            runner_start=5,
            qemu_pid=leftover.pid,
            qemu_start=leftover_start,
            virtiofsd_pids=(stranger.pid,),
            virtiofsd_starts=(stranger_start + 7,),  # the pid was reused since
            units=(),
        )
        report = run_gc(base, env)
        assert leftover.wait(timeout=5) == -signal.SIGKILL
        assert stranger.poll() is None
        whats = [a.what for a in report.actions]
        assert f"killed leftover qemu (pid {leftover.pid})" in whats
        assert not any("virtiofsd" in what for what in whats)
    finally:
        for child in (leftover, stranger):
            if child.poll() is None:
                child.kill()
            child.wait()


def test_gc_without_a_user_manager_says_it_cannot_stop_units(
    base: Path, env: dict[str, str], tmp_path: Path
) -> None:
    # systemd's tools on PATH (as on a user's host, unlike the Nix build
    # sandbox), so the missing manager is what gc reports; they must not run.
    tools = tmp_path / "systemd-bin"
    tools.mkdir()
    for name in ("systemd-run", "systemctl"):
        (tools / name).write_text(f"#!{sys.executable}\nraise SystemExit(99)\n")
        (tools / name).chmod(0o755)
    env = {**env, "PATH": f"{tools}:{env['PATH']}"}
    dead = make_instance(base, "dead0001", runner_pid=999_999_999, runner_start=5)
    report = run_gc(base, env)
    failed = [a for a in report.actions if not a.ok]
    assert len(failed) == 1
    assert "cannot stop units webapp-claude-vm-virtiofsd-work-dead0001" in failed[0].what
    assert "XDG_RUNTIME_DIR is not set" in failed[0].what
    assert not dead.exists()
    assert not report.ok


def test_gc_touches_nothing_in_a_base_that_is_not_ours(base: Path, env: dict[str, str]) -> None:
    dead = make_instance(base, "dead0001", runner_pid=999_999_999, runner_start=5)
    report = run_gc(base, env, uid=os.getuid() + 1)
    assert dead.exists()
    assert not report.ok


# -- gc: homes -----------------------------------------------------------------------------------


@pytest.fixture
def homes(tmp_path: Path, env: dict[str, str]) -> dict[str, Path]:
    data = Path(env["XDG_DATA_HOME"])
    made = {}
    for name in ("gone1", "gone2", "alive"):
        project = tmp_path / name
        project.mkdir()
        made[name] = make_home(data, project)
        (made[name] / ".claude.json").write_text("{}")
    (tmp_path / "gone1").rmdir()
    (tmp_path / "gone2").rmdir()
    # A home whose record points at another (gone) project: never pruned.
    made["mismatch"] = make_home(data, tmp_path / "mismatch", record=False)
    state.write_home_record(made["mismatch"], tmp_path / "gone1", "claude")
    made["unrecorded"] = make_home(data, tmp_path / "unrecorded", record=False)
    return made


def test_gc_lists_orphaned_homes_without_prune(
    base: Path, env: dict[str, str], homes: dict[str, Path]
) -> None:
    asked: list[str] = []

    def confirm(question: str) -> bool:
        asked.append(question)
        return True

    report = run_gc(base, env, confirm=confirm)
    assert asked == []
    said = {h.record.path: h.what for h in report.homes}
    assert said[homes["gone1"]].endswith("is gone (microvm-run gc --prune deletes it)")
    assert said[homes["mismatch"]].startswith("unknown project, left alone")
    assert said[homes["unrecorded"]].startswith("unknown project, left alone")
    assert homes["alive"] not in said
    assert all(path.exists() for path in homes.values())


def test_prune_asks_and_deletes_only_confirmed_homes(
    base: Path, env: dict[str, str], homes: dict[str, Path]
) -> None:
    asked: list[str] = []

    def confirm(question: str) -> bool:
        asked.append(question)
        return str(homes["gone1"]) in question

    report = run_gc(base, env, prune=True, confirm=confirm)
    assert sorted(asked) == sorted(
        f"delete {homes[name]} (project {homes[name].parents[2] / name} is gone)?"
        for name in ("gone1", "gone2")
    )
    assert not homes["gone1"].exists()
    assert not state.home_record_path(homes["gone1"]).exists()
    for name in ("gone2", "alive", "mismatch", "unrecorded"):
        assert homes[name].exists(), name
    assert state.home_record_path(homes["mismatch"]).exists()
    said = {h.record.path: h.what for h in report.homes}
    assert said[homes["gone1"]].startswith("deleted")
    assert said[homes["gone2"]].startswith("kept")


def test_prune_spares_a_home_a_running_instance_uses(
    base: Path, env: dict[str, str], homes: dict[str, Path]
) -> None:
    make_instance(base, "live0001", **own_process(), agent_home=homes["gone1"])
    report = run_gc(base, env, prune=True, confirm=lambda _: True)
    assert homes["gone1"].exists()
    assert not homes["gone2"].exists()
    said = {h.record.path: h.what for h in report.homes}
    assert "a running instance uses it" in said[homes["gone1"]]


def test_prune_spares_a_home_whose_project_cannot_be_checked(
    base: Path, env: dict[str, str], homes: dict[str, Path]
) -> None:
    report = run_gc(base, env, prune=True, confirm=lambda _: True, project_exists=lambda _: None)
    assert all(path.exists() for path in homes.values())
    assert any("cannot tell whether" in h.what for h in report.homes)


def test_home_verdicts_is_the_whole_decision(tmp_path: Path) -> None:
    def record(**kw: Any) -> state.HomeRecord:
        values: dict[str, Any] = {
            "path": tmp_path / "h",
            "agent": "claude",
            "project": tmp_path / "p",
            "project_exists": False,
            "matches": True,
            "problem": None,
        }
        values.update(kw)
        return state.HomeRecord(**values)

    cases = [
        (record(), ops.PRUNABLE),
        (record(matches=False, problem="x"), "unknown project, left alone (x)"),
        (record(project=None, matches=False), "unknown project, left alone"),
        (record(project_exists=None), "cannot tell"),
        (record(path=tmp_path / "busy"), "running instance"),
    ]
    verdicts = ops.home_verdicts([c[0] for c in cases] + [record(project_exists=True)],
                                 in_use={tmp_path / "busy"})  # fmt: skip
    assert len(verdicts) == len(cases)
    for (expected_record, expected), (got_record, said) in zip(cases, verdicts, strict=True):
        assert got_record is expected_record
        assert expected in said


def test_a_gone_project_inside_another_projects_tree_is_not_pruned(tmp_path: Path) -> None:
    # An agent on ~/src could have moved ~/src/app away: its home stays.
    def record(name: str, project: Path, exists: bool) -> state.HomeRecord:
        return state.HomeRecord(tmp_path / name, "claude", project, exists, True, None)

    outer = record("outer", tmp_path / "src", True)
    inner = record("inner", tmp_path / "src" / "app", False)
    deeper = record("deeper", tmp_path / "src" / "app" / "lib", False)
    alone = record("alone", tmp_path / "elsewhere", False)
    sibling = record("sibling", tmp_path / "srcx", False)  # a prefix of the name is not a parent
    said = dict(ops.home_verdicts([outer, inner, deeper, alone, sibling], in_use=()))
    assert "lay inside " + str(tmp_path / "src") + "," in said[inner]
    assert "left alone" in said[inner]
    assert "lay inside " + str(tmp_path / "src" / "app") + "," in said[deeper]
    assert said[alone] == ops.PRUNABLE
    assert said[sibling] == ops.PRUNABLE
    assert outer not in said


def test_remove_tree_empties_read_only_directories(tmp_path: Path) -> None:
    tree = tmp_path / "home"
    (tree / "go" / "pkg" / "mod").mkdir(parents=True)
    (tree / "go" / "pkg" / "mod" / "file.go").write_text("package x")
    (tree / "outside-link").symlink_to(tmp_path)
    for directory in (tree / "go" / "pkg" / "mod", tree / "go" / "pkg"):
        directory.chmod(0o555)
    (tmp_path / "keep").write_text("kept")
    assert ops.remove_tree(tree) is None
    assert not tree.exists()
    assert (tmp_path / "keep").read_text() == "kept"
    assert ops.remove_tree(tmp_path / "absent") is None


def test_remove_tree_removes_a_chain_deeper_than_any_recursion(tmp_path: Path) -> None:
    tree = tmp_path / "home"
    tree.mkdir()
    fd = dig(tree, 2100)
    os.close(os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    os.fchmod(fd, 0)  # and the bottom one locked
    os.close(fd)
    assert ops.remove_tree(tree) is None
    assert not tree.exists()


def test_stop_cannot_stop_an_instance_without_a_readable_state(
    base: Path, env: dict[str, str]
) -> None:
    (base / "ab12cd34").mkdir()
    (result,) = ops.stop(base, ["ab12cd34"], 0.0, env, uid=os.getuid())
    assert result.outcome == ops.StopOutcome.UNREADABLE
    assert result.detail == "unreadable state: no state.toml"
    assert (base / "ab12cd34").exists()


def test_prune_takes_the_runners_own_files_of_that_project_along(
    base: Path, env: dict[str, str], homes: dict[str, Path], tmp_path: Path
) -> None:
    owned = {}
    for name in ("gone1", "alive"):
        project = tmp_path / name
        owned[name] = (
            host.project_state_dir(project, env),
            host.cri_storage_dir("claude", project, env),
        )
        for directory in owned[name]:
            (directory / "sub").mkdir(parents=True)
            (directory / "sub" / "file").write_text("x")
    run_gc(base, env, prune=True, confirm=lambda q: str(homes["gone1"]) in q)
    assert not any(directory.exists() for directory in owned["gone1"])
    assert all(directory.exists() for directory in owned["alive"])
