"""The per-instance log (instancelog.py) and `microvm-run logs` (logs_cli.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from microvm_run import instancelog, logs_cli


def _env(tmp_path: Path) -> dict[str, str]:
    return {"HOME": str(tmp_path), "XDG_STATE_HOME": str(tmp_path / "state")}


def _write(env: dict[str, str], instance_id: str, *events: tuple[str, dict[str, object]]) -> Path:
    log = instancelog.InstanceLog(instancelog.log_path(env, instance_id))
    log.open()
    for kind, fields in events:
        log.event(kind, **fields)
    log.close()
    return log.path


def test_events_are_json_lines_in_a_private_file_outside_the_shares(tmp_path: Path) -> None:
    env = _env(tmp_path)
    path = _write(env, "cafe0001", ("start", {"agent": "claude"}), ("stop", {"exit": 0}))
    assert path == tmp_path / "state/microvm-run/instances/cafe0001.jsonl"
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["event"], r.get("agent"), r.get("exit")) for r in records] == [
        ("start", "claude", None),
        ("stop", None, 0),
    ]


def test_an_id_prefix_finds_one_log_and_refuses_ambiguity(tmp_path: Path) -> None:
    env = _env(tmp_path)
    _write(env, "cafe0001", ("start", {}))
    _write(env, "cafe0002", ("start", {}))
    assert instancelog.find(env, "cafe0001").name == "cafe0001.jsonl"
    with pytest.raises(ValueError, match="ambiguous"):
        instancelog.find(env, "cafe")
    with pytest.raises(ValueError, match="no log"):
        instancelog.find(env, "beef")
    with pytest.raises(ValueError, match="not an instance id"):
        instancelog.find(env, "../x")


def test_follow_stops_at_the_stop_event(tmp_path: Path) -> None:
    env = _env(tmp_path)
    path = _write(env, "a1", ("start", {}), ("stop", {"exit": 1}), ("late", {}))
    lines = list(instancelog.follow(path, lambda: True, poll_s=0))
    assert [json.loads(line)["event"] for line in lines] == ["start", "stop"]


def test_logs_prints_one_line_per_event_and_lists_without_an_id(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = _env(tmp_path)
    _write(env, "a1", ("start", {"agent": "codex", "project": "/p"}), ("stop", {"exit": 7}))
    assert logs_cli.main(["logs", "a1"], env) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and "start" in out[0] and "agent=codex" in out[0] and "exit=7" in out[1]
    assert logs_cli.main(["logs"], env) == 0
    assert "a1" in capsys.readouterr().out
    assert logs_cli.main(["logs", "--follow"], env) == 2
    assert logs_cli.main(["logs", "zz"], env) == 2


def test_denied_on_a_finished_instance_reads_its_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from microvm_run import denied_cli  # noqa: PLC0415

    env = {**_env(tmp_path), "XDG_RUNTIME_DIR": str(tmp_path / "run")}
    _write(
        env,
        "cafe0001",
        ("start", {"net": "allowlist"}),
        ("refused", {"host": "pkg.example", "port": 443, "why": "not in the allowlist",
                     "fix": "allow"}),
    )  # fmt: skip
    assert denied_cli.main(["denied", "cafe"], env) == 0
    assert capsys.readouterr().out == (
        "microvm-run refused pkg.example:443: not in the allowlist (--net allowlist); "
        "to allow it, on the host: microvm-run allow cafe0001 pkg.example\n"
    )
    assert denied_cli.main(["denied", "beef"], env) == 2


def test_gc_keeps_a_young_log_without_stop_and_removes_finished_ones(tmp_path: Path) -> None:
    from microvm_run import ops  # noqa: PLC0415

    env = {**_env(tmp_path), "XDG_RUNTIME_DIR": str(tmp_path / "run"), "PATH": "/usr/bin:/bin"}
    (tmp_path / "run").mkdir(mode=0o700)
    starting = _write(env, "a1", ("start", {}))
    finished = _write(env, "b2", ("start", {}), ("stop", {"exit": 0}))
    report = ops.gc(
        tmp_path / "run" / "microvm-run",
        env,
        prune=False,
        confirm=lambda _q: False,
        uid=os.getuid(),
        project_exists=lambda _p: True,
    )
    assert starting.exists() and not finished.exists()
    assert any(a.what.startswith("removed log") for a in report.actions)
